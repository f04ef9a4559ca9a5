"""Gather-Excite (GE-theta-, GE-theta+) against timm's GatherExcite (same weights), a numpy reference
with explicit loops, hand-computed cases, and what the options do."""

import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.layers import gather_excite as timm_ge
from torch import nn

from emca.layers.gather_excite import GatherExcite, GatherExcitePlus

from conftest import randomise_parameters

R50_STAGES = ((256, 3, 56), (512, 4, 28), (1024, 6, 14), (2048, 3, 7))  # (channels, blocks, map at 224 px)


def timm_module(monkeypatch, channels, **kwargs) -> nn.Module:
    """timm 1.0.31's GatherExcite. Its __init__ passes its {'device', 'dtype'} dict as `*dd`, i.e. the two
    key strings as extra positional arguments of create_conv2d, BatchNorm2d and ConvMlp, which fails
    (create_conv2d, ConvMlp) or sets eps='device' (BatchNorm2d); the constructors it calls are wrapped
    here to drop those two strings, which is what timm means (device=None, dtype=None)."""

    def drop_strings(factory):
        return lambda *args, **kw: factory(*[a for a in args if a not in ("device", "dtype")], **kw)

    monkeypatch.setattr(timm_ge, "create_conv2d", drop_strings(timm_ge.create_conv2d))
    monkeypatch.setattr(timm_ge, "ConvMlp", drop_strings(timm_ge.ConvMlp))
    namespace = types.SimpleNamespace(**{k: getattr(nn, k) for k in ("Module", "Sequential", "Identity", "ReLU")})
    namespace.BatchNorm2d = drop_strings(nn.BatchNorm2d)
    monkeypatch.setattr(timm_ge, "nn", namespace)
    return timm_ge.GatherExcite(channels, **kwargs)


