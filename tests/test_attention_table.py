"""The attention table (emca/layers/create_attn.py): every method builds and trains on every depth,
sits where its entry says, has its own paper's ResNet-50 size, and leaves the methods of v0.1 as
they were (same state_dict keys, so existing checkpoints load)."""

import functools

import pytest
import timm
import torch

from emca.analysis.method_reference import METHOD_REFERENCES
from emca.common.checkpoint_file import architecture_fingerprint
from emca.layers import EMCA
from emca.layers.cbam import CBAMChannelExcitation
from emca.layers.create_attn import (
    ATTENTION_KINDS,
    ATTENTIONS,
    KINDS,
    AttentionKind,
    default_integration,
    is_emca,
    option_defaults,
    reads,
)
from emca.models import EMCAResNet, attention_modules
from emca.models.config import AttentionConfig
from emca.models.summary import count_parameters, measure_gflops, stage_layout

# architecture_fingerprint()["state_dict_sha256"][:16] of each v0.1 model (commit bb5e214), by backbone.
V01_STATE_DICT_DIGESTS = {
    "resnet18": {"none": "3e58b0798c806a0c", "se": "c07fdab6344184d4", "eca": "ddc677514b9dde3a",
                 "srm": "0e4e9e220a524aa9", "emca_se": "0f5bfd457d5c201f", "emca_eca": "53fb4a7fcde3cc5d",
                 "emca_srm": "6c1876a4f04cf734"},
    "resnet50": {"none": "781bb16f43b8f96f", "se": "eace348c71c650ae", "eca": "7de51a9558130c5a",
                 "srm": "1a99d2be371ffadb", "emca_se": "15cc373d5c85598c", "emca_eca": "c6f3a7381c4d9eb0",
                 "emca_srm": "3156fa68aa3b2a4f"},
}
BRANCH = [a for a in ATTENTIONS if default_integration(a) and not is_emca(a)]


@pytest.mark.parametrize("backbone", sorted(V01_STATE_DICT_DIGESTS))
def test_the_methods_of_v01_keep_their_state_dict_layout(backbone):
    for attention, digest in V01_STATE_DICT_DIGESTS[backbone].items():
        model = EMCAResNet(backbone, attention=attention)
        assert architecture_fingerprint(model)["state_dict_sha256"][:16] == digest, attention


def test_everything_is_derived_from_the_table():
    with_excitation = [kind.name for kind in ATTENTION_KINDS if kind.excitation is not None]
    assert ATTENTIONS == ("none", *KINDS, *(f"emca_{name}" for name in with_excitation))
    assert "emca_cbam" in ATTENTIONS and "emca_bam" not in ATTENTIONS  # BAM has no excitation
    names = set(timm.list_models("emca_*"))
    for name in ATTENTIONS[1:]:
        assert (f"{name}_resnet50" if is_emca(name) else f"emca_resnet50_{name}") in names
    assert timm.create_model("emca_resnet18_bam", num_classes=3).attention_name == "bam"
    # One schema field per table option, with the table's default.
    assert {key: getattr(AttentionConfig, key) for key in option_defaults()} == option_defaults()
    assert reads("emca_cbam") == ("cbam_reduction",)  # the spatial kernel is not W_m2's
    assert reads("cbam") == ("cbam_reduction", "cbam_spatial_kernel") and reads("srm") == ()


# Every attention on the basic block; on the bottleneck those whose module depends on the block
# (the published-size test builds every R-50 at 224 px as well).
STEPS = [(a, 18) for a in ATTENTIONS[1:]] + [(a, 50) for a in ("fca", "sa", "epsa", "a2", "bam", "emca_cbam", "sk")]


@pytest.mark.parametrize("attention,depth", STEPS)
def test_every_attention_trains_a_step(attention, depth):
    torch.manual_seed(0)
    model = EMCAResNet(f"resnet{depth}", attention=attention, num_classes=4).train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    plain = EMCAResNet(f"resnet{depth}", num_classes=4).train()
    attention_params = [n for n in before if n not in plain.state_dict()]
    if not attention_params:  # a parameter-free method (SimAM, GE-theta-): it must still change the network's output
        plain.load_state_dict(model.state_dict())
        assert not torch.allclose(plain(x), logits), f"{attention} neither adds parameters nor changes the output"
        return
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3])).backward()
    optimizer.step()
    # Every parameter of the method took part (some start where their gradient is zero by design:
    # CBAM's spatial BN scale and GC's last layer start at 0, so what follows them gets none yet).
    moved = [n for n in attention_params if not torch.equal(before[n], dict(model.named_parameters())[n])]
    assert moved, f"no parameter of {attention} changed after a step"


