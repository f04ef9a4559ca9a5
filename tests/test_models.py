"""Model library: torchvision parity, published parameter counts, the paper's formulas (docs/paper.md), EMCA
numerics."""

import functools
import math
import subprocess
import sys

import pytest
import timm
import torch
import torchvision
from torch import nn

import emca.models.resnet as resnet_module
from emca.layers import EMCA, ECAExcitation, SEExcitation, SRMExcitation, eca_kernel_size
from emca.layers.channel_attention import ChannelAttention
from emca.models import COVERAGE_PRESETS, attention_modules, build_model, coverage_sources
from emca.models.coverage import CoverageRegion
from emca.models.resnet import EMCAResNet
from emca.models.summary import count_parameters, measure_gflops, stage_layout

DEPTHS = (18, 34, 50, 101, 152)
PRESETS = ("none", "prev_stage_last", "prev_stage_all", "all_stages_last", "all_stages_all")


@pytest.mark.parametrize("depth", DEPTHS)
def test_plain_model_is_torchvision_resnet(depth):
    torch.manual_seed(0)
    ours = timm.create_model(f"emca_resnet{depth}", attention="none").eval()
    reference = getattr(torchvision.models, f"resnet{depth}")().eval()
    assert list(ours.state_dict()) == list(reference.state_dict())
    assert count_parameters(ours) == count_parameters(reference)
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), reference(x))


def test_kaiming_init_matches_torchvision_statistics():
    torch.manual_seed(0)
    conv = timm.create_model("emca_resnet50").layer3[0].conv2.weight
    fan_out = conv.shape[0] * conv.shape[2] * conv.shape[3]
    assert conv.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.02)


def test_se_resnet50_has_the_published_parameter_count():
    model = EMCAResNet("resnet50", attention="se", integration="all")
    assert count_parameters(model) / 1e6 == pytest.approx(28.09, abs=0.01)


def test_bias_free_se_resnet50_has_the_authors_parameter_count():
    # 28,088,024 (Hu et al.) less C + C/16 biases in each of the 16 modules: 28,071,976 = 26.772 x 2^20.
    model = EMCAResNet("resnet50", attention="se", integration="all", se_reduction=16, se_bias=False)
    assert count_parameters(model) == 28_071_976


# The paper's Tables 2-4 (docs/paper.md#reference-figures), in the authors' unit of 2^20 parameters;
# (attention, integration, coverage).
PAPER_SE_COUNTS = [
    (18, "se", "all", "none", 11.231), (34, "se", "all", "none", 20.938), (50, "se", "all", "none", 26.772),
    (18, "se", "first", "none", 11.189), (34, "se", "last", "none", 20.829), (50, "se", "first", "none", 25.037),
    (34, "emca_se", "first", "prev_stage_all", 20.829), (50, "emca_se", "first", "all_stages_last", 25.037),
]


@pytest.mark.parametrize("depth,attention,integration,coverage,paper", PAPER_SE_COUNTS)
def test_bias_free_se_rows_have_the_papers_counts(depth, attention, integration, coverage, paper):
    stages, blocks = COVERAGE_PRESETS[coverage]
    model = build_model({"name": f"resnet{depth}"}, {"name": attention, "integration": integration, "se_bias": False},
                        {"stages": stages, "blocks": blocks}, num_classes=1000)
    assert round(count_parameters(model) / 2**20, 3) == paper


@pytest.mark.parametrize(
    "make",
    [
        lambda: EMCAResNet("resnet18", attention="se", se_bias=False),
        lambda: build_model(
            {"name": "resnet18"}, {"name": "emca_se", "se_bias": False}, {"stages": "all", "blocks": 1}, 10
        ),
        lambda: timm.create_model("emca_se_resnet18", se_bias=False),
    ],
)
def test_se_bias_false_reaches_every_se_excitation(make):
    excitations = [m.excitation for m in attention_modules(make()).values()]
    assert len(excitations) > 0 and all(isinstance(e, SEExcitation) for e in excitations)
    assert all(e.fc1.bias is None and e.fc2.bias is None for e in excitations)


def test_se_bias_must_be_a_bool():
    with pytest.raises(ValueError, match="se_bias must be true or false, got 'false'"):
        EMCAResNet("resnet18", attention="se", se_bias="false")


