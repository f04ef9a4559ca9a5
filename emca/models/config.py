"""Structured-config schemas of the model groups: backbone, attention, coverage."""

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, make_dataclass
from enum import Enum
from typing import Any, Optional

from omegaconf import MISSING

from emca.layers.create_attn import (
    ATTENTION_KINDS,
    ATTENTIONS,
    EMCA_PREFIX,
    AttentionKind,
    default_integration,
    is_emca,
)
from emca.models.coverage import PRESETS, coverage_name
from emca.models.resnet import BACKBONES
from emca.options import is_int, require, require_int, shown

log = logging.getLogger(__name__)


@dataclass
class BackboneConfig:
    # One of BACKBONES (emca.models.resnet), chosen by the backbone group of each
    # entry point's defaults list (configs/train.yaml: resnet18, the offline default; summary.yaml: resnet50).
    name: str = MISSING
    # Zero-initialise each block's last BatchNorm scale, so that every residual block starts as the identity.
    zero_init_residual: bool = False


@dataclass
class AttentionBase:
    # none, a method of the attention table (emca/layers/create_attn.py) or emca_<method>.
    name: str = "none"
    # all | first | last: which blocks of each stage carry a branch attention; null: the method's
    # own default (emca.layers.create_attn.default_integration: all for the plain methods, first for
    # EMCA, unset for the methods that sit at stage ends or in the block).
    integration: Optional[str] = None
    gating: str = "multiply"  # EMCA: multiply: x0*Z (paper) | residual: x0*(1+Z) (authors' code)
    align: str = "repeat"  # EMCA: repeat | linear (learnable channel alignment)
    include_stem: bool = False  # EMCA: the stem output acts as a one-block stage 0


def _option_field(kind: AttentionKind, option: str) -> tuple[str, Any, Any]:
    """(config field, type, default) of a table option; untyped where a list per stage is allowed."""
    default = kind.options[option]
    typed = isinstance(default, (bool, int, float, str)) and option not in kind.per_stage
    return kind.field(option), type(default) if typed else Any, field(default=default)


# The method options, one field <method>_<option> per option of the attention table, with the
# table's default (se_reduction, se_bias, eca_kernel, cbam_reduction, ...): the table states each once.
AttentionConfig = make_dataclass(
    "AttentionConfig",
    [_option_field(kind, option) for kind in ATTENTION_KINDS for option in kind.options],
    bases=(AttentionBase,),
)
AttentionConfig.__module__ = __name__
AttentionConfig.__doc__ = "The attention group: the method, where it sits, EMCA's options and every method option."


@dataclass
class CoverageConfig:
    # Derived from stages/blocks (the preset they spell, else a literal description), never stated:
    # a stated name goes stale when a command line overrides coverage.stages or coverage.blocks.
    name: str = "${emca.coverage_name:${.stages},${.blocks}}"
    stages: Any = 1  # int or 'all'
    blocks: Any = "all"  # int or 'all'


def attention_choices() -> dict[str, Any]:
    """The Hydra `attention` group, one choice per name of ATTENTIONS: its name and, written out
    although it is the default, its integration (a run's saved config names the table cell by it)."""
    return {name: AttentionConfig(name=name, integration=default_integration(name)) for name in ATTENTIONS}


def check_model_options(backbone: Any, attention: Any) -> None:
    """The model options that the model itself checks in no one-line error naming the option (an
    unknown backbone is timm's RuntimeError, se_reduction=0 a ZeroDivisionError). The others, such as
    attention.integration or coverage.stages, are checked where the model is built."""

    def get(cfg: Any, key: str, default: Any = None) -> Any:  # DictConfig, dict (a checkpoint's) or dataclass
        return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)

    name = get(backbone, "name")
    require(name in BACKBONES, "backbone.name", name, f"one of {', '.join(BACKBONES)}")
    attention_name = get(attention, "name", "none")
    require(attention_name in ATTENTIONS, "attention.name", attention_name, f"one of {', '.join(ATTENTIONS)}")
    for kind in ATTENTION_KINDS:
        for option, default in kind.options.items():
            _check_method_option(kind, option, get(attention, kind.field(option), default))


def _check_method_option(kind: AttentionKind, option: str, value: Any) -> None:
    """A table option's type (its module checks the value); a per-stage one may list one per stage."""
    default, name = kind.options[option], f"attention.{kind.field(option)}"
    if isinstance(default, bool):
        require(isinstance(value, bool), name, value, "true or false")
    elif isinstance(default, int):
        require_int(name, value, 1)
    elif option in kind.per_stage:  # None: a v0.1 config's eca_kernel, ECA's formula as 'adaptive'
        per_stage = isinstance(value, Sequence) and not isinstance(value, str)
        require(value is None or value == default or is_int(value) or per_stage, name, value,
                f"{shown(default)}, one value for every stage or a list of one per stage")


