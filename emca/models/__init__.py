"""EMCA-ResNet models: backbones, attention integration, coverage region, timm registration."""

from typing import Any, Mapping

from torch import nn

from emca.layers.create_attn import ATTENTIONS, INTEGRATIONS, default_integration, option_defaults
from emca.models import registry  # registers the emca_* names with timm, for timm's users
from emca.models.coverage import PRESETS as COVERAGE_PRESETS
from emca.models.coverage import CoverageRegion, coverage_name, coverage_sources
from emca.models.detection import detection_backbone
from emca.models.resnet import BACKBONES, EMCAResNet, WeightsMismatchError


def build_model(backbone: Any, attention: Any, coverage: Any, num_classes: int) -> EMCAResNet:
    """The model of the three config groups (DictConfigs, dataclasses or mappings): EMCAResNet's
    constructor called with their fields, as the timm entry points call it (emca.models.registry).

    How `coverage=...` reaches the module that uses the region, in five calls, each greppable:

    1. configs/coverage/<preset>.yaml, composed by Hydra as cfg.coverage: the training task (and
       load_model, from a checkpoint's config) calls build_model(cfg.backbone, cfg.attention, cfg.coverage, ...)
    2. build_model: EMCAResNet(..., coverage={"stages": ..., "blocks": ...}, ...)
    3. EMCAResNet.__init__: CoverageRegion.parse(coverage), then self._add_emca(...)
    4. EMCAResNet._add_emca: coverage_sources(self.coverage, ...), the earlier block outputs per stage
    5. EMCAResNet._add_emca: EMCA(channels, [output_channels[s] for s in sources], ...), the module
    """
    fields = {key: _field(attention, key) for key in ("name", "integration", "gating", "align", *option_defaults())}
    fields["attention"] = fields.pop("name")
    model = EMCAResNet(
        backbone=_field(backbone, "name"),
        num_classes=num_classes,
        coverage={"stages": _field(coverage, "stages"), "blocks": _field(coverage, "blocks")},
        include_stem=bool(_field(attention, "include_stem")),
        zero_init_residual=bool(_field(backbone, "zero_init_residual")),
        # A field left out or null takes the constructor's default (as timm.create_model, which
        # drops None keywords, did in v0.2): a v0.1 config's eca_kernel=null is ECA's adaptive kernel.
        **{key: value for key, value in fields.items() if value is not None},
    )
    # The pretrained_cfg that timm.create_model gives the entry point taking these keywords, as
    # build_model's models carried it in v0.2: a description of the recipe, not part of construction.
    model.pretrained_cfg = model.default_cfg = registry.registered_cfg(model.backbone_name)
    return model


def _field(cfg: Any, key: str) -> Any:
    """cfg's `key` (None where it has none) as plain Python: a DictConfig, a mapping or a dataclass."""
    from omegaconf import OmegaConf

    mapping = isinstance(cfg, Mapping) or hasattr(cfg, "keys")
    value = cfg.get(key) if mapping else getattr(cfg, key, None)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


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
    "WeightsMismatchError",
    "attention_modules",
    "build_model",
    "coverage_name",
    "coverage_sources",
    "default_integration",
    "detection_backbone",
]