def test_table_presets_build_the_authors_se(repo_root):
    from hydra import compose, initialize_config_dir

    import emca.config  # noqa: F401  (the training schema)

    with initialize_config_dir(config_dir=str(repo_root / "configs"), version_base="1.3"):
        for overrides in (
            ["+experiment=table2", "attention=se"],
            ["+experiment=table3", "+experiment/table3=emca_se_none"],
            ["+experiment=table4", "attention=emca_se"],
            ["+experiment=table5", "attention=se"],
        ):
            assert compose("train", overrides=overrides).attention.se_bias is False, overrides
        assert compose("train", overrides=["attention=se"]).attention.se_bias is True  # Hu et al.'s SE otherwise
        cfg = compose(
            "train", overrides=["+experiment=table2", "attention=se", "attention.integration=all", "backbone=resnet50"]
        )
    assert count_parameters(build_model(cfg.backbone, cfg.attention, cfg.coverage, num_classes=1000)) == 28_071_976


@pytest.mark.parametrize("channels", [64, 128, 256, 512, 1024, 2048])
def test_eca_kernel_follows_the_formula_and_timm(channels):
    t = abs(math.log2(channels) / 2 + 1 / 2)
    odd_candidates = [k for k in range(1, 20, 2)]
    nearest = min(odd_candidates, key=lambda k: (abs(t - k), -k))  # ties go up
    assert eca_kernel_size(channels) == max(nearest, 3)
    assert eca_kernel_size(channels) == timm.layers.EcaModule(channels).conv.kernel_size[0]


def test_eca_kernels_table():
    assert [eca_kernel_size(c) for c in (64, 128, 256, 512, 1024, 2048)] == [3, 5, 5, 5, 5, 7]


def test_eca_explicit_kernel_list_is_used_per_stage():
    model = EMCAResNet("resnet50", attention="eca", integration="first", eca_kernel=[3, 5, 5, 7])
    assert [s[0].attn.excitation.conv.kernel_size[0] for s in model._stages] == [3, 5, 5, 7]
    with pytest.raises(ValueError, match="eca_kernel lists 3 values but the backbone has 4 stages"):
        EMCAResNet("resnet50", attention="eca", eca_kernel=[3, 5, 7])
    with pytest.raises(ValueError, match="ECA kernel size must be a positive odd number"):
        EMCAResNet("resnet50", attention="eca", eca_kernel=[3, 5, 4, 7])


def test_srm_adds_four_parameters_per_channel_per_module():
    plain = count_parameters(EMCAResNet("resnet50"))
    srm = EMCAResNet("resnet50", attention="srm", integration="all")
    per_module = [2 * c + 2 * c for c in (256,) * 3 + (512,) * 4 + (1024,) * 6 + (2048,) * 3]
    assert count_parameters(srm) - plain == sum(per_module)
    assert len(attention_modules(srm)) == 16


def test_plain_se_and_eca_match_timm_layers():
    torch.manual_seed(0)
    y = torch.randn(2, 64, 7, 7)
    ours = ChannelAttention(SEExcitation(64, 16))
    reference = timm.layers.SEModule(64, rd_ratio=1 / 16, rd_divisor=1)
    reference.fc1.weight.data.copy_(ours.excitation.fc1.weight[:, :, None, None])
    reference.fc1.bias.data.copy_(ours.excitation.fc1.bias)
    reference.fc2.weight.data.copy_(ours.excitation.fc2.weight[:, :, None, None])
    reference.fc2.bias.data.copy_(ours.excitation.fc2.bias)
    torch.testing.assert_close(ours(y), reference(y))

    ours = ChannelAttention(SEExcitation(64, 16, bias=False))
    reference = timm.layers.SEModule(64, rd_ratio=1 / 16, rd_divisor=1, bias=False)
    reference.fc1.weight.data.copy_(ours.excitation.fc1.weight[:, :, None, None])
    reference.fc2.weight.data.copy_(ours.excitation.fc2.weight[:, :, None, None])
    torch.testing.assert_close(ours(y), reference(y))

    ours = ChannelAttention(ECAExcitation(64))
    reference = timm.layers.EcaModule(64)
    reference.conv.weight.data.copy_(ours.excitation.conv.weight)
    torch.testing.assert_close(ours(y), reference(y))