# EMCA-only options: the multi-scale aggregation's gating, channel alignment and stem source.
EMCA_OPTIONS = ("gating", "align", "include_stem")
# Coverages that ask for nothing beyond a block's own branch (none) or were not chosen (the default group's).
_UNCHOSEN_COVERAGES = ((CoverageConfig.stages, CoverageConfig.blocks), (0, 0))


def ignored_model_options(attention: Any, coverage: Any) -> list[str]:
    """The options that have no effect for a non-EMCA attention (none or a plain method): a coverage
    region other than the default group's (prev_stage_all, set for every run) or none's, and gating,
    align or include_stem other than their defaults. [] for an EMCA attention, which reads them all."""

    def get(cfg: Any, key: str, default: Any = None) -> Any:
        return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)

    if is_emca(get(attention, "name", "none")):
        return []
    ignored = []
    stages, blocks = get(coverage, "stages", CoverageConfig.stages), get(coverage, "blocks", CoverageConfig.blocks)
    if (stages, blocks) not in _UNCHOSEN_COVERAGES:
        name = coverage_name(stages, blocks)
        ignored.append(f"coverage={name}" if name in PRESETS else f"coverage.stages={stages}, coverage.blocks={blocks}")
    for option in EMCA_OPTIONS:
        value = get(attention, option, getattr(AttentionBase, option))
        if value != getattr(AttentionBase, option):
            ignored.append(f"attention.{option}={shown(value)}")
    return ignored


def warn_ignored_model_options(attention: Any, coverage: Any) -> None:
    """One warning line naming the options that the chosen attention ignores (ignored_model_options)."""
    ignored = ignored_model_options(attention, coverage)
    if not ignored:
        return
    name = attention.get("name", "none") if hasattr(attention, "get") else attention.name
    emca = EMCA_PREFIX + name if EMCA_PREFIX + name in ATTENTIONS else "an emca_* attention"
    log.warning(f"attention={name} ignores {', '.join(ignored)}: only EMCA's multi-scale aggregation reads them; "
                f"drop them, or choose {emca} to use them")


class DetectorName(Enum):
    faster_rcnn = "faster_rcnn"  # torchvision's FasterRCNN (RPN + RoIAlign box head) on the backbone's FPN
    mask_rcnn = "mask_rcnn"  # torchvision's MaskRCNN: Faster R-CNN with a mask head (boxes and instance masks)
    retinanet = "retinanet"  # torchvision's RetinaNet: one stage, focal loss, FPN levels P3-P7


class DetectorNorm(Enum):
    # The backbone's BatchNorm statistics frozen, its affine values trained outside the frozen stages:
    # MMDetection's norm_eval=True with requires_grad=True, with which the paper's detectors were trained.
    mmdet = "mmdet"
    # torchvision's FrozenBatchNorm2d: statistics and affine values frozen (its detection models' default).
    frozen = "frozen"


class RetinaNetExtra(Enum):
    c5 = "c5"  # P6 from the backbone's last stage (MMDetection's add_extra_convs='on_input': the paper's)
    p5 = "p5"  # P6 from the FPN's P5 (torchvision's retinanet_resnet50_fpn)


@dataclass
class DetectorConfig:
    """The detector around the backbone (task=detection): torchvision's models, set as the paper's
    MMDetection 1x configs set theirs."""

    name: DetectorName = DetectorName.faster_rcnn
    # The detector's own resize (torchvision's GeneralizedRCNNTransform): shorter side min_size, longer
    # at most max_size (MMDetection's 1333 x 800), then normalised with ImageNet's statistics.
    min_size: int = 800
    max_size: int = 1333
    # Backbone stages trained, counted from the last (torchvision's trainable_layers): 3 leaves the
    # stem and stage 1 frozen (MMDetection's frozen_stages=1); 5 trains all.
    trainable_layers: int = 3
    norm: DetectorNorm = DetectorNorm.mmdet
    # Faster / Mask R-CNN: proposals kept per image after the RPN's NMS, in training and testing
    # (MMDetection's max_per_img 1000; torchvision's default keeps 2000 in training), and the RoIs
    # sampled from them per image for the box head's loss (both: 512).
    proposals: int = 1000
    rois_per_image: int = 512
    # RetinaNet only: where its extra levels P6 / P7 start.
    retinanet_extra: RetinaNetExtra = RetinaNetExtra.c5
