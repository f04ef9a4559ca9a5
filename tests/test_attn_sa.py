"""Shuffle attention (SA-Net, Zhang and Yang 2021) against a numpy float64 reference that loops over
samples, groups and channels and shuffles by an index permutation, a hand-computed case, and the
R-50 parameter count."""

import math

import numpy as np
import pytest
import torch
import torchvision

from emca.layers.shuffle_attention import ShuffleAttention

from conftest import randomise_parameters

EPS = 1e-5  # GroupNorm's default eps


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    randomise_parameters(module, 1.0, seed)


def reference_sa(x: np.ndarray, sa: ShuffleAttention) -> np.ndarray:
    """Channel by channel: global channel g * C/G + j is gated by the channel rule if j < n (n = C/2G),
    else by the spatial rule with the (j - n)-th parameters; then output channel 2k + s is the gated
    channel s * C/2 + k."""

    def vector(p):
        return p.detach().double().flatten().numpy()

    cw, cb, sw, sb = (vector(p) for p in (sa.cweight, sa.cbias, sa.sweight, sa.sbias))
    gamma, beta = vector(sa.gn.weight), vector(sa.gn.bias)
    batch, channels = x.shape[:2]
    per_group = channels // sa.groups
    half = per_group // 2

    def sigmoid(t):
        return 1 / (1 + np.exp(-t))

    gated = np.empty_like(x)
    for b in range(batch):
        for g in range(sa.groups):
            for j in range(per_group):
                channel = g * per_group + j
                plane = x[b, channel]
                if j < half:
                    gated[b, channel] = plane * sigmoid(cw[j] * plane.mean() + cb[j])
                else:
                    k = j - half
                    normalised = (plane - plane.mean()) / np.sqrt(plane.var() + EPS)  # population var
                    gated[b, channel] = plane * sigmoid(sw[k] * (gamma[k] * normalised + beta[k]) + sb[k])
    permutation = [s * (channels // 2) + k for k in range(channels // 2) for s in range(2)]
    return gated[:, permutation]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels, groups", [(16, 2), (24, 4), (8, 1), (12, 6)])
def test_matches_the_reference(channels, groups, training):
    torch.manual_seed(0)
    sa = ShuffleAttention(channels, groups).double().train(training)
    randomise(sa)
    x = torch.randn(3, channels, 5, 4, dtype=torch.float64)
    np.testing.assert_allclose(sa(x).detach().numpy(), reference_sa(x.numpy(), sa), rtol=1e-10, atol=1e-12)


def test_authors_initial_values_gate_everything_by_sigmoid_one():
    sa = ShuffleAttention(16, groups=2)
    assert sa.cweight.shape == sa.cbias.shape == sa.sweight.shape == sa.sbias.shape == (1, 4, 1, 1)
    assert not sa.cweight.any() and not sa.sweight.any() and (sa.cbias == 1).all() and (sa.sbias == 1).all()
    assert sa.gn.num_groups == sa.gn.num_channels == 4 and sa.gn.affine
    x = torch.randn(2, 16, 3, 3)
    permutation = [s * 8 + k for k in range(8) for s in range(2)]
    torch.testing.assert_close(sa(x), torch.sigmoid(torch.tensor(1.0)) * x[:, permutation])


def test_hand_computed_case():
    # C = 4, G = 1: channels 0, 1 take the channel rule, 2, 3 the spatial rule; the shuffle puts
    # them in the order 0, 2, 1, 3. Maps are 1 x 2.
    sa = ShuffleAttention(4, groups=1).double()
    with torch.no_grad():
        sa.cweight.copy_(torch.tensor([1.0, -1.0]).view(1, 2, 1, 1))
        sa.cbias.zero_()
        sa.sweight.copy_(torch.tensor([0.0, 1.0]).view(1, 2, 1, 1))
        sa.sbias.zero_()
    x = torch.tensor([[1.0, 3.0], [0.0, 4.0], [3.0, 1.0], [5.0, -1.0]], dtype=torch.float64).view(1, 4, 1, 2)

    def sigmoid(t):
        return 1 / (1 + math.exp(-t))

    s = 3 / math.sqrt(9 + EPS)  # channel 3: mean 2, variance 9, normalised to (s, -s)
    expected = [
        [1 * sigmoid(2), 3 * sigmoid(2)],  # channel 0: mean 2, gate sigmoid(1 * 2)
        [3 * 0.5, 1 * 0.5],  # channel 2: sweight 0, sbias 0, gate 1/2
        [0 * sigmoid(-2), 4 * sigmoid(-2)],  # channel 1: mean 2, gate sigmoid(-1 * 2)
        [5 * sigmoid(s), -1 * sigmoid(-s)],  # channel 3
    ]
    assert sa(x).view(4, 2).tolist() == [pytest.approx(row, abs=1e-12) for row in expected]


def test_parameter_count():
    # 4 gate vectors of n = C/2G plus the affine GroupNorm's 2n: 3C/G.
    for channels, groups in [(256, 64), (512, 64), (96, 8)]:
        assert sum(p.numel() for p in ShuffleAttention(channels, groups).parameters()) == 3 * channels // groups


def test_resnet50_parameter_count():
    # One module in each of the 16 bottlenecks (the authors' SABottleneck): 3 x 12 + 4 x 24 + 6 x 48 +
    # 3 x 96 = 708 parameters; the SA-Net README and abstract print 25.56M for SA-Net-50.
    model = torchvision.models.resnet50()
    plain = sum(p.numel() for p in model.parameters())
    assert plain == 25_557_032
    widths = [
        block.bn3.num_features for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for block in stage
    ]
    added = sum(sum(p.numel() for p in ShuffleAttention(c).parameters()) for c in widths)
    assert added == 708
    assert f"{(plain + added) / 1e6:.2f}" == "25.56"


def test_gradients_reach_every_parameter():
    sa = ShuffleAttention(16, groups=2)
    randomise(sa, seed=1)  # at the authors' init sweight = 0 blocks the GroupNorm's gradient
    sa(torch.randn(2, 16, 4, 4)).square().sum().backward()
    for name, parameter in sa.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_dtype_is_kept():
    sa = ShuffleAttention(16, groups=2)
    randomise(sa)
    x = torch.randn(2, 16, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sa(x.bfloat16())
        assert out.dtype == torch.bfloat16 and out.shape == x.shape
        assert sa(x).dtype == torch.float32
    assert sa(x).dtype == torch.float32 and sa.double()(x.double()).dtype == torch.float64


@pytest.mark.parametrize("channels, groups", [(64, 64), (100, 8), (16, 0)])
def test_channels_that_do_not_split_are_refused(channels, groups):
    with pytest.raises(ValueError):
        ShuffleAttention(channels, groups)
