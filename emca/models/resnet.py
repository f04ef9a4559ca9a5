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

from ..layers import EMCA, ChannelAttention, create_excitation, pool_statistics
from ..layers.excitation import resolve_eca_kernels
from .coverage import CoverageRegion, coverage_sources

ATTENTIONS = ("none", "se", "eca", "srm", "emca_se", "emca_eca", "emca_srm")
INTEGRATIONS = ("all", "first", "last")


@dataclass(frozen=True)
class BackboneSpec:
    block: type
    stage_depths: tuple[int, ...]


class AttentionSlot(nn.Module):
    """Mixin for torchvision's blocks: an optional attention module on the residual branch, and the
    indices of the earlier block outputs (pooled by the backbone) that an EMCA module reads."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.attn: nn.Module | None = None
        self.source_indices: tuple[int, ...] = ()

    def add_shortcut(self, y: torch.Tensor, identity: torch.Tensor, sources: Sequence[torch.Tensor]) -> torch.Tensor:
        """identity + attention(y). The gate's multiply and the shortcut's add are one addcmul: one
        pass over the feature map instead of two, and no gated map kept alive in between."""
        if self.attn is None:
            return y + identity
        factors = self.attn.factors(y, sources) if isinstance(self.attn, EMCA) else self.attn.factors(y)
        return torch.addcmul(identity, y, factors)


class BasicBlock(AttentionSlot, tv_resnet.BasicBlock):
    def forward(self, x: torch.Tensor, sources: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(self.add_shortcut(y, identity, sources))


class Bottleneck(AttentionSlot, tv_resnet.Bottleneck):
    def forward(self, x: torch.Tensor, sources: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(self.add_shortcut(y, identity, sources))


BACKBONES = {
    "resnet18": BackboneSpec(BasicBlock, (2, 2, 2, 2)),
    "resnet34": BackboneSpec(BasicBlock, (3, 4, 6, 3)),
    "resnet50": BackboneSpec(Bottleneck, (3, 4, 6, 3)),
    "resnet101": BackboneSpec(Bottleneck, (3, 4, 23, 3)),
    "resnet152": BackboneSpec(Bottleneck, (3, 8, 36, 3)),
}


def default_integration(attention: str) -> str:
    """Where the attention sits when a config does not say (integration None): every block for plain
    SE / ECA / SRM (the usual dense integration), the first block of each stage for EMCA (PAPER.md §4)."""
    return "first" if attention.startswith("emca") else "all"


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
    """torchvision ResNet + channel attention per block, with EMCA's shared pooled descriptors."""

    def __init__(
        self,
        backbone: str = "resnet50",
        num_classes: int = 1000,
        attention: str = "none",
        integration: str | None = None,
        coverage: Any = "prev_stage_all",
        se_ratio: int = 16,
        se_bias: bool = True,
        eca_kernel: Any = "adaptive",
        gating: str = "multiply",
        align: str = "repeat",
        include_stem: bool = False,
        zero_init_residual: bool = False,
    ):
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone '{backbone}': choose one of {list(BACKBONES)}")
        if attention not in ATTENTIONS:
            raise ValueError(f"unknown attention '{attention}': choose one of {list(ATTENTIONS)}")
        if integration is None:
            integration = default_integration(attention)
        if integration not in INTEGRATIONS:
            raise ValueError(f"integration must be one of {INTEGRATIONS}, got '{integration}'")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if not isinstance(se_bias, bool):  # bool("false") would silently be True
            raise ValueError(f"se_bias must be true or false, got {se_bias!r}")
        spec = BACKBONES[backbone]
        super().__init__(
            spec.block, list(spec.stage_depths), num_classes=num_classes, zero_init_residual=zero_init_residual
        )
        self.backbone_name = backbone
        self.attention_name = attention
        self.stage_depths = spec.stage_depths
        # A plain tuple, not a ModuleList, so that state_dict keys stay torchvision's layer1..layer4.
        self._stages = (self.layer1, self.layer2, self.layer3, self.layer4)

        self.include_stem = bool(include_stem) and attention.startswith("emca")
        self.coverage = CoverageRegion.parse(coverage) if attention.startswith("emca") else None
        self.pooled_outputs: frozenset[int] = frozenset()
        self.num_statistics = 1
        if attention != "none":
            self._add_attention(
                attention, integration, eca_kernel, {"se_ratio": se_ratio, "se_bias": se_bias}, gating, align
            )

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

    def _add_attention(self, attention, integration, eca_kernel, se_options, gating, align):
        kind = attention.removeprefix("emca_")
        stage_channels = self.stage_channels
        eca_kernels = resolve_eca_kernels(eca_kernel, stage_channels) if kind == "eca" else [None] * 4
        output_channels = [self.conv1.out_channels] + [
            c for c, n in zip(stage_channels, self.stage_depths, strict=True) for _ in range(n)
        ]

        if attention.startswith("emca"):
            sources_per_stage = coverage_sources(
                self.coverage, self.stage_depths, self.include_stem, self.backbone_name
            )
        else:
            sources_per_stage = [[] for _ in self._stages]

        needed = set()
        for stage, channels, kernel, sources in zip(
            self._stages, stage_channels, eca_kernels, sources_per_stage, strict=True
        ):
            for index in attention_blocks(integration, len(stage)):
                excitation = create_excitation(kind, channels, eca_kernel=kernel, **se_options)
                block = stage[index]
                if attention.startswith("emca"):
                    block.attn = EMCA(
                        channels, [output_channels[s] for s in sources], excitation, align=align, gating=gating
                    )
                    block.source_indices = tuple(sources)
                    needed.update(sources)
                else:
                    block.attn = ChannelAttention(excitation)
                self.num_statistics = excitation.num_statistics
        self.pooled_outputs = frozenset(needed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        # Pooled descriptors of the block outputs that some EMCA module reads: each one is computed
        # once here and shared by every module that covers it.
        pooled: dict[int, torch.Tensor] = {}
        if 0 in self.pooled_outputs:
            pooled[0] = pool_statistics(x, self.num_statistics)
        index = 1
        for stage in self._stages:
            for block in stage:
                x = block(x, [pooled[i] for i in block.source_indices])
                if index in self.pooled_outputs:
                    pooled[index] = pool_statistics(x, self.num_statistics)
                index += 1
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def attention_modules(self) -> dict[str, nn.Module]:
        return {name: m for name, m in self.named_modules() if isinstance(m, (ChannelAttention, EMCA))}

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


def _out_channels(block: nn.Module) -> int:
    return block.bn3.num_features if hasattr(block, "bn3") else block.bn2.num_features