@functools.lru_cache(maxsize=None)
def plain_parameters(depth: int) -> int:
    return count_parameters(EMCAResNet(f"resnet{depth}"))


# ResNet-34 for every attention; ResNet-101 (152 has its blocks, more of them) where the depth decides
# where the method sits (A2-Nets' positions, GC's and BAM's stages) or its widths (FcaNet, SA-Net, EPSANet).
BUILDS = [(a, 34) for a in ATTENTIONS[1:]] + [(a, 101) for a in ("a2", "gc", "bam", "fca", "sa", "epsa", "nl")]


@pytest.mark.parametrize("attention,depth", BUILDS)
def test_every_attention_builds_on_the_other_depths(attention, depth):
    model = EMCAResNet(f"resnet{depth}", attention=attention)
    assert any(type(module).__module__.startswith("emca.layers.") for module in model.modules()), attention
    added = count_parameters(model) - plain_parameters(depth)
    # PSA convolutions, and SK ones with their 32 groups, are smaller than the dense 3x3s they replace; a
    # parameter-free method adds none on any depth.
    # (The R-18 model is built only for a method that adds nothing here.)
    assert added > 0 or attention in ("epsa", "sk") or (
        added == 0 and count_parameters(EMCAResNet("resnet18", attention=attention)) == plain_parameters(18))


@pytest.mark.parametrize("attention", BRANCH)
def test_integration_picks_the_blocks_of_a_branch_method(attention):
    kind = KINDS[attention]
    for integration, expected in (("all", [0, 1, 2]), ("first", [0]), ("last", [2])):
        model = EMCAResNet("resnet50", attention=attention, integration=integration)
        for number, stage in enumerate(model._stages, 1):
            carried = [i for i, block in enumerate(stage) if block.attn is not None]
            wanted = expected if integration != "last" else [len(stage) - 1]
            wanted = wanted if integration != "all" else list(range(len(stage)))
            assert carried == (wanted if kind.stages is None or number in kind.stages else []), (integration, number)


@pytest.mark.parametrize("attention", ["bam", "epsa", "a2", "nl"])
def test_integration_is_refused_where_a_method_is_no_branch_gate(attention):
    EMCAResNet("resnet18", attention=attention, integration=None)
    with pytest.raises(ValueError, match="leave attention.integration unset") as error:
        EMCAResNet("resnet18", attention=attention, integration="first")
    assert "\n" not in str(error.value)


def test_bam_sits_after_stages_1_to_3_and_a2_after_the_papers_blocks():
    bam = EMCAResNet("resnet50", attention="bam")
    assert [type(m).__name__ for m in bam.stage_attn] == ["BAM", "BAM", "BAM", "Identity"]
    a2 = EMCAResNet("resnet50", attention="a2")
    assert [(s, i) for s, stage in enumerate(a2._stages) for i, b in enumerate(stage) if b.after is not None] == [
        (1, 1), (1, 3), (2, 1), (2, 3), (2, 5)]
    epsa = EMCAResNet("resnet50", attention="epsa")
    assert all(type(block.conv2).__name__ == "PSAConv" for stage in epsa._stages for block in stage)
    sk = EMCAResNet("resnet50", attention="sk")  # the bottleneck's 3x3 and its BN; a basic block's first 3x3
    assert all(type(b.conv2).__name__ == "SKConv" and type(b.bn2) is torch.nn.Identity for s in sk._stages for b in s)
    sk18 = EMCAResNet("resnet18", attention="sk")
    assert all(type(b.conv1).__name__ == "SKConv" and type(b.conv2) is torch.nn.Conv2d for s in sk18._stages for b in s)


@functools.lru_cache(maxsize=None)
def r50_cost(attention: str) -> tuple[int, float]:
    torch.manual_seed(0)
    model = EMCAResNet("resnet50", attention=attention)
    return count_parameters(model), measure_gflops(model, 224)


@pytest.mark.parametrize("name", sorted(METHOD_REFERENCES))
def test_resnet50_has_the_methods_published_size(name):
    """#P to the printed digits (decimal millions); GFLOPs as the increment over the same paper's plain
    ResNet-50, within the printed digits' rounding of both figures."""
    reference = METHOD_REFERENCES[name]
    params, gflops = r50_cost(name)
    # A figure no text source prints (None) is not compared; its note says what the source does print.
    params_match = reference.params is None or round(params / 1e6, reference.params_digits) == reference.params
    increment = gflops - r50_cost("none")[1]
    gflops_match = reference.gflops is None or (
        abs(increment - (reference.gflops - reference.base_gflops)) <= 10 ** -reference.gflops_digits)
    assert (params_match and gflops_match) == reference.reproduced, (params / 1e6, increment, reference)
    assert reference.reproduced or reference.note
    assert None not in (reference.params, reference.gflops, reference.top1) or reference.note