@pytest.mark.parametrize("depth", [18, 50])
def test_se_resnet_matches_timm_forward_and_backward(depth):
    """SE in every block (integration=all) is timm's seresnet: same outputs and gradients, so the
    gate fused into the shortcut's add (addcmul) computes exactly y * scales + identity."""
    torch.manual_seed(0)
    ours = EMCAResNet(f"resnet{depth}", attention="se", integration="all", num_classes=10).double()
    # SE with a reduction of exactly 16 (timm rounds the reduced width up to a multiple of 8 by default)
    se_layer = functools.partial(timm.layers.SEModule, rd_ratio=1 / 16, rd_divisor=1)
    reference = timm.create_model(f"seresnet{depth}", num_classes=10, block_args=dict(attn_layer=se_layer)).double()
    state = {}
    for key, value in ours.state_dict().items():
        key = key.replace(".attn.excitation.", ".se.")
        state[key] = value[:, :, None, None] if ".se.fc" in key and key.endswith("weight") else value
    reference.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    labels = torch.tensor([1, 7])
    out, ref_out = ours(x), reference(x)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    nn.functional.cross_entropy(out, labels).backward()
    nn.functional.cross_entropy(ref_out, labels).backward()
    reference_grads = dict(reference.named_parameters())
    for name, p in ours.named_parameters():
        ref_grad = reference_grads[name.replace(".attn.excitation.", ".se.")].grad
        torch.testing.assert_close(p.grad, ref_grad.reshape(p.grad.shape), rtol=1e-8, atol=1e-10, msg=name)


def test_srm_matches_the_published_formula():
    torch.manual_seed(0)
    y = torch.randn(4, 8, 5, 5)
    module = ChannelAttention(SRMExcitation(8), "mean_std").train()
    nn.init.normal_(module.excitation.cfc)
    mean = y.mean((2, 3))
    std = (y.var((2, 3), unbiased=False) + 1e-5).sqrt()
    z = module.excitation.cfc[:, 0] * mean + module.excitation.cfc[:, 1] * std
    z = (z - z.mean(0)) / (z.var(0, unbiased=False) + 1e-5).sqrt()
    torch.testing.assert_close(module(y), y * torch.sigmoid(z)[:, :, None, None])


R_TABLE = {
    # docs/paper.md#coverage-region; R-18 has two blocks per stage.
    (18, "none"): [1, 1, 1, 1],
    (18, "prev_stage_last"): [1, 2, 2, 2],
    (18, "prev_stage_all"): [1, 3, 3, 3],
    (18, "all_stages_last"): [1, 2, 3, 4],
    (18, "all_stages_all"): [1, 3, 5, 7],
}
for _depth in (34, 50):
    R_TABLE.update(
        {
            (_depth, "none"): [1, 1, 1, 1],
            (_depth, "prev_stage_last"): [1, 2, 2, 2],
            (_depth, "prev_stage_all"): [1, 4, 5, 7],
            (_depth, "all_stages_last"): [1, 2, 3, 4],
            (_depth, "all_stages_all"): [1, 4, 8, 14],
        }
    )


@pytest.mark.parametrize("depth,preset", sorted(R_TABLE))
def test_num_scales_follow_the_paper_table(depth, preset):
    model = EMCAResNet(f"resnet{depth}", attention="emca_eca", integration="first", coverage=preset)
    assert [row["num_scales"][0] for row in stage_layout(model)] == R_TABLE[(depth, preset)]


def test_include_stem_adds_the_stem_as_stage_zero():
    model = EMCAResNet("resnet50", attention="emca_se", coverage="prev_stage_all", include_stem=True)
    assert [row["num_scales"][0] for row in stage_layout(model)] == [2, 4, 5, 7]
    model = EMCAResNet("resnet50", attention="emca_se", coverage="all_stages_all", include_stem=True)
    assert [row["num_scales"][0] for row in stage_layout(model)] == [2, 5, 9, 15]
    assert model.layer1[0].attn.source_channels == (64,)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_coverage_sources_are_the_last_blocks_nearest_first():
    # R-50 outputs: 0 stem, 1-3 stage 1, 4-7 stage 2, 8-13 stage 3, 14-16 stage 4
    region = CoverageRegion.parse({"stages": "all", "blocks": 2})
    assert coverage_sources(region, (3, 4, 6, 3)) == [[], [3, 2], [7, 6, 3, 2], [13, 12, 7, 6, 3, 2]]


