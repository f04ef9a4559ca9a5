"""Non-local block against timm's NonLocalAttn (same weights), a numpy reference with explicit loops over the
positions, and hand-computed cases; where the two ResNet placements ("+1 NL" and the 5-block model) put it."""

import math

import numpy as np
import pytest
import torch
from timm.layers.non_local_attn import NonLocalAttn

from emca.layers.double_attention import a2_positions
from emca.layers.non_local import NonLocal, nl_positions
from emca.models import EMCAResNet
from emca.models.summary import count_parameters

from conftest import randomise_parameters

R50_PLAIN_PARAMS = 25_557_032  # torchvision.models.resnet50()


def randomised(module: NonLocal, seed: int = 0) -> NonLocal:
    """Every parameter random (the zero BN scale would make the block the identity) and BN statistics that are
    not 0 / 1, so that eval mode is checked as well."""
    randomise_parameters(module, 0.5, seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        module.norm.running_mean.copy_(torch.randn(module.channels, generator=generator, dtype=torch.float64))
        module.norm.running_var.copy_(torch.rand(module.channels, generator=generator, dtype=torch.float64) + 0.5)
    return module


def timm_copy(ours: NonLocal) -> NonLocalAttn:
    """timm's NonLocalAttn holding our weights. Its defaults differ from the released code's: inner width C/8
    (rd_ratio) instead of C/2, given here as rd_channels; and its scale is C^-1/2 of the *input* width where the
    authors' is d^-1/2 of the inner width, so its `scale` attribute is set to ours."""
    ref = NonLocalAttn(ours.channels, rd_channels=ours.inner).double()
    ref.scale = ours.scale
    with torch.no_grad():
        for mine, theirs in ((ours.theta, ref.t), (ours.phi, ref.p), (ours.g, ref.g), (ours.out, ref.z)):
            theirs.weight.copy_(mine.weight)
            theirs.bias.copy_(mine.bias)
        ref.norm.load_state_dict(ours.norm.state_dict())
    return ref


@pytest.mark.parametrize("use_scale", [True, False])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_matches_timm_non_local_attn_with_the_same_weights(mode, use_scale):
    ours = randomised(NonLocal(16, use_scale=use_scale).double(), seed=1)
    ref = timm_copy(ours)
    assert ours.inner == 8 and ours.scale == (8**-0.5 if use_scale else 1.0)
    ours.train(mode == "train")
    ref.train(mode == "train")
    x = torch.randn(3, 16, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-10, atol=1e-12)


def test_timms_own_scale_is_not_the_authors():
    # The released code scales by d^-1/2 (d = C/2); timm by C^-1/2: with timm's scale left alone they differ.
    ours = randomised(NonLocal(16).double(), seed=2).eval()
    ref = timm_copy(ours).eval()
    ref.scale = 16**-0.5
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    assert not torch.allclose(ours(x), ref(x))


def conv1x1(conv: torch.nn.Conv2d, x: np.ndarray) -> np.ndarray:
    """(C_in, N) -> (C_out, N)."""
    return conv.weight.detach().numpy()[:, :, 0, 0] @ x + conv.bias.detach().numpy()[:, None]


def numpy_non_local(module: NonLocal, x: torch.Tensor) -> np.ndarray:
    """Eqs. 1-6 position by position, with the BN written out (batch statistics in train mode)."""
    xs = x.detach().numpy()
    batch, channels, height, width = xs.shape
    ys = []
    for b in range(batch):
        keys = xs[b]
        if module.subsample:  # 2x2 max pool, stride 2
            keys = np.array([[[keys[c, 2 * i:2 * i + 2, 2 * j:2 * j + 2].max() for j in range(width // 2)]
                              for i in range(height // 2)] for c in range(channels)])
        theta = conv1x1(module.theta, xs[b].reshape(channels, -1))
        phi, g = (conv1x1(conv, keys.reshape(channels, -1)) for conv in (module.phi, module.g))
        y = np.zeros_like(theta)
        for i in range(theta.shape[1]):
            f = np.array([theta[:, i] @ phi[:, j] for j in range(phi.shape[1])])
            if module.pairwise == "embedded_gaussian":
                w = np.exp(f * module.scale - (f * module.scale).max())
                w /= w.sum()
            else:
                w = f / len(f)
            for j in range(phi.shape[1]):
                y[:, i] += w[j] * g[:, j]
        ys.append(conv1x1(module.out, y))
    z = np.stack(ys)  # (B, C, N)
    bn = module.norm
    if bn.training:
        mean, var = z.mean(axis=(0, 2)), z.var(axis=(0, 2))
    else:
        mean, var = bn.running_mean.numpy(), bn.running_var.numpy()
    gamma, beta = bn.weight.detach().numpy(), bn.bias.detach().numpy()
    z = (z - mean[:, None]) / np.sqrt(var[:, None] + bn.eps) * gamma[:, None] + beta[:, None]
    return xs + z.reshape(xs.shape)


@pytest.mark.parametrize("pairwise,use_scale,subsample", [
    ("embedded_gaussian", True, False), ("embedded_gaussian", False, True), ("dot_product", True, False),
    ("dot_product", False, True),
])
def test_matches_a_numpy_reference_with_explicit_loops(pairwise, use_scale, subsample):
    module = NonLocal(12, reduction=3, use_scale=use_scale, pairwise=pairwise, subsample=subsample).double()
    randomised(module, seed=3)
    assert module.inner == 4
    x = torch.randn(2, 12, 4, 6, dtype=torch.float64)
    for train in (True, False):
        module.train(train)
        np.testing.assert_allclose(module(x).detach().numpy(), numpy_non_local(module, x), rtol=1e-9, atol=1e-11)


def hand_module(pairwise: str, theta_weight: float) -> NonLocal:
    """C = 2, d = 1: theta and phi read channel 0, g reads channel 1, W_z = (1, 2); BN an exact identity."""
    module = NonLocal(2, reduction=2, pairwise=pairwise).eval()
    with torch.no_grad():
        for conv in (module.theta, module.phi, module.g, module.out):
            conv.bias.zero_()
        module.theta.weight.copy_(torch.tensor([theta_weight, 0.0]).view(1, 2, 1, 1))
        module.phi.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
        module.g.weight.copy_(torch.tensor([0.0, 1.0]).view(1, 2, 1, 1))
        module.out.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
        module.norm.weight.fill_(1.0)
        module.norm.running_var.fill_(1.0 - module.norm.eps)  # sqrt(var + eps) = 1
    return module


def test_embedded_gaussian_hand_computed():
    # Two positions (H = 1, W = 2), x = [[0, 1], [4, 8]]: theta = ln3 * (0, 1), phi = (0, 1), g = (4, 8), d = 1
    # so the scale is 1. Position 0: f = (0, 0) -> weights (1/2, 1/2) -> y = 6. Position 1: f = (0, ln 3) ->
    # weights (1/4, 3/4) -> y = 1 + 6 = 7. out = x + (y, 2 y) = [[6, 8], [16, 22]].
    module = hand_module("embedded_gaussian", math.log(3.0))
    x = torch.tensor([[[[0.0, 1.0]], [[4.0, 8.0]]]])
    torch.testing.assert_close(module(x), torch.tensor([[[[6.0, 8.0]], [[16.0, 22.0]]]]))


def test_dot_product_hand_computed():
    # The same x with theta = (0, 1): f / N with N = 2. Position 0: f = (0, 0) -> y = 0. Position 1:
    # f = (0, 1) / 2 -> y = 8 / 2 = 4. out = x + (y, 2 y) = [[0, 5], [4, 16]].
    module = hand_module("dot_product", 1.0)
    x = torch.tensor([[[[0.0, 1.0]], [[4.0, 8.0]]]])
    torch.testing.assert_close(module(x), torch.tensor([[[[0.0, 5.0]], [[4.0, 16.0]]]]))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_released_init_starts_as_the_identity(mode):
    torch.manual_seed(4)
    module = NonLocal(32).train(mode == "train")
    x = torch.randn(2, 32, 5, 5)
    assert torch.equal(module(x), x)
    assert module.theta.weight.std().item() == pytest.approx(0.01, rel=0.1)


def test_options():
    assert NonLocal(64).inner == 32 and NonLocal(64, reduction=8).inner == 8
    assert NonLocal(64).scale == 32**-0.5 and NonLocal(64, use_scale=False).scale == 1.0
    assert NonLocal(64, pairwise="dot_product").scale == 1.0  # the scale belongs to the embedded Gaussian
    # subsample: the keys (phi, g) are pooled to a quarter of the positions, the queries are not.
    module = randomised(NonLocal(8, subsample=True), seed=5).eval()
    x = torch.randn(1, 8, 6, 4)
    assert module.attention(x).shape == (1, 4, 6, 4)
    assert not torch.allclose(module(x), randomised(NonLocal(8), seed=5).eval()(x))
    with pytest.raises(ValueError, match="pairwise must be one of"):
        NonLocal(8, pairwise="gaussian")
    with pytest.raises(ValueError, match="lower the reduction"):
        NonLocal(4, reduction=8)


def test_gradients_reach_every_parameter():
    module = randomised(NonLocal(8, subsample=True), seed=6).train()
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    (module(x) * torch.randn(2, 8, 4, 4)).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_bfloat16_under_autocast_stays_bfloat16_and_close_to_float32():
    module = randomised(NonLocal(16), seed=7).float().eval()
    x = torch.randn(2, 16, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    torch.testing.assert_close(out.float(), module(x), rtol=0.1, atol=0.2)


def test_positions():
    # "+1 NL": res4, right before its last unit.
    assert nl_positions((3, 4, 6, 3)) == ((2, 4),)  # ResNet-50 / 34
    assert nl_positions((2, 2, 2, 2)) == ((2, 0),)  # ResNet-18
    assert nl_positions((3, 4, 23, 3)) == ((2, 21),)  # ResNet-101
    assert nl_positions((3, 8, 36, 3)) == ((2, 34),)  # ResNet-152
    assert nl_positions((1, 1, 1, 1)) == ((2, 0),) and nl_positions((3, 4)) == ()
    for name, positions in (("nl", [(2, 4)]), ("nl5", list(a2_positions((3, 4, 6, 3))))):
        model = EMCAResNet("resnet50", attention=name)
        carried = [(s, i) for s, stage in enumerate(model._stages) for i, b in enumerate(stage) if b.after is not None]
        assert carried == positions and all(isinstance(model._stages[s][i].after, NonLocal) for s, i in carried)


def nl_parameters(channels: int, inner: int) -> int:
    return 3 * (channels * inner + inner) + (inner * channels + channels) + 2 * channels  # theta, phi, g; W_z; BN


def test_resnet50_parameter_counts():
    # One block on res4 (C = 1024, d = 512): 2,101,760 parameters, 27.66 M in all; the 5 blocks (2 of 512 channels,
    # 3 of 1024): 7,358,464, 32.92 M in all.
    one = nl_parameters(1024, 512)
    five = 2 * nl_parameters(512, 256) + 3 * one
    assert (one, five) == (2_101_760, 7_358_464)
    assert count_parameters(EMCAResNet("resnet50", attention="nl")) == R50_PLAIN_PARAMS + one
    assert count_parameters(EMCAResNet("resnet50", attention="nl5")) == R50_PLAIN_PARAMS + five