def plus_as_timm(monkeypatch, ours: GatherExcitePlus, extent: int, size: int) -> nn.Module:
    """timm's GE with parametric gather and MLP holding our weights, made the authors' GE-theta+
    (RN50-GEPP) in two places: its global gather conv gets padding 0 (timm pads the map-sized kernel
    by (k - 1) // 2, so that it outputs a k - 1 or k wide map, not the authors' 1 x 1), and a ReLU after
    the gather's last BN, which the authors have and timm's lacks, is appended."""
    channels = ours.channels
    ref = timm_module(monkeypatch, channels, feat_size=(size, size), extra_params=True, extent=extent,
                      use_mlp=True, rd_channels=ours.excitation.fc1.out_features).double()
    if extent == 0:
        assert ref.gather.conv1.padding == ((size - 1) // 2,) * 2
        ref.gather.conv1.padding = (0, 0)
    ref.gather.add_module("final_act", nn.ReLU())
    ours_convs = [m for m in ours.gather if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    ref_convs = [m for m in ref.gather if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    assert [type(m) for m in ours_convs] == [type(m) for m in ref_convs]
    with torch.no_grad():
        for a, b in zip(ours_convs, ref_convs, strict=True):
            for name, tensor in a.state_dict().items():
                b.state_dict()[name].copy_(tensor)
        for fc, conv in ((ours.excitation.fc1, ref.mlp.fc1), (ours.excitation.fc2, ref.mlp.fc2)):
            conv.weight.copy_(fc.weight[:, :, None, None])
            conv.bias.copy_(fc.bias)
    return ref


@pytest.mark.parametrize("extent", ["global", 2, 4])
def test_theta_minus_matches_timm(monkeypatch, extent):
    torch.manual_seed(0)
    ref = timm_module(monkeypatch, 16, extent=0 if extent == "global" else extent, use_mlp=False)
    y = torch.randn(2, 16, 9, 7, dtype=torch.float64)
    torch.testing.assert_close(GatherExcite(16, extent)(y), ref(y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("extent", ["global", 4])
def test_theta_plus_matches_timm_with_the_same_weights(monkeypatch, extent, mode):
    torch.manual_seed(1)
    size = 8
    ours = randomise_parameters(GatherExcitePlus(64, extent, feature_size=size), 0.5, seed=2).double()
    for bn in (m for m in ours.gather if isinstance(m, nn.BatchNorm2d)):  # running statistics, for eval
        bn.running_mean.normal_(0, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
    ref = plus_as_timm(monkeypatch, ours, 0 if extent == "global" else extent, size)
    ours.train(mode == "train")
    ref.train(mode == "train")
    y = torch.randn(3, 64, size, size, dtype=torch.float64)
    torch.testing.assert_close(ours(y), ref(y), rtol=1e-10, atol=1e-12)
    assert ours.excitation.fc1.out_features == 4  # 64 / 16


def numpy_theta_plus(module: GatherExcitePlus, y: torch.Tensor) -> np.ndarray:
    """GE-theta+ global, eval mode, with explicit loops: a map of the kernel's size."""
    x = y.detach().numpy()
    w = module.gather[0].weight.detach().numpy()[:, 0]
    bn = module.gather[1]
    mean, var = bn.running_mean.numpy(), bn.running_var.numpy()
    gamma, beta = bn.weight.detach().numpy(), bn.bias.detach().numpy()
    w1, b1 = module.excitation.fc1.weight.detach().numpy(), module.excitation.fc1.bias.detach().numpy()
    w2, b2 = module.excitation.fc2.weight.detach().numpy(), module.excitation.fc2.bias.detach().numpy()
    batch, channels, height, width = x.shape
    out = np.empty_like(x)
    for b in range(batch):
        gathered = np.zeros(channels)
        for c in range(channels):
            for i in range(height):
                for j in range(width):
                    gathered[c] += w[c, i, j] * x[b, c, i, j]
        normed = np.maximum((gathered - mean) / np.sqrt(var + bn.eps) * gamma + beta, 0)
        logits = w2 @ np.maximum(w1 @ normed + b1, 0) + b2
        out[b] = x[b] * (1 / (1 + np.exp(-logits)))[:, None, None]
    return out


def test_theta_plus_matches_a_numpy_reference_with_explicit_loops():
    torch.manual_seed(3)
    module = randomise_parameters(GatherExcitePlus(32, feature_size=5, reduction=8), 0.5, seed=4).double().eval()
    module.gather[1].running_mean.normal_(0, 0.3)
    y = torch.randn(2, 32, 5, 5, dtype=torch.float64)
    np.testing.assert_allclose(module(y).detach().numpy(), numpy_theta_plus(module, y), rtol=1e-10, atol=1e-12)


def test_theta_minus_hand_computed():
    # Global: channel means 1 and -2 -> gates sigmoid(1), sigmoid(-2).
    y = torch.tensor([[[[0.0, 2.0]], [[-1.0, -3.0]]]])
    expected = y * torch.sigmoid(torch.tensor([1.0, -2.0]))[None, :, None, None]
    torch.testing.assert_close(GatherExcite(2)(y), expected)
    # Extent 2 on a 1 x 4 row: kernel 3, stride 2, padding 1 not counted -> windows {0,1}, {1,2,3}:
    # means (1 + 3) / 2 = 2 and (3 + 5 + 7) / 3 = 5, spread back by nearest-neighbour to (2, 2, 5, 5).
    y = torch.tensor([[[[1.0, 3.0, 5.0, 7.0]]]])
    expected = y * torch.sigmoid(torch.tensor([2.0, 2.0, 5.0, 5.0]))
    torch.testing.assert_close(GatherExcite(1, extent=2)(y), expected)


def test_theta_plus_global_gather_on_another_size_reads_the_map_pooled_to_the_kernel():
    torch.manual_seed(5)
    module = randomise_parameters(GatherExcitePlus(8, feature_size=4, reduction=2), 0.5, seed=6).double().eval()
    for height, width in ((9, 6), (3, 2), (4, 4)):
        y = torch.randn(2, 8, height, width, dtype=torch.float64)
        pooled = F.adaptive_avg_pool2d(y, 4)
        conv = F.conv2d(pooled, module.gather[0].weight, groups=8).flatten(1)
        torch.testing.assert_close(module.context(y), F.relu(module.gather[1](conv[:, :, None, None])).flatten(1))


@pytest.mark.parametrize("module", [GatherExcite(32), GatherExcite(32, 4), GatherExcitePlus(32, feature_size=6),
                                    GatherExcitePlus(32, 2)], ids=["minus", "minus_e4", "plus", "plus_e2"])
def test_gradients_and_bfloat16_autocast(module):
    torch.manual_seed(7)
    module = randomise_parameters(module, 0.5, seed=8).train()
    y = torch.randn(3, 32, 6, 6, requires_grad=True)
    (module(y) * torch.randn(3, 32, 6, 6)).sum().backward()
    assert y.grad.abs().sum() > 0
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    module.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(y.detach().to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), module(y.detach()), rtol=0.05, atol=0.1)


def test_only_global_extent_offers_per_channel_scales():
    assert GatherExcite(8).per_channel_gate and GatherExcitePlus(32).per_channel_gate
    assert not GatherExcite(8, 2).per_channel_gate and not GatherExcitePlus(32, 8).per_channel_gate
    assert sum(p.numel() for p in GatherExcite(64, 8).parameters()) == 0
    # log2(8) = 3 strided 3x3 depthwise convs with BN; the SE excite with biases.
    assert sum(isinstance(m, nn.Conv2d) for m in GatherExcitePlus(32, 8).gather) == 3


def test_the_authors_init():
    torch.manual_seed(9)
    module = GatherExcitePlus(1024, feature_size=14)
    fc1 = module.excitation.fc1
    assert abs(fc1.weight.std().item() - 0.01) < 0.001 and not fc1.bias.any()
    fan_in = 14 * 14  # one input channel per group
    assert abs(module.gather[0].weight.std().item() - math.sqrt(2 / fan_in)) < 0.005


def test_resnet50_parameter_count_of_theta_plus():
    """Per block: the depthwise gather C k^2, its BN 2C, the excite C^2/8 + C/16 + C (biases)."""
    added = sum(blocks * sum(p.numel() for p in GatherExcitePlus(c, feature_size=k).parameters())
                for c, blocks, k in R50_STAGES)
    assert added == sum(blocks * (c * k * k + 2 * c + 2 * c * (c // 16) + c // 16 + c) for c, blocks, k in R50_STAGES)
    assert added == 8_080_560  # 25.56 M -> 33.64 M


@pytest.mark.parametrize("extent", [0, 3, 6, "4", True, "local"])
def test_a_bad_extent_is_refused(extent):
    with pytest.raises(ValueError, match="'global' or a power of two"):
        GatherExcite(8, extent)
    with pytest.raises(ValueError, match="'global' or a power of two"):
        GatherExcitePlus(32, extent)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="feature_size must be a positive integer"):
        GatherExcitePlus(32, feature_size=0)
    with pytest.raises(ValueError, match="at least 1 channel"):
        GatherExcitePlus(8, reduction=16)
