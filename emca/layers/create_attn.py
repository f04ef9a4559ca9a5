"""The attention table: the one place an attention method is declared (as timm's create_attn).

An AttentionKind names the method's module, what its excitation pools, where it sits in a ResNet,
its options with their defaults, and whether its excitation can serve as EMCA's W_m2. Everything
else is derived from ATTENTION_KINDS:
- ATTENTIONS, the names `attention=` accepts: none, every kind, and emca_<name> for each kind
  with an excitation (EMCA-SE, EMCA-CBAM, ...);
- the timm registry names (emca.models.registry), the Hydra `attention` choices and the config
  schema's option fields `<name>_<option>` (emca.models.config);
- which options each attention reads (emca.analysis.variants) and the table presets' rows.

Adding a method: write its module in emca/layers/<method>.py and add one AttentionKind below.

Where a method sits (`place`):
- branch: gates (or otherwise transforms) a block's residual branch before the shortcut add, in
  the blocks `integration` picks (all | first | last of each stage), as SE does.
- stage_end: transforms a whole stage's output, as BAM does between stages.
- block: changes the block itself; `module(block, **options)` edits a torchvision block in place
  (replaces its 3x3 convolution, as EPSANet, or appends a module to its output, as A2-Nets), in
  the blocks `positions(stage_depths)` lists (every block by default).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from torch import nn

from emca.layers.bam import BAM
from emca.layers.cbam import CBAM, CBAMChannelExcitation
from emca.layers.ceca import CECAExcitation
from emca.layers.channel_attention import ChannelAttention
from emca.layers.coord_attention import CoordAttention
from emca.layers.double_attention import a2_block, a2_positions
from emca.layers.effective_se import EffectiveSE, ESEExcitation
from emca.layers.epsanet import epsa_block
from emca.layers.excitation import ECAExcitation, SEExcitation, SRMExcitation
from emca.layers.fcanet import MultiSpectralAttention
from emca.layers.gather_excite import GatherExcite, GatherExcitePlus
from emca.layers.gct import GCTExcitation, gct_block
from emca.layers.global_context import GlobalContext
from emca.layers.non_local import nl_block, nl_positions
from emca.layers.pooling import POOLINGS
from emca.layers.selective_kernel import sk_block
from emca.layers.sge import spatial_group_enhance
from emca.layers.shuffle_attention import shuffle_attention
from emca.layers.simam import SIMAM_LAMBDA, simam_block
from emca.layers.triplet_attention import TripletAttention

PLACES = ("branch", "stage_end", "block")
INTEGRATIONS = ("all", "first", "last")
EMCA_PREFIX = "emca_"


@dataclass(frozen=True)
class AttentionKind:
    name: str  # attention=<name>; its options are the config fields <name>_<option>
    label: str  # how the paper's tables print it
    place: str  # branch | stage_end | block (module docstring)
    # branch / stage_end: module(channels, **options); block: module(block, **options) edits the block.
    # A branch kind without a module is plain channel attention: pool, excitation, sigmoid, gate.
    module: Optional[Callable[..., Any]] = None
    # (channels, **options) -> (B, C, K) descriptor to (B, C) gate logits; `pooling` names the
    # descriptor. A kind with an excitation is also offered as EMCA's W_m2 (attention=emca_<name>).
    excitation: Optional[Callable[..., nn.Module]] = None
    pooling: Optional[str] = None
    options: Mapping[str, Any] = field(default_factory=dict)  # option -> default
    per_stage: tuple[str, ...] = ()  # options that may instead list one value per stage
    stages: Optional[tuple[int, ...]] = None  # the (1-based) stages that carry it; None: all
    positions: Optional[Callable[[Sequence[int]], tuple[tuple[int, int], ...]]] = None  # block kinds

    def __post_init__(self):
        if self.name == "none" or self.name.startswith(EMCA_PREFIX) or not self.name.isidentifier():
            raise ValueError(f"attention kind '{self.name}': a name is an identifier, not 'none' nor emca_*")
        if self.place not in PLACES:
            raise ValueError(f"attention kind {self.name}: place must be one of {PLACES}, got '{self.place}'")
        if (self.excitation is None) != (self.pooling is None) or (self.pooling and self.pooling not in POOLINGS):
            raise ValueError(f"attention kind {self.name}: an excitation needs a pooling of {list(POOLINGS)}")
        if self.module is None and (self.place != "branch" or self.excitation is None):
            raise ValueError(f"attention kind {self.name}: give a module, or an excitation for plain channel attention")
        if self.stages is not None and (self.place == "block" or min(self.stages, default=0) < 1):
            raise ValueError(f"attention kind {self.name}: stages are 1-based and for branch / stage_end methods")
        if self.positions is not None and self.place != "block":
            raise ValueError(f"attention kind {self.name}: positions are for block methods (stages for the others)")

    def field(self, option: str) -> str:
        """The config field of one of its options: se + reduction -> se_reduction."""
        return f"{self.name}_{option}"


# Each entry's published figures (parameters, GFLOPs, top-1 of its ResNet-50) and their sources are
# in emca/analysis/method_reference.py; tests/test_attention_table.py checks our models against them.
ATTENTION_KINDS: tuple[AttentionKind, ...] = (
    # SE's bias=True is Hu et al.'s (timm's SEModule); the table presets use False, the EMCA authors' SE
    # whose parameter counts the paper prints (docs/paper.md#parameter-counts).
    AttentionKind("se", "SE", "branch", excitation=SEExcitation, pooling="mean",
                  options={"reduction": 16, "bias": True}),
    # kernel: 'adaptive' (ECA's formula per stage) or one odd size per stage, e.g. [3, 5, 5, 7].
    AttentionKind("eca", "ECA", "branch", excitation=ECAExcitation, pooling="mean",
                  options={"kernel": "adaptive"}, per_stage=("kernel",)),
    AttentionKind("srm", "SRM", "branch", excitation=SRMExcitation, pooling="mean_std"),
    # Channel gate (shared MLP over mean and max; EMCA-CBAM's W_m2), then the 7x7 spatial gate.
    AttentionKind("cbam", "CBAM", "branch", module=CBAM, excitation=CBAMChannelExcitation, pooling="mean_max",
                  options={"reduction": 16, "spatial_kernel": 7}),
    # combine: sum (the paper's Eq. 2) or product (the authors' code) of the channel and spatial branches.
    AttentionKind("bam", "BAM", "stage_end", module=BAM, options={"reduction": 16, "dilation": 4, "combine": "sum"},
                  stages=(1, 2, 3)),
    # dct_size: the DCT grid per stage, the stage's feature size at 224 px (FcaNet's c2wh); a block's
    # branch is average-pooled to it when its size differs.
    AttentionKind("fca", "FcaNet", "branch", module=MultiSpectralAttention,
                  options={"dct_size": (56, 28, 14, 7), "reduction": 16, "frequencies": "top16"},
                  per_stage=("dct_size",)),
    # groups: 64 as the paper, capped at channels // 2 (ResNet-18/34's 64-channel stage: 32).
    AttentionKind("sa", "SANet", "branch", module=shuffle_attention, options={"groups": 64}),
    # The PSA convolution in place of each block's 3x3 (EPSANet-50 "small", the released model).
    AttentionKind("epsa", "EPSANet", "block", module=epsa_block, options={"size": "small", "reduction": 16}),
    # Double attention after the blocks a2_positions lists (the paper's R-50: 2 in res3, 3 in res4).
    AttentionKind("a2", "A2-Nets", "block", module=a2_block, positions=a2_positions),
    # Global context block in every block of stages 2-4 (GCNet's c3-c5), bottleneck ratio 1/16.
    AttentionKind("gc", "GC", "branch", module=GlobalContext, options={"reduction": 16}, stages=(2, 3, 4)),
    # Effective SE (VoVNetV2): one C -> C layer with bias, hard-sigmoid gate; its W_m2 (emca_ese) keeps
    # EMCA's sigmoid, as every W_m2 does (emca/layers/effective_se.py).
    AttentionKind("ese", "ESE", "branch", module=EffectiveSE, excitation=ESEExcitation, pooling="mean"),
    # Circular ECA (timm's CecaModule): ECA's channel convolution, wrapped around; kernel as ECA's.
    AttentionKind("ceca", "CECA", "branch", excitation=CECAExcitation, pooling="mean",
                  options={"kernel": "adaptive"}, per_stage=("kernel",)),
    # Coordinate attention where SE sits, the authors' widths: bottleneck max(min_hidden, C // reduction).
    AttentionKind("coord", "CoordAtt", "branch", module=CoordAttention, options={"reduction": 32, "min_hidden": 8}),
    # Parameter-free SimAM after every block's 3x3 convolution (the authors' ImageNet ResNets), lambda 0.1.
    AttentionKind("simam", "SimAM", "block", module=simam_block, options={"e_lambda": SIMAM_LAMBDA}),
    # Gather-Excite without parameters (the authors' RN50-GEPF): mean over the extent, sigmoid, gate;
    # extent: 'global' or 2 / 4 / 8 (average pooling, nearest-neighbour excite), or one per stage.
    AttentionKind("ge_theta_minus", "GE-theta-", "branch", module=GatherExcite, options={"extent": "global"},
                  per_stage=("extent",)),
    # GE-theta+ (RN50-GEPP): a depthwise gather over the stage's whole 224 px map (feature_size), BN, ReLU,
    # then SE's excitation (r 16, biases); extent 2 / 4 / 8: strided 3x3 depthwise gathers instead.
    AttentionKind("ge_theta_plus", "GE-theta+", "branch", module=GatherExcitePlus,
                  options={"extent": "global", "feature_size": (56, 28, 14, 7), "reduction": 16},
                  per_stage=("extent", "feature_size")),
    # A GCT in front of every conv of every block, shortcut's included (the authors' GCT-ResNet-50); convs: all |
    # first | last. Its excitation on the l2 embedding is EMCA-GCT's W_m2 (emca.layers.gct: under EMCA's sigmoid).
    AttentionKind("gct", "GCT", "block", module=gct_block, excitation=GCTExcitation, pooling="l2",
                  options={"convs": "all"}),
    # The SK convolution in place of each bottleneck's 3x3 (+BN; a basic block's first 3x3, as timm's skresnet18/34):
    # SKNet-50's unit, 3x3 and 3x3 dilated 2, G = 32, d = max(C / 16, 32).
    AttentionKind("sk", "SK", "block", module=sk_block, options={"groups": 32, "reduction": 16, "min_channels": 32}),
    # One non-local block (embedded Gaussian, inner width C/2, zero-init BN) on res4's next-to-last unit
    # output: the "+1 NL" of the NL paper's COCO models and GCNet's / Table 6's detection rows.
    AttentionKind("nl", "NL", "block", module=nl_block, positions=nl_positions,
                  options={"reduction": 2, "use_scale": True, "pairwise": "embedded_gaussian", "subsample": False}),
    # The NL paper's 5-block model: after every other unit of res3 (2) and res4 (3), as A2-Nets' positions.
    AttentionKind("nl5", "NL (5 blocks)", "block", module=nl_block, positions=a2_positions,
                  options={"reduction": 2, "use_scale": True, "pairwise": "embedded_gaussian", "subsample": False}),
    # Triplet attention in every block: C-W, H-C and H-W gates (Z-pool, k x k conv, BN), averaged; k = 7.
    AttentionKind("triplet", "Triplet", "branch", module=TripletAttention, options={"kernel": 7}),
    # Spatial group-wise enhance in every block, 64 groups (capped at a stage's width; must divide it).
    AttentionKind("sge", "SGE", "branch", module=spatial_group_enhance, options={"groups": 64}),
)

KINDS: dict[str, AttentionKind] = {kind.name: kind for kind in ATTENTION_KINDS}
if len(KINDS) != len(ATTENTION_KINDS):
    raise ValueError("ATTENTION_KINDS declares a name twice")
ATTENTIONS: tuple[str, ...] = (
    "none",
    *KINDS,
    *(EMCA_PREFIX + kind.name for kind in ATTENTION_KINDS if kind.excitation is not None),
)


def is_emca(attention: str) -> bool:
    return attention.startswith(EMCA_PREFIX)


def kind_of(attention: str) -> AttentionKind:
    """The table entry of an attention name (emca_cbam -> cbam); ValueError naming the choices."""
    if attention not in ATTENTIONS or attention == "none":
        raise ValueError(f"unknown attention '{attention}': choose one of {list(ATTENTIONS)}")
    return KINDS[attention.removeprefix(EMCA_PREFIX)]


def option_defaults() -> dict[str, Any]:
    """Every method option as its config field, with its default: {'se_reduction': 16, ...}."""
    return {kind.field(option): default for kind in ATTENTION_KINDS for option, default in kind.options.items()}


def reads(attention: str) -> tuple[str, ...]:
    """The config fields of the method options that this attention's modules read."""
    if attention == "none":
        return ()
    kind = kind_of(attention)
    used = _accepted(kind.excitation, kind.options) if is_emca(attention) else kind.options
    return tuple(kind.field(option) for option in used)