@pytest.mark.parametrize(
    "coverage,message",
    [
        ({"stages": 4, "blocks": 1}, r"coverage.stages=4 .* at most 3"),
        ({"stages": 1, "blocks": 4}, r"coverage.blocks=4 exceeds the 3 blocks of stage 1"),
        ({"stages": -1, "blocks": 1}, r"non-negative integer or 'all'"),
        ({"stages": 1}, r"needs keys 'stages' and 'blocks'"),
        ("previous_stage", r"unknown coverage preset"),
    ],
)
def test_impossible_coverage_raises_a_clear_error(coverage, message):
    with pytest.raises(ValueError, match=message):
        EMCAResNet("resnet50", attention="emca_se", coverage=coverage)


def test_repeat_alignment_needs_divisible_channels():
    with pytest.raises(ValueError, match="multiple of every source's channels.*align=linear"):
        EMCA(96, [64], ECAExcitation(96), align="repeat")
    EMCA(96, [64], ECAExcitation(96), align="linear")


def test_hand_computed_emca_forward():
    """C0 = 4, one source with 2 channels (repeat), R = 2, ECA kernel 3 with known weights."""
    module = EMCA(4, [2], ECAExcitation(4, kernel=3))
    with torch.no_grad():
        module.scale_weights.copy_(torch.tensor([1.0, -2.0]))
        module.excitation.conv.weight.copy_(torch.tensor([[[0.5, 1.0, -1.0]]]))
    # x0 is constant per channel, so its pooled mean is exactly these values.
    own = torch.tensor([1.0, 2.0, 3.0, 4.0])
    y = own[None, :, None, None].expand(1, 4, 2, 2).clone()
    source = torch.tensor([[[0.5], [1.0]]])  # pooled earlier output, 2 channels -> repeated [0.5, 1, 0.5, 1]
    # MAB: relu(1*own - 2*[0.5, 1, 0.5, 1]) = relu([0, 0, 2, 2]) = [0, 0, 2, 2]
    # ECA conv (zero padding): z_c = 0.5*x_{c-1} + 1*x_c - 1*x_{c+1}
    #   z = [0 + 0 - 0, 0 + 0 - 2, 0 + 2 - 2, 1 + 2 - 0] = [0, -2, 0, 3]
    expected_scales = torch.sigmoid(torch.tensor([0.0, -2.0, 0.0, 3.0]))
    out = module(y, [source])
    torch.testing.assert_close(out, y * expected_scales[None, :, None, None])
    module.gating = "residual"
    torch.testing.assert_close(module(y, [source]), y * (1 + expected_scales[None, :, None, None]))


