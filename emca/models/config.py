"""Structured-config schemas of the model groups: backbone, attention, coverage."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from emca.options import require, require_int

from .resnet import BACKBONES


@dataclass
class BackboneConfig:
    name: str = "resnet50"
    zero_init_residual: bool = False


@dataclass
class AttentionConfig:
    name: str = "none"  # none | se | eca | srm | emca_se | emca_eca | emca_srm
    # all | first | last: which blocks of each stage carry it; null: the method's own default
    # (emca.models.default_integration: all for SE / ECA / SRM, first for EMCA).
    integration: Optional[str] = None
    se_ratio: int = 16
    # SE's two FC layers with biases (Hu et al., timm) or without (the EMCA authors' SE, whose
    # parameter counts the paper prints; the table presets use it). SE and EMCA-SE only.
    se_bias: bool = True
    eca_kernel: Any = "adaptive"  # 'adaptive' or one odd size per stage, e.g. [3, 5, 5, 7]
    gating: str = "multiply"  # multiply: x0*Z (paper) | residual: x0*(1+Z) (authors' code)
    align: str = "repeat"  # repeat | linear (learnable channel alignment)
    include_stem: bool = False  # the stem output acts as a one-block stage 0


@dataclass
class CoverageConfig:
    name: str = "prev_stage_all"
    stages: Any = 1  # int or 'all'
    blocks: Any = "all"  # int or 'all'


def check_model_options(backbone: Any, attention: Any) -> None:
    """The model options that the model itself checks in no one-line error naming the option (an
    unknown backbone is timm's RuntimeError, se_ratio=0 a ZeroDivisionError). The others, such as
    attention.integration or coverage.stages, are checked where the model is built."""

    def get(cfg: Any, key: str, default: Any = None) -> Any:  # DictConfig, dict (a checkpoint's) or dataclass
        return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)

    name = get(backbone, "name")
    require(name in BACKBONES, "backbone.name", name, f"one of {', '.join(BACKBONES)}")
    require_int("attention.se_ratio", get(attention, "se_ratio", 16), 1)
    kernel = get(attention, "eca_kernel", "adaptive")
    require(kernel in (None, "adaptive") or (isinstance(kernel, Sequence) and not isinstance(kernel, str)),
            "attention.eca_kernel", kernel, "'adaptive' or one odd size per stage, e.g. [3, 5, 5, 7]")