def default_integration(attention: str) -> Optional[str]:
    """Which blocks of each stage carry a branch attention when the config does not say: every block
    for the plain methods (their dense integration), the first one for EMCA (docs/paper.md#integration). None for
    methods that sit elsewhere (stage_end, block): their table entry says where. An EMCA version always gates
    a branch, whatever its method's place (EMCA-GCT: GCT sits before convs, its excitation in EMCA)."""
    if attention == "none" or (kind_of(attention).place != "branch" and not is_emca(attention)):
        return None
    return "first" if is_emca(attention) else "all"


def kind_options(kind: AttentionKind, fields: Mapping[str, Any], stage: int, num_stages: int) -> dict[str, Any]:
    """A kind's options for one stage (0-based), from config fields (missing ones: the default)."""
    options = {}
    for option, default in kind.options.items():
        value = fields.get(kind.field(option), default)
        if option in kind.per_stage and isinstance(value, (list, tuple)):
            if len(value) != num_stages:
                raise ValueError(
                    f"attention.{kind.field(option)} lists {len(value)} values but the backbone has {num_stages} "
                    f"stages: give one per stage or a single value"
                )
            value = value[stage]
        options[option] = value
    return options


def create_attention(kind: AttentionKind, channels: int, options: Mapping[str, Any]) -> nn.Module:
    """A branch or stage_end module of `channels` channels."""
    if kind.module is None:
        return ChannelAttention(create_excitation(kind, channels, options), kind.pooling)
    return kind.module(channels, **options)


def create_excitation(kind: AttentionKind, channels: int, options: Mapping[str, Any]) -> nn.Module:
    """The kind's excitation, given the options it accepts (CBAM's spatial kernel is not its excitation's)."""
    return kind.excitation(channels, **_accepted(kind.excitation, options))


def _accepted(function: Callable[..., Any], options: Mapping[str, Any]) -> dict[str, Any]:
    parameters = inspect.signature(function).parameters
    return {key: value for key, value in options.items() if key in parameters}
