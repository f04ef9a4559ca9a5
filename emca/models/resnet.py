"""ResNet-18/34/50/101/152 with pluggable channel attention, EMCA included.

The backbone *is* torchvision's ResNet (same modules, same state_dict keys, same Kaiming init); the
attention modules are added as an `attn` child of the blocks that carry one, so a plain model
(`attention='none'`) loads torchvision weights with strict=True.
"""

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from ..layers import EMCA
from ..layers.create_attn import (ATTENTIONS, INTEGRATIONS, AttentionKind, create_attention, create_excitation,
                                  default_integration, is_emca, kind_of, kind_options, option_defaults)
from ..layers.pooling import pool_descriptor
from ..options import shown
from .coverage import CoverageRegion, coverage_sources


@dataclass(frozen=True)
class BackboneSpec:
    block: type
    stage_depths: tuple[int, ...]


class AttentionSlot(nn.Module):
    """Mixin for torchvision's blocks: an optional attention module on the residual branch (`attn`),
    the indices of the earlier block outputs (pooled by the backbone) that an EMCA module reads, and
    an optional module applied to the block's output (`after`, a block-place method's)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.attn: nn.Module | None = None
        self.after: nn.Module | None = None
        self.source_indices: tuple[int, ...] = ()
        self.edited = False  # a block-place method changed it (emca.layers.create_attn)

    def add_shortcut(self, y: torch.Tensor, identity: torch.Tensor, sources: Sequence[torch.Tensor]) -> torch.Tensor:
        """identity + attention(y). A per-channel gate's multiply and the shortcut's add are one
        addcmul: one pass over the feature map instead of two, and no gated map kept alive in between."""
        if self.attn is None:
            return y + identity
        if isinstance(self.attn, EMCA):
            return torch.addcmul(identity, y, self.attn.factors(y, sources))
        if hasattr(self.attn, "factors"):  # a per-channel gate (SE, ECA, SRM, FcaNet)
            return torch.addcmul(identity, y, self.attn.factors(y))
        return self.attn(y) + identity

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.after is None else self.after(out)


class BasicBlock(AttentionSlot, tv_resnet.BasicBlock):
    def forward(self, x: torch.Tensor, sources: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.finish(self.relu(self.add_shortcut(y, identity, sources)))


class Bottleneck(AttentionSlot, tv_resnet.Bottleneck):
    def forward(self, x: torch.Tensor, sources: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.finish(self.relu(self.add_shortcut(y, identity, sources)))


BACKBONES = {
    "resnet18": BackboneSpec(BasicBlock, (2, 2, 2, 2)),
    "resnet34": BackboneSpec(BasicBlock, (3, 4, 6, 3)),
    "resnet50": BackboneSpec(Bottleneck, (3, 4, 6, 3)),
    "resnet101": BackboneSpec(Bottleneck, (3, 4, 23, 3)),
    "resnet152": BackboneSpec(Bottleneck, (3, 8, 36, 3)),
}


def attention_blocks(integration: str, depth: int) -> list[int]:
    """Which blocks of a stage carry attention (paper Table 2: dense, first or last)."""
    if integration == "all":
        return list(range(depth))
    if integration == "first":
        return [0]
    if integration == "last":
        return [depth - 1]
    raise ValueError(f"integration must be one of {INTEGRATIONS}, got '{integration}'")


class EMCAResNet(tv_resnet.ResNet):
    """torchvision ResNet + an attention method of the table (emca.layers.create_attn), with EMCA's
    shared pooled descriptors.

    Method options are keyword arguments named as their config fields (se_ratio=8, cbam_reduction=8);
    an option of another method is accepted and ignored, as a config holds every method's fields.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        num_classes: int = 1000,
        attention: str = "none",
        integration: str | None = None,
        coverage: Any = "prev_stage_all",
        gating: str = "multiply",
        align: str = "repeat",
        include_stem: bool = False,
        zero_init_residual: bool = False,
        **options: Any,
    ):
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone '{backbone}': choose one of {list(BACKBONES)}")
        if attention not in ATTENTIONS:
            raise ValueError(f"unknown attention '{attention}': choose one of {list(ATTENTIONS)}")
        _check_integration(attention, integration)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        unknown = sorted(set(options) - set(option_defaults()))
        if unknown:
            raise ValueError(f"unknown attention option {unknown[0]}: choose from {sorted(option_defaults())}")
        for key, default in option_defaults().items():  # bool("false") would silently be True
            if isinstance(default, bool) and not isinstance(options.get(key, default), bool):
                raise ValueError(f"{key} must be true or false, got {options[key]!r}")
        spec = BACKBONES[backbone]
        super().__init__(
            spec.block, list(spec.stage_depths), num_classes=num_classes, zero_init_residual=zero_init_residual
        )
        self.backbone_name = backbone
        self.attention_name = attention
        self.stage_depths = spec.stage_depths
        # A plain tuple, not a ModuleList, so that state_dict keys stay torchvision's layer1..layer4.
        self._stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        # A stage_end method's module per stage (nn.Identity where none sits; no state_dict keys).
        self.stage_attn: nn.ModuleList | None = None

        self.include_stem = bool(include_stem) and is_emca(attention)
        self.coverage = CoverageRegion.parse(coverage) if is_emca(attention) else None
        self.pooled_outputs: frozenset[int] = frozenset()
        self.pooling = "mean"  # what the EMCA modules' excitation reads, hence how sources are pooled
        if attention != "none":
            self._add_attention(kind_of(attention), integration or default_integration(attention), options,
                                gating, align)

        self.pretrained_cfg = {
            "input_size": (3, 224, 224),
            "crop_pct": 0.875,
            "interpolation": "bilinear",
            "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225),
            "num_classes": num_classes,
            "first_conv": "conv1",
            "classifier": "fc",
        }

    @property
    def stage_channels(self) -> list[int]:
        return [_out_channels(stage[-1]) for stage in self._stages]

    def _add_attention(self, kind: AttentionKind, integration, fields, gating, align):
        carried = kind.stages or range(1, len(self._stages) + 1)
        if kind.stages is not None and max(kind.stages) > len(self._stages):
            raise ValueError(
                f"{kind.name} sits in stages {kind.stages} but {self.backbone_name} has {len(self._stages)}"
            )
        per_stage = [kind_options(kind, fields, i, len(self._stages)) for i in range(len(self._stages))]
        if is_emca(self.attention_name):
            self._add_emca(kind, integration, per_stage, gating, align)
        elif kind.place == "branch":
            for number in carried:
                stage = self._stages[number - 1]
                for index in attention_blocks(integration, len(stage)):
                    stage[index].attn = _named_errors(kind, per_stage[number - 1], create_attention,
                                                      kind, _out_channels(stage[index]), per_stage[number - 1])
        elif kind.place == "stage_end":
            self.stage_attn = nn.ModuleList(
                _named_errors(kind, options, create_attention, kind, c, options) if number in carried else nn.Identity()
                for number, (c, options) in enumerate(zip(self.stage_channels, per_stage, strict=True), 1)
            )
        else:
            positions = kind.positions(self.stage_depths) if kind.positions else [
                (i, j) for i in range(len(self._stages)) for j in range(self.stage_depths[i])]
            for stage, index in positions:
                _named_errors(kind, per_stage[stage], kind.module, self._stages[stage][index], **per_stage[stage])
                self._stages[stage][index].edited = True

    def _add_emca(self, kind: AttentionKind, integration, per_stage, gating, align):
        output_channels = [self.conv1.out_channels] + [
            c for c, n in zip(self.stage_channels, self.stage_depths, strict=True) for _ in range(n)
        ]
        sources_per_stage = coverage_sources(self.coverage, self.stage_depths, self.include_stem, self.backbone_name)
        needed = set()
        for stage, channels, options, sources in zip(
            self._stages, self.stage_channels, per_stage, sources_per_stage, strict=True
        ):
            for index in attention_blocks(integration, len(stage)):
                excitation = _named_errors(kind, options, create_excitation, kind, channels, options)
                stage[index].attn = EMCA(channels, [output_channels[s] for s in sources], excitation,
                                         align=align, gating=gating, pooling=kind.pooling)
                stage[index].source_indices = tuple(sources)
                needed.update(sources)
        self.pooled_outputs = frozenset(needed)
        self.pooling = kind.pooling

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        # Pooled descriptors of the block outputs that some EMCA module reads: each one is computed
        # once here and shared by every module that covers it.
        pooled: dict[int, torch.Tensor] = {}
        if 0 in self.pooled_outputs:
            pooled[0] = pool_descriptor(x, self.pooling)
        index = 1
        for number, stage in enumerate(self._stages):
            for block in stage:
                x = block(x, [pooled[i] for i in block.source_indices])
                if index in self.pooled_outputs:
                    pooled[index] = pool_descriptor(x, self.pooling)
                index += 1
            if self.stage_attn is not None:
                x = self.stage_attn[number](x)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def architecture(self) -> dict[str, Any]:
        """What a checkpoint must match to be loaded into this model."""
        return {
            "backbone": self.backbone_name,
            "attention": self.attention_name,
            "coverage": None
            if self.coverage is None
            else {"stages": self.coverage.stages, "blocks": self.coverage.blocks},
            "num_classes": self.fc.out_features,
        }


def _named_errors(kind: AttentionKind, options: dict[str, Any], build, *args, **kwargs):
    """build(*args, **kwargs); a module's ValueError names the config fields in play, so that the
    one-line error says which option to change (BAM's "combine must be one of ..." alone does not)."""
    try:
        return build(*args, **kwargs)
    except ValueError as error:
        given = ", ".join(f"attention.{kind.field(key)}={shown(value)}" for key, value in options.items())
        raise ValueError(f"attention={kind.name}: {error}" + (f" (with {given})" if given else "")) from None


def _check_integration(attention: str, integration: str | None) -> None:
    if integration is None or attention == "none":
        return
    if integration not in INTEGRATIONS:
        raise ValueError(f"integration must be one of {INTEGRATIONS}, got '{integration}'")
    kind = kind_of(attention)
    if kind.place != "branch":
        raise ValueError(f"integration={integration} applies to branch attention, but {attention} sits at "
                         f"{kind.place.replace('_', ' ')} (see its table entry): leave attention.integration unset")


def _out_channels(block: nn.Module) -> int:
    return block.bn3.num_features if hasattr(block, "bn3") else block.bn2.num_features
