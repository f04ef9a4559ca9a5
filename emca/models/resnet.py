"""ResNet-18/34/50/101/152 with pluggable channel attention, EMCA included.

The backbone *is* torchvision's ResNet (same modules, same state_dict keys, same Kaiming init); the
attention modules are added as an `attn` child of the blocks that carry one, so a plain model
(`attention='none'`) loads torchvision weights with strict=True.
"""

import difflib
import inspect
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from timm.layers import DropPath, SelectAdaptivePool2d, create_classifier
from timm.models import checkpoint, checkpoint_seq
from timm.models._features import feature_take_indices
from timm.models._manipulate import MATCH_PREV_GROUP
from torch import nn
from torchvision.models import resnet as tv_resnet

from emca.common.checkpoint_file import describe_architecture
from emca.layers import EMCA
from emca.layers.blocks import block_out_channels
from emca.layers.create_attn import (
    ATTENTIONS,
    INTEGRATIONS,
    AttentionKind,
    create_attention,
    create_excitation,
    default_integration,
    is_emca,
    kind_of,
    kind_options,
    option_defaults,
)
from emca.layers.pooling import pool_descriptor
from emca.models.coverage import CoverageRegion, coverage_sources
from emca.options import shown


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
        self.drop_path: nn.Module | None = None  # stochastic depth on the residual branch (timm's DropPath)

    def add_shortcut(self, y: torch.Tensor, identity: torch.Tensor, sources: Sequence[torch.Tensor]) -> torch.Tensor:
        """identity + attention(y). A per-channel gate's multiply and the shortcut's add are one
        addcmul: one pass over the feature map instead of two, and no gated map kept alive in between.
        With stochastic depth (in training: DropPath is the identity in eval mode, where the fused
        form stays), identity + drop_path(attention(y)), as timm's ResNet blocks."""
        if self.drop_path is not None and self.training:
            return identity + self.drop_path(self.branch(y, sources))
        if self.attn is None:
            return y + identity
        if isinstance(self.attn, EMCA):
            return torch.addcmul(identity, y, self.attn.factors(y, sources))
        if hasattr(self.attn, "factors"):  # a per-channel gate (SE, ECA, SRM, FcaNet)
            return torch.addcmul(identity, y, self.attn.factors(y))
        return self.attn(y) + identity

    def branch(self, y: torch.Tensor, sources: Sequence[torch.Tensor]) -> torch.Tensor:
        """The residual branch's output after its attention: what add_shortcut adds to the identity."""
        if self.attn is None:
            return y
        if isinstance(self.attn, EMCA):
            return y * self.attn.factors(y, sources)
        if hasattr(self.attn, "factors"):
            return y * self.attn.factors(y)
        return self.attn(y)

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


