"""EMCA-ResNet models: backbones, attention integration, coverage region, timm registration."""

from typing import Any, Mapping

from torch import nn

from . import registry  # noqa: F401  (registers the emca_* names with timm)
from .coverage import PRESETS as COVERAGE_PRESETS
from .coverage import CoverageRegion, coverage_name, coverage_sources
from ..layers.create_attn import ATTENTIONS, INTEGRATIONS, default_integration, option_defaults
from .resnet import BACKBONES, EMCAResNet, WeightsMismatchError
from .loading import EvalTransform, LoadedModel, load_model
from .detection import detection_backbone


def build_model(backbone: Any, attention: Any, coverage: Any, num_classes: int) -> EMCAResNet:
    """Build from the three config groups (DictConfigs, dataclasses or mappings)."""
    import timm
    from omegaconf import OmegaConf

    def get(cfg, key, default=None):
        mapping = isinstance(cfg, Mapping) or hasattr(cfg, "keys")
        value = cfg.get(key, default) if mapping else getattr(cfg, key, default)
        return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value

    options = {key: get(attention, key, default) for key, default in option_defaults().items()}
    return timm.create_model(
        f"emca_{get(backbone, 'name')}",
        num_classes=num_classes,
        attention=get(attention, "name", "none"),
        integration=get(attention, "integration"),
        coverage={"stages": get(coverage, "stages"), "blocks": get(coverage, "blocks")},
        gating=get(attention, "gating", "multiply"),
        align=get(attention, "align", "repeat"),
        include_stem=bool(get(attention, "include_stem", False)),
        zero_init_residual=bool(get(backbone, "zero_init_residual", False)),
        **options,
    )


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every attention module with per-channel scales, by qualified name (DDP / compile wrappers
    unwrapped): SE / ECA / SRM, EMCA, CBAM's and FcaNet's channel gates.

    Each has a `gate` child whose forward output (B, C) are the learned scales.
    """
    return {name: m for name, m in model.named_modules() if getattr(m, "per_channel_gate", False)}


__all__ = [
    "ATTENTIONS",
    "BACKBONES",
    "COVERAGE_PRESETS",
    "INTEGRATIONS",
    "CoverageRegion",
    "EMCAResNet",
    "EvalTransform",
    "LoadedModel",
    "WeightsMismatchError",
    "attention_modules",
    "build_model",
    "coverage_name",
    "coverage_sources",
    "default_integration",
    "detection_backbone",
    "load_model",
]
