"""EMCA-ResNet models: backbones, attention integration, coverage region, timm registration."""

from typing import Any, Mapping

from torch import nn

from . import registry  # noqa: F401  (registers the emca_* names with timm)
from .coverage import PRESETS as COVERAGE_PRESETS
from .coverage import CoverageRegion, coverage_name, coverage_sources
from .resnet import ATTENTIONS, BACKBONES, INTEGRATIONS, EMCAResNet, default_integration


def build_model(backbone: Any, attention: Any, coverage: Any, num_classes: int) -> EMCAResNet:
    """Build from the three config groups (DictConfigs, dataclasses or mappings)."""
    import timm

    def get(cfg, key, default=None):
        if isinstance(cfg, Mapping) or hasattr(cfg, "keys"):
            return cfg.get(key, default)
        return getattr(cfg, key, default)

    eca_kernel = get(attention, "eca_kernel", "adaptive")
    if eca_kernel is not None and not isinstance(eca_kernel, str):
        eca_kernel = list(eca_kernel)
    return timm.create_model(
        f"emca_{get(backbone, 'name')}",
        num_classes=num_classes,
        attention=get(attention, "name", "none"),
        integration=get(attention, "integration"),
        coverage={"stages": get(coverage, "stages"), "blocks": get(coverage, "blocks")},
        se_ratio=get(attention, "se_ratio", 16),
        se_bias=get(attention, "se_bias", True),
        eca_kernel=eca_kernel,
        gating=get(attention, "gating", "multiply"),
        align=get(attention, "align", "repeat"),
        include_stem=bool(get(attention, "include_stem", False)),
        zero_init_residual=bool(get(backbone, "zero_init_residual", False)),
    )


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every channel-attention module by qualified name (DDP / compile wrappers unwrapped).

    Each has a `gate` child whose forward output (B, C) are the learned scales.
    """
    from ..layers import EMCA, ChannelAttention

    return {name: m for name, m in model.named_modules() if isinstance(m, (ChannelAttention, EMCA))}


__all__ = [
    "ATTENTIONS",
    "BACKBONES",
    "COVERAGE_PRESETS",
    "INTEGRATIONS",
    "CoverageRegion",
    "EMCAResNet",
    "attention_modules",
    "build_model",
    "coverage_name",
    "coverage_sources",
    "default_integration",
]