@pytest.mark.parametrize("num_statistics", [1, 2])
def test_repeat_fusion_is_the_weighted_sum_of_repeated_descriptors(num_statistics):  # mean | mean_std
    """The MAB of Algorithm 1 written out: relu(sum_r w_r * repeat(S_r)), over sources of several
    widths in runs (two stages of a coverage region) and alone, against the grouped broadcast sums."""
    torch.manual_seed(0)
    widths = [4, 4, 2, 2, 2, 8, 4]
    module = EMCA(8, widths, SRMExcitation(8), pooling="mean_std") if num_statistics == 2 else EMCA(
        8, widths, ECAExcitation(8, kernel=3))
    with torch.no_grad():
        module.scale_weights.normal_()
    own = torch.randn(3, 8, num_statistics, dtype=torch.float64)
    sources = [torch.randn(3, c, num_statistics, dtype=torch.float64) for c in widths]
    module.double()
    expected = module.scale_weights[0] * own
    for weight, source in zip(module.scale_weights[1:], sources, strict=True):
        expected = expected + weight * source.repeat(1, 8 // source.shape[1], 1)
    torch.testing.assert_close(module.fuse(own, sources), torch.relu(expected), rtol=1e-12, atol=1e-12)


def test_linear_alignment_starts_as_repeat():
    torch.manual_seed(0)
    repeat = EMCA(8, [4, 2], SEExcitation(8, 2), align="repeat")
    linear = EMCA(8, [4, 2], SEExcitation(8, 2), align="linear")
    linear.load_state_dict(repeat.state_dict(), strict=False)
    y, sources = torch.randn(3, 8, 4, 4), [torch.randn(3, 4, 1), torch.randn(3, 2, 1)]
    torch.testing.assert_close(linear(y, sources), repeat(y, sources))


def test_coverage_none_equals_plain_attention_in_first_block():
    torch.manual_seed(0)
    emca = EMCAResNet("resnet18", attention="emca_se", integration="first", coverage="none", num_classes=10).eval()
    plain = EMCAResNet("resnet18", attention="se", integration="first", num_classes=10).eval()
    plain.load_state_dict(emca.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(emca(x), plain(x))


def test_pooled_block_outputs_are_computed_once_and_shared(monkeypatch):
    calls = []
    original = resnet_module.pool_descriptor

    def counting(x, pooling):
        calls.append(x.shape[1])
        return original(x, pooling)

    monkeypatch.setattr(resnet_module, "pool_descriptor", counting)
    model = EMCAResNet("resnet50", attention="emca_eca", coverage="all_stages_all", integration="all")
    model(torch.randn(1, 3, 64, 64))
    # Every block of stages 1-3 is read by several modules (all_stages_all, integration=all) but
    # pooled exactly once: 3 + 4 + 6 = 13 outputs.
    assert len(calls) == 13


@pytest.mark.parametrize("attention", ["emca_se", "emca_eca", "emca_srm"])
def test_gradients_reach_every_mab_weight_and_every_block(attention):
    torch.manual_seed(0)
    model = EMCAResNet("resnet18", attention=attention, coverage="all_stages_all", integration="all", num_classes=5)
    for module in attention_modules(model).values():
        if isinstance(module.excitation, SRMExcitation):
            # SRM starts with a zero channel-wise FC (its authors' init), which blocks the gradient
            # to everything before it on the very first step only.
            nn.init.normal_(module.excitation.cfc)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    mab = [m.scale_weights for m in attention_modules(model).values() if m.scale_weights is not None]
    assert len(mab) == 6  # stages 2-4, two blocks each
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in mab)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("attention", ["se", "emca_eca", "emca_srm"])
def test_channels_last_gives_the_same_outputs(attention):
    torch.manual_seed(0)
    model = EMCAResNet("resnet18", attention=attention, coverage="prev_stage_all", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)


def test_timm_registry_names_and_paper_defaults():
    names = timm.list_models("emca_*")
    for depth in DEPTHS:
        assert f"emca_resnet{depth}" in names
        for kind in ("se", "eca", "srm"):
            assert f"emca_{kind}_resnet{depth}" in names
    assert timm.models.get_pretrained_cfg("seresnet50") is not None  # timm's own names untouched
    model = timm.create_model("emca_srm_resnet34", num_classes=7)
    assert model.architecture() == {
        "backbone": "resnet34",
        "attention": "emca_srm",
        "coverage": {"stages": 1, "blocks": "all"},
        "num_classes": 7,
    }
    model = timm.create_model(
        "emca_resnet50", attention="emca_eca", coverage="prev_stage_all", integration="first", num_classes=1000
    )
    assert [row["attention_blocks"] for row in stage_layout(model)] == [[0]] * 4
    with pytest.raises(ValueError, match="no pretrained"):
        timm.create_model("emca_resnet18", pretrained=True)


@pytest.mark.parametrize(
    "integration,expected", [("all", [[0, 1, 2], [0, 1, 2, 3]]), ("first", [[0], [0]]), ("last", [[2], [3]])]
)
def test_integration_places_attention(integration, expected):
    model = EMCAResNet("resnet50", attention="eca", integration=integration)
    assert [row["attention_blocks"] for row in stage_layout(model)][:2] == expected


def test_build_model_from_config_mappings():
    model = build_model(
        {"name": "resnet18"},
        {
            "name": "emca_se",
            "integration": "first",
            "se_reduction": 8,
            "eca_kernel": "adaptive",
            "gating": "residual",
            "align": "repeat",
            "include_stem": False,
        },
        {"name": "custom", "stages": "all", "blocks": 1},
        num_classes=3,
    )
    assert model.layer4[0].attn.num_scales == 4
    assert model.layer4[0].attn.gating == "residual"
    assert model.layer1[0].attn.excitation.fc1.out_features == 64 // 8


@pytest.mark.parametrize("attention", resnet_module.ATTENTIONS)
def test_integration_defaults_to_the_methods_own_however_the_model_is_built(attention):
    """README / docs/paper.md#integration: dense (every block) for plain SE / ECA / SRM, the first block of each stage
    for EMCA, whether the name goes to EMCAResNet, timm or build_model with a minimal config."""
    from emca.models.config import AttentionConfig, CoverageConfig

    expected = [[0]] * 4 if attention.startswith("emca") else [[0, 1]] * 4 if attention != "none" else [[]] * 4
    placed = {"bam": [[]] * 4, "a2": [[], [0, 1], [0, 1], []], "gc": [[], [0, 1], [0, 1], [0, 1]],
              "nl": [[], [], [0], []], "nl5": [[], [0, 1], [0, 1], []]}
    if attention in placed:  # where their table entries put them (stage ends; blocks; stages 2-4; res4's next-to-last)
        expected = placed[attention]
    models = [
        EMCAResNet("resnet18", attention=attention, num_classes=10),
        timm.create_model("emca_resnet18", attention=attention, num_classes=10),
        build_model({"name": "resnet18"}, {"name": attention}, {"stages": 1, "blocks": "all"}, num_classes=10),
        build_model({"name": "resnet18"}, AttentionConfig(name=attention), CoverageConfig(), num_classes=10),
    ]
    if attention.startswith("emca"):
        models.append(timm.create_model(f"{attention}_resnet18", num_classes=10))
    for model in models:
        assert [row["attention_blocks"] for row in stage_layout(model)] == expected
        assert list(model.state_dict()) == list(models[0].state_dict())


@pytest.mark.parametrize("attention", resnet_module.ATTENTIONS)
def test_attention_configs_build_the_methods_default_placement(repo_root, attention):
    from hydra import compose, initialize_config_dir

    import emca.config  # noqa: F401  (the training schema)

    with initialize_config_dir(config_dir=str(repo_root / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"attention={attention}", "backbone=resnet18"])
    model = build_model(cfg.backbone, cfg.attention, cfg.coverage, num_classes=10)
    assert list(model.state_dict()) == list(EMCAResNet("resnet18", attention=attention, num_classes=10).state_dict())


@pytest.mark.parametrize("depth,weights", [(18, "ResNet18_Weights"), (50, "ResNet50_Weights")])
def test_gflops_match_torchvision_metadata(depth, weights):
    published = getattr(torchvision.models, weights).IMAGENET1K_V1.meta["_ops"]
    assert measure_gflops(timm.create_model(f"emca_resnet{depth}")) == pytest.approx(published, abs=0.001)


def test_emca_costs_less_than_dense_attention():
    dense = count_parameters(EMCAResNet("resnet50", attention="se", integration="all"))
    emca = count_parameters(EMCAResNet("resnet50", attention="emca_se", coverage="prev_stage_all"))
    plain = count_parameters(EMCAResNet("resnet50"))
    assert plain < emca < dense


def test_model_summary_script(repo_root):
    result = subprocess.run(
        [
            sys.executable,
            "scripts/model_summary.py",
            "backbone=resnet50",
            "attention=emca_se",
            "coverage=prev_stage_all",
        ],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "parameters 26,257,448" in result.stdout
    assert [line.split()[-1] for line in result.stdout.splitlines()[2:6]] == ["1", "4", "5", "7"]
    bad = subprocess.run(
        [sys.executable, "scripts/model_summary.py", "backbone=resnet18", "attention=emca_se", "coverage.stages=9"],
        cwd=repo_root, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1].startswith("error: coverage.stages=9")


def test_coverage_name_is_derived_from_the_fields():
    from emca.models import coverage_name

    assert coverage_name(1, "all") == "prev_stage_all"
    assert coverage_name("all", 1) == "all_stages_last"
    assert coverage_name(0, 0) == "none"
    assert coverage_name("all", 2) == "stages=all,blocks=2"