class Descriptors:
    """One forward pass's pooled block outputs that EMCA modules read: each one is computed once, as
    the next block starts, and shared by every module that covers it. Runs the stages' blocks."""

    def __init__(self, model: "EMCAResNet"):
        self.wanted, self.pooling = model.pooled_outputs, model.pooling
        self.checkpointed = model.grad_checkpointing and not torch.jit.is_scripting()
        self.pooled: dict[int, torch.Tensor] = {}
        self.index = 0  # of the block output that the next block takes in (0: the stem's)

    def run(self, blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointed and not self.wanted:
            self.index += len(blocks)
            return checkpoint_seq(blocks, x)
        for block in blocks:
            # A block's input is pooled as the block starts, not as the block before finishes (the
            # same tensor: EMCA has no stage_end module in between), so that the last node that
            # torch.fx traces in a stage is the stage's output, where timm's FeatureGraphNet
            # (feature_cls='fx', torchvision's create_feature_extractor) takes the stage's feature.
            if self.index in self.wanted:
                self.pooled[self.index] = pool_descriptor(x, self.pooling)
            sources = [self.pooled[i] for i in block.source_indices]
            # timm's checkpoint_seq takes one-input modules; an EMCA block also takes the shared
            # descriptors, so it is checkpointed alone with timm's checkpoint.
            x = checkpoint(block, x, sources) if self.checkpointed else block(x, sources)
            self.index += 1
        return x


class Stage(nn.Sequential):
    """torchvision's stage, an nn.Sequential of blocks (same state_dict keys), called as one module
    (so that forward hooks on layer1..layer4 fire) with the pass's Descriptors; without them, a chain
    of one-input blocks (a model without EMCA, as timm's FeatureListNet runs it)."""

    def forward(self, x: torch.Tensor, descriptors: Optional[Descriptors] = None) -> torch.Tensor:
        return super().forward(x) if descriptors is None else descriptors.run(self, x)


# The global pools of timm's classifier heads (timm.layers.SelectAdaptivePool2d); '' is none.
GLOBAL_POOLS = ("avg", "max", "avgmax", "catavgmax", "fast", "")


def default_cfg(**kwargs: Any) -> dict[str, Any]:
    """timm's pretrained_cfg of an EMCA-ResNet: the ImageNet evaluation recipe of the paper (shorter
    side to 256, 224 px centre crop, bilinear). There are no published weights (no url): a checkpoint
    of ours is loaded with pretrained_cfg_overlay=dict(file=...) (emca.models.registry)."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "conv1",
        "classifier": "fc",
        **kwargs,
    }


class EMCAResNet(tv_resnet.ResNet):
    """torchvision ResNet + an attention method of the table (emca.layers.create_attn), with EMCA's
    shared pooled descriptors, and timm's model interface (features_only through forward_intermediates,
    stochastic depth, grad checkpointing, reset_classifier, group_matcher, pretrained_cfg).

    Method options are keyword arguments named as their config fields (se_reduction=8, cbam_reduction=8);
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
        in_chans: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        **options: Any,
    ):
        _check_arguments(type(self).__name__, backbone, attention, integration, num_classes, in_chans,
                         {"drop_rate": drop_rate, "drop_path_rate": drop_path_rate}, global_pool, options)
        spec = BACKBONES[backbone]
        super().__init__(
            spec.block, list(spec.stage_depths), num_classes=max(num_classes, 1), zero_init_residual=zero_init_residual
        )
        for number in range(1, len(spec.stage_depths) + 1):  # the same modules (and keys), run as one module each
            setattr(self, f"layer{number}", Stage(*getattr(self, f"layer{number}")))
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
            kind = kind_of(attention)
            per_stage = [kind_options(kind, options, i, len(self._stages)) for i in range(len(self._stages))]
            integration = integration or default_integration(attention)
            # EMCA is called from here, not through _add_attention, so that the coverage region's path
            # from the config to the module stays short (emca.models.build_model's docstring counts it).
            if is_emca(attention):
                self._add_emca(kind, integration, per_stage, gating, align)
            else:
                self._add_attention(kind, integration, per_stage)
        self._add_timm_interface(num_classes, in_chans, float(drop_rate), float(drop_path_rate), global_pool)

    def _add_timm_interface(self, num_classes: int, in_chans: int, drop_rate: float, drop_path_rate: float,
                            global_pool: str) -> None:
        """timm's interface. The default model (3 channels, avg pool, no dropout or drop path) keeps
        torchvision's modules and initialisation: the head is torchvision's pool + flatten + fc."""
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.num_features = self.head_hidden_size = self.stage_channels[-1]
        if in_chans != 3:
            self.conv1 = nn.Conv2d(in_chans, self.conv1.out_channels, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        del self.avgpool
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        if num_classes == 0 or self.global_pool.feat_mult() != 1 or not global_pool:
            self.reset_classifier(num_classes, global_pool)
        self._add_drop_path(drop_path_rate)
        self.feature_info = self._feature_info()
        self.pretrained_cfg = self.default_cfg = default_cfg(num_classes=num_classes, input_size=(in_chans, 224, 224))

    @property
    def stage_channels(self) -> list[int]:
        return [block_out_channels(stage[-1]) for stage in self._stages]

    def _add_drop_path(self, rate: float) -> None:
        """Stochastic depth on every block's residual branch, rising linearly from 0 at the first block
        to `rate` at the last (timm's make_blocks rule)."""
        blocks = [block for stage in self._stages for block in stage]
        for index, block in enumerate(blocks):
            block_rate = rate * index / (len(blocks) - 1)
            block.drop_path = DropPath(block_rate) if block_rate > 0 else None

    def _feature_info(self) -> list[dict[str, Any]]:
        """timm's feature_info: the stem (before the max pool) and each stage's output, taken after a
        stage_end module where one sits there."""
        info = [dict(num_chs=self.conv1.out_channels, reduction=2, module="relu")]
        for number, channels in enumerate(self.stage_channels):
            after = self.stage_attn is not None and not isinstance(self.stage_attn[number], nn.Identity)
            info.append(dict(num_chs=channels, reduction=2 ** (number + 2),
                             module=f"stage_attn.{number}" if after else f"layer{number + 1}"))
        return info

    def _add_attention(self, kind: AttentionKind, integration: str | None, per_stage: list[dict[str, Any]]) -> None:
        """A plain method's modules, where its table entry puts them (branch, stage_end or block)."""
        carried = kind.stages or range(1, len(self._stages) + 1)
        if kind.stages is not None and max(kind.stages) > len(self._stages):
            raise ValueError(
                f"{kind.name} sits in stages {kind.stages} but {self.backbone_name} has {len(self._stages)}"
            )
        if kind.place == "branch":
            for number in carried:
                stage = self._stages[number - 1]
                for index in attention_blocks(integration, len(stage)):
                    stage[index].attn = _named_errors(kind, per_stage[number - 1], create_attention,
                                                      kind, block_out_channels(stage[index]), per_stage[number - 1])
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

    def _add_emca(self, kind: AttentionKind, integration: str, per_stage: list[dict[str, Any]], gating: str,
                  align: str) -> None:
        """An EMCA module on the chosen blocks of each stage, reading the earlier block outputs that the
        coverage region names (coverage_sources: output indices, 0 the stem)."""
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

    def _run_stages(self, x: torch.Tensor, taps: Sequence[int] = (), last: Optional[int] = None):
        """The stages 1..last from the stem's max-pooled output; returns (x, [stage outputs in taps])."""
        descriptors = Descriptors(self)
        outputs = []
        for number, stage in enumerate(self._stages[:last]):
            x = stage(x, descriptors)
            if self.stage_attn is not None:
                x = self.stage_attn[number](x)
            if number + 1 in taps:
                outputs.append(x)
        return x, outputs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self._run_stages(x)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, list[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[list[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]:
        """timm's forward_intermediates (as its ResNet's): feature 0 is the stem before the max pool,
        1-4 the stages' outputs (feature_info). `indices`: the last n if an int, all if None, else
        those listed; `norm` does nothing (a ResNet has no final norm)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self._stages) + 1, indices)
        x = self.relu(self.bn1(self.conv1(x)))
        intermediates = [x] if 0 in take_indices else []
        x = self.maxpool(x)
        x, stages = self._run_stages(x, take_indices, max_index if stop_early else len(self._stages))
        intermediates += stages
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(
        self, indices: Union[int, list[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last one `indices` takes (and the head), as timm's ResNet does."""
        take_indices, max_index = feature_take_indices(len(self._stages) + 1, indices)
        for number in range(max_index, len(self._stages)):
            setattr(self, f"layer{number + 1}", Stage())  # empty, not Identity: checkpoint_seq iterates it
            if self.stage_attn is not None:
                self.stage_attn[number] = nn.Identity()
        self._stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        if max_index == 0:
            self.maxpool = nn.Identity()
        if max_index < len(self._stages):
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or max_index < len(self._stages):
            self.reset_classifier(0, "")
        return take_indices

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter groups (layer-wise decay): the stem, then each block (or stage); a
        stage_end module joins the stage it follows; the classifier, unmatched, comes last."""
        blocks = r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)"
        if self.stage_attn is None:
            return dict(stem=r"^conv1|bn1|maxpool", blocks=blocks)
        after = [(rf"^stage_attn\.{number}\.", (number + 1, MATCH_PREV_GROUP[0]))
                 for number in range(len(self._stages))]
        return dict(stem=r"^conv1|bn1|maxpool", blocks=[(blocks, None), *after])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier (0 classes: none, the model returns pooled features) and optionally pool."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative integer (0: no classifier), got {num_classes!r}")
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {list(GLOBAL_POOLS)}, got {global_pool!r}")
        weight = self.conv1.weight
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool,
                                                      device=weight.device, dtype=weight.dtype)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def architecture(self) -> dict[str, Any]:
        """What a checkpoint must match to be loaded into this model."""
        return {
            "backbone": self.backbone_name,
            "attention": self.attention_name,
            "coverage": None
            if self.coverage is None
            else {"stages": self.coverage.stages, "blocks": self.coverage.blocks},
            "num_classes": self.num_classes,
        }

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False):
        """nn.Module.load_state_dict, with weights that do not fit refused in one line (torch's error
        lists every key on lines of its own): a checkpoint of another architecture, given to timm's
        checkpoint_path= or loaded by hand."""
        problem = weights_mismatch(self, state_dict, strict)
        if problem:
            raise WeightsMismatchError(f"these weights do not fit {self.describe()}: {problem}")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def describe(self) -> str:
        """One line: backbone / attention / coverage / classes."""
        return describe_architecture({"architecture": self.architecture()})


class WeightsMismatchError(RuntimeError):
    """A state_dict whose keys or shapes do not fit the model (RuntimeError, as torch's); one line."""


def weights_mismatch(model: nn.Module, state_dict: Any, strict: bool = True, skip: Sequence[str] = ()) -> str:
    """What keeps `state_dict` from loading into `model` ('' when it fits): missing and unexpected
    keys (when strict) and tensors of another shape; keys starting with one of `skip` are not checked."""
    if not hasattr(state_dict, "keys"):
        return f"a state_dict is a mapping of parameter names to tensors, got {type(state_dict).__name__}"
    def checked(key: str) -> bool:
        return not any(key.startswith(prefix) for prefix in skip)

    own = {key: value for key, value in model.state_dict().items() if checked(key)}
    given = {key: value for key, value in state_dict.items() if checked(key)}
    shapes = [f"{key}: {tuple(given[key].shape)}, here {tuple(value.shape)}" for key, value in own.items()
              if key in given and hasattr(given[key], "shape") and tuple(given[key].shape) != tuple(value.shape)]
    missing = [key for key in own if key not in given] if strict else []
    unexpected = [key for key in given if key not in own] if strict else []

    def listed(what: str, keys: list[str]) -> str:
        return f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"

    parts = [listed(what, keys) for what, keys in
             (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if keys]
    return "; ".join(parts)


# The keywords of timm's create_model and build_model_with_cfg that an entrypoint passes on.
TIMM_KEYWORDS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir",
                 "features_only", "out_indices", "feature_cls")


def accepted_keywords(backbone_fixed: bool = False) -> dict[str, list[str]]:
    """The keywords EMCAResNet takes, by kind: its own arguments (without `backbone` where a timm
    name fixes it), the attention table's options and, for an entrypoint, timm's."""
    own = [name for name, parameter in inspect.signature(EMCAResNet.__init__).parameters.items()
           if parameter.kind is parameter.POSITIONAL_OR_KEYWORD and name != "self"]
    accepted = {"model": [name for name in own if not (backbone_fixed and name == "backbone")],
                "attention options": sorted(option_defaults())}
    if backbone_fixed:
        accepted["timm"] = list(TIMM_KEYWORDS)
    return accepted


def unknown_keyword(owner: str, keyword: str, accepted: dict[str, list[str]]) -> str:
    """The one-line error for an unknown keyword argument, naming the accepted ones."""
    names = [name for group in accepted.values() for name in group]
    close = difflib.get_close_matches(keyword, names, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    listed = "; ".join(f"{group}: {', '.join(group_names)}" for group, group_names in accepted.items())
    return f"{owner}() got an unexpected keyword argument '{keyword}'{hint}; it accepts {listed}"


def _named_errors(kind: AttentionKind, options: dict[str, Any], build, *args, **kwargs):
    """build(*args, **kwargs); a module's ValueError names the config fields in play, so that the
    one-line error says which option to change (BAM's "combine must be one of ..." alone does not)."""
    try:
        return build(*args, **kwargs)
    except ValueError as error:
        given = ", ".join(f"attention.{kind.field(key)}={shown(value)}" for key, value in options.items())
        raise ValueError(f"attention={kind.name}: {error}" + (f" (with {given})" if given else "")) from None


def _check_arguments(owner: str, backbone: str, attention: str, integration: str | None, num_classes: Any,
                     in_chans: Any, rates: dict[str, Any], global_pool: str, options: dict[str, Any]) -> None:
    """EMCAResNet's arguments, each refused in one line before anything is built."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone '{backbone}': choose one of {list(BACKBONES)}")
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention '{attention}': choose one of {list(ATTENTIONS)}")
    _check_integration(attention, integration)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be a non-negative integer (0: no classifier), got {num_classes!r}")
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans must be a positive integer, got {in_chans!r}")
    for name, rate in rates.items():
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise ValueError(f"{name} must be a probability in [0, 1), got {rate!r}")
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be one of {list(GLOBAL_POOLS)}, got {global_pool!r}")
    unknown = sorted(set(options) - set(option_defaults()))
    if unknown:
        raise TypeError(unknown_keyword(owner, unknown[0], accepted_keywords()))
    for key, default in option_defaults().items():  # bool("false") would silently be True
        if isinstance(default, bool) and not isinstance(options.get(key, default), bool):
            raise ValueError(f"{key} must be true or false, got {options[key]!r}")


def _check_integration(attention: str, integration: str | None) -> None:
    if integration is None or attention == "none":
        return
    if integration not in INTEGRATIONS:
        raise ValueError(f"integration must be one of {INTEGRATIONS}, got '{integration}'")
    kind = kind_of(attention)
    if default_integration(attention) is None:  # not a branch gate (EMCA is one, whatever its W_m2's method)
        raise ValueError(f"integration={integration} applies to branch attention, but {attention} sits at "
                         f"{kind.place.replace('_', ' ')} (see its table entry): leave attention.integration unset")
