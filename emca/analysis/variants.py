"""Which model a run trained, in the terms the paper's tables use.

A Variant is the part of a configuration that decides a table cell: backbone, attention, where
the attention sits (integration) and, for EMCA, the coverage preset. Other options (gating,
alignment, se_reduction, ...) do not change the cell; they are kept in `options` so that runs that
differ only there can be told apart when they compete for one cell.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from emca.common.renamed_options import upgrade_config
from emca.layers.create_attn import EMCA_PREFIX, is_emca, option_defaults, reads
from emca.models import coverage_name, default_integration
from emca.models.config import AttentionConfig

# Attention options that leave the paper's table cell unchanged, with their paper values: the
# schema's defaults, except SE without biases (the authors' SE, whose parameter counts the paper prints).
_EMCA_OPTIONS = ("gating", "align", "include_stem")
PAPER_OPTIONS = {**{name: getattr(AttentionConfig, name) for name in _EMCA_OPTIONS},
                 **option_defaults(), "se_bias": False}


def paper_options(attention: str) -> dict[str, Any]:
    """The paper's values of the options this attention reads (emca.layers.create_attn.reads)."""
    read = reads(attention) + (_EMCA_OPTIONS if is_emca(attention) else ())
    return {key: PAPER_OPTIONS[key] for key in read}


@dataclass(frozen=True)
class Variant:
    backbone: str  # resnet18 | resnet34 | resnet50 | ...
    attention: str  # none or a name of emca.layers.ATTENTIONS
    integration: Optional[str] = None  # all | first | last; None for the plain ResNet and non-branch methods
    coverage: Optional[str] = None  # coverage preset name (or stages=..,blocks=..), EMCA only
    options: tuple[tuple[str, Any], ...] = ()  # attention options that differ from the paper's

    @property
    def is_emca(self) -> bool:
        return is_emca(self.attention)

    def cell(self) -> "Variant":
        """The table cell this variant fills (options dropped)."""
        return Variant(self.backbone, self.attention, self.integration, self.coverage)

    def describe(self) -> str:
        parts = [self.backbone, self.attention]
        if self.integration is not None:
            parts.append(f"integration={self.integration}")
        if self.coverage is not None:
            parts.append(f"coverage={self.coverage}")
        parts.extend(f"{key}={value}" for key, value in self.options)
        return " ".join(parts)


def plain(backbone: str) -> Variant:
    return Variant(backbone, "none")


def channel_attention(backbone: str, kind: str, integration: str = "all") -> Variant:
    return Variant(backbone, kind, integration)


def emca(backbone: str, kind: str, coverage: str, integration: str = "first") -> Variant:
    return Variant(backbone, EMCA_PREFIX + kind, integration, coverage)


def variant_from_config(cfg: Any) -> Variant:
    """The Variant a training config (DictConfig or plain dict) describes.

    The coverage preset is derived from coverage.stages / coverage.blocks rather than trusted from
    coverage.name, which a command-line override of the fields leaves stale.
    """
    # A v0.2 run's config may name options since renamed (attention.gc_ratio): read in today's names.
    cfg = OmegaConf.create(upgrade_config(OmegaConf.to_container(cfg) if isinstance(cfg, DictConfig) else cfg))
    backbone = str(cfg.backbone.name)
    attention = str(cfg.attention.name)
    if attention == "none":
        return Variant(backbone, attention)
    coverage = None
    if is_emca(attention):
        coverage = coverage_name(_plain(cfg.coverage.stages), _plain(cfg.coverage.blocks))
    # A key the config lacks was written before the option existed: the model had the default.
    options = tuple(
        (key, value)
        for key, paper_value in paper_options(attention).items()
        if (value := _plain(cfg.attention.get(key, getattr(AttentionConfig, key)))) != paper_value
    )
    # null: the model's default for this attention, which is what the run built.
    integration = cfg.attention.get("integration") or default_integration(attention)
    return Variant(backbone, attention, None if integration is None else str(integration), coverage, options)


def _plain(value: Any) -> Any:
    """A config value as a hashable Python value (lists become tuples)."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    return tuple(value) if isinstance(value, list) else value