def test_emca_cbam_hand_computed():
    """EMCA with CBAM's channel excitation (mean+max pooled, one shared MLP) on a 2-channel block
    covering one 1-channel source, every number by hand."""
    excitation = CBAMChannelExcitation(2, reduction=2, bias=False)  # hidden width 1
    with torch.no_grad():
        excitation.fc1.weight.copy_(torch.tensor([[1.0, -1.0]]))
        excitation.fc2.weight.copy_(torch.tensor([[2.0], [-1.0]]))
    module = EMCA(2, [1], excitation, pooling="mean_max")
    with torch.no_grad():
        module.scale_weights.copy_(torch.tensor([1.0, 0.5]))
    y = torch.tensor([[[[1.0, 3.0]], [[0.0, -2.0]]]])  # channel means 2, -1; maxima 3, 0
    source = torch.tensor([[[[2.0, 6.0]]]])  # mean 4, max 6, repeated to both channels
    descriptor = torch.stack((source.mean(dim=(2, 3)), source.amax(dim=(2, 3))), dim=-1)
    # fused = relu(1 * own + 0.5 * source): means (2 + 2, -1 + 2) = (4, 1), maxima (3 + 3, 0 + 3) = (6, 3)
    # MLP: hidden = relu(4 - 1) = 3 and relu(6 - 3) = 3; logits = (2, -1) * 3 + (2, -1) * 3 = (12, -6)
    expected = y * torch.sigmoid(torch.tensor([12.0, -6.0]))[None, :, None, None]
    torch.testing.assert_close(module(y, [descriptor]), expected)


def test_emca_cbam_gradients_reach_every_weight():
    torch.manual_seed(0)
    model = EMCAResNet("resnet18", attention="emca_cbam", coverage="all_stages_all", num_classes=3)
    for module in attention_modules(model).values():
        # Positive weights (all negative ones would let the ReLU stop every gradient); stage 1 fuses nothing.
        if module.scale_weights is not None:
            torch.nn.init.uniform_(module.scale_weights, 0.2, 1.0)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    for name, parameter in model.named_parameters():
        if ".attn." in name:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_a_malformed_entry_is_refused_where_it_is_declared():
    with pytest.raises(ValueError, match="place must be one of"):
        AttentionKind("x", "X", "somewhere", module=torch.nn.Identity)
    with pytest.raises(ValueError, match="needs a pooling"):
        AttentionKind("x", "X", "branch", excitation=CBAMChannelExcitation)
    with pytest.raises(ValueError, match="give a module"):
        AttentionKind("x", "X", "stage_end")
    for name in ("none", "emca_x", "two words"):
        with pytest.raises(ValueError, match="a name is an identifier"):
            AttentionKind(name, "X", "stage_end", module=torch.nn.Identity)
    with pytest.raises(ValueError, match="stages are 1-based"):
        AttentionKind("x", "X", "stage_end", module=torch.nn.Identity, stages=(0, 1))
    with pytest.raises(ValueError, match="positions are for block methods"):
        AttentionKind("x", "X", "branch", module=torch.nn.Identity, positions=lambda depths: ())


def test_the_summary_shows_where_every_place_of_method_sits():
    rows = {name: stage_layout(EMCAResNet("resnet50", attention=name)) for name in ("bam", "a2", "gc", "epsa")}
    assert [row["stage_end"] for row in rows["bam"]] == [True, True, True, False]
    assert [row["attention_blocks"] for row in rows["a2"]] == [[], [1, 3], [1, 3, 5], []]
    assert [row["attention_blocks"] for row in rows["gc"]] == [[], [0, 1, 2, 3], list(range(6)), [0, 1, 2]]
    assert [row["attention_blocks"] for row in rows["epsa"]] == [list(range(n)) for n in (3, 4, 6, 3)]


@pytest.mark.parametrize("attention", ["cbam", "fca", "emca_cbam", "se"])
def test_learned_scales_read_every_per_channel_gate(attention):
    from emca.analysis.scales import LearnedScales

    model = EMCAResNet("resnet18", attention=attention, num_classes=3).eval()
    scales = LearnedScales(model, torch.device("cpu"))
    with torch.no_grad(), scales.recording():
        model(torch.randn(2, 3, 32, 32))
    rows = scales.statistics()
    assert [(row["stage"], row["channels"], row["images"]) for row in rows] == [
        (stage, channels, 2) for stage, channels in enumerate((64, 128, 256, 512), 1)]
    assert all(0 < row["mean"] < 1 for row in rows)
    # Methods without per-channel scales (BAM's gate is a map, GC adds, EPSANet softmaxes branches) have none.
    assert not attention_modules(EMCAResNet("resnet18", attention="bam"))
