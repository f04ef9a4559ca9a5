"""DoubleAttention (A^2-Nets) against references written from the paper's equations, not from the module."""

import math

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from emca.layers.double_attention import DoubleAttention, a2_positions

from conftest import randomise_parameters


def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    return randomise_parameters(module, 0.5, seed)


def conv1x1(conv: nn.Conv2d, x: np.ndarray) -> np.ndarray:
    w = conv.weight.detach().double().numpy()[:, :, 0, 0]
    out = np.einsum("oc,bchw->bohw", w, x)
    if conv.bias is not None:
        out = out + conv.bias.detach().double().numpy()[None, :, None, None]
    return out


def reference_gather_distribute(module: DoubleAttention, x: np.ndarray) -> np.ndarray:
    """Eqs. 3-5 location by location: g_j = sum_i softmax_i(b_j)_i a_i, z_i = sum_j v_ij g_j."""
    a, b, v = conv1x1(module.features, x), conv1x1(module.gather_maps, x), conv1x1(module.distribute_maps, x)
    batch, m, h, w = a.shape
    n = b.shape[1]
    z = np.zeros((batch, m, h, w))
    for s in range(batch):
        a_loc = a[s].reshape(m, -1)
        bm = np.exp(b[s].reshape(n, -1))
        bm = bm / bm.sum(axis=1, keepdims=True)  # each of the n maps over the locations
        g = np.zeros((m, n))
        for j in range(n):
            for i in range(h * w):
                g[:, j] += bm[j, i] * a_loc[:, i]
        vv = np.exp(v[s].reshape(n, -1))
        vv = vv / vv.sum(axis=0, keepdims=True)  # at each location over the n descriptors
        zs = np.zeros((m, h * w))
        for i in range(h * w):
            for j in range(n):
                zs[:, i] += vv[j, i] * g[:, j]
        z[s] = zs.reshape(m, h, w)
    return z


def reference_right_associated(module: DoubleAttention, x: np.ndarray) -> np.ndarray:
    """The paper's other association, Z = A [softmax(B)^T softmax(V)], with its HW x HW matrix."""
    a, b, v = conv1x1(module.features, x), conv1x1(module.gather_maps, x), conv1x1(module.distribute_maps, x)
    a, b, v = (t.reshape(t.shape[0], t.shape[1], -1) for t in (a, b, v))
    bs = np.exp(b - b.max(axis=2, keepdims=True))
    bs /= bs.sum(axis=2, keepdims=True)
    vs = np.exp(v - v.max(axis=1, keepdims=True))
    vs /= vs.sum(axis=1, keepdims=True)
    pairwise = np.einsum("bni,bnj->bij", bs, vs)  # (B, HW, HW)
    return np.einsum("bmi,bij->bmj", a, pairwise).reshape(x.shape[0], -1, *x.shape[2:])


def reference(module: DoubleAttention, x: torch.Tensor, z_fn=reference_gather_distribute) -> torch.Tensor:
    xn = x.detach().double().numpy()
    out = conv1x1(module.proj, z_fn(module, xn))
    if module.norm is not None:
        bn = module.norm
        if bn.training:
            mean, var = out.mean(axis=(0, 2, 3)), out.var(axis=(0, 2, 3))
        else:
            mean, var = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
        gamma, beta = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
        out = (out - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + bn.eps)
        out = out * gamma[None, :, None, None] + beta[None, :, None, None]
    return torch.from_numpy(xn + out)


@pytest.mark.parametrize("z_fn", [reference_gather_distribute, reference_right_associated])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(bias, z_fn):
    module = randomise(DoubleAttention(8, key_channels=3, value_channels=5, bias=bias)).double()
    x = torch.randn(2, 8, 4, 5, dtype=torch.float64)
    for train in (True, False):
        module.train(train)
        out = module(x)
        assert out.shape == x.shape and out.dtype == x.dtype
        torch.testing.assert_close(out, reference(module, x, z_fn), rtol=1e-10, atol=1e-12)


def test_norm_option_train_and_eval():
    module = DoubleAttention(6, key_channels=2, value_channels=3, norm=True).double()
    x = torch.randn(3, 6, 3, 4, dtype=torch.float64)
    # zero-initialised gamma: the block starts as the identity
    torch.testing.assert_close(module(x), x)
    randomise(module, seed=1)
    with torch.no_grad():
        module.norm.running_mean.uniform_(-1.0, 1.0)
        module.norm.running_var.uniform_(0.5, 2.0)
    module.eval()
    torch.testing.assert_close(module(x), reference(module, x), rtol=1e-10, atol=1e-12)
    module.train()
    expected = reference(module, x)  # batch statistics, computed before the forward updates running stats
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-12)


def test_hand_computed():
    # C = m = n = 1 on two locations x = (0, ln 3). A = B = x, so softmax_HW(B) = (1/4, 3/4) and the single
    # descriptor is g = 0.75 ln 3; V is a softmax over n = 1, i.e. 1. out = x + 2 g + 0.5.
    module = DoubleAttention(1, key_channels=1, value_channels=1)
    with torch.no_grad():
        for conv in (module.features, module.gather_maps):
            conv.weight.fill_(1.0)
            conv.bias.zero_()
        module.distribute_maps.weight.fill_(-7.0)
        module.proj.weight.fill_(2.0)
        module.proj.bias.fill_(0.5)
    x = torch.tensor([[[[0.0, math.log(3.0)]]]])
    expected = x + 2.0 * 0.75 * math.log(3.0) + 0.5
    torch.testing.assert_close(module(x), expected)


def test_distribution_is_a_softmax_over_descriptors():
    # Two descriptors, one location each "owns" via V: with A = 1 everywhere every descriptor is 1 (the maps
    # are convex weights), and a convex mix over n of 1s is 1 at every location, whatever V's logits.
    module = DoubleAttention(2, key_channels=2, value_channels=1)
    randomise(module, seed=2)
    with torch.no_grad():
        module.features.weight.zero_()
        module.features.bias.fill_(1.0)
        module.proj.weight.fill_(1.0)
        module.proj.bias.zero_()
    x = torch.randn(1, 2, 3, 3) * 5
    torch.testing.assert_close(module(x) - x, torch.ones_like(x))


def test_dtype_and_autocast():
    module = DoubleAttention(16, norm=True)
    randomise(module)
    x = torch.randn(2, 16, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x.bfloat16())
        assert module(x).dtype == torch.float32
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    torch.testing.assert_close(out.float(), module(x), rtol=0.1, atol=0.2)


@pytest.mark.parametrize("norm", [False, True])
def test_gradients_reach_every_parameter(norm):
    module = randomise(DoubleAttention(8, key_channels=3, value_channels=4, norm=norm))
    (module(torch.randn(2, 8, 4, 4)) ** 2).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def a2_param_count(c, m, n, bias=True, norm=False):
    return c * (m + 2 * n) + m * c + ((m + 2 * n + c) if bias else 0) + (2 * c if norm else 0)


@pytest.mark.parametrize("kwargs", [{}, {"bias": False}, {"norm": True}, {"key_channels": 64, "value_channels": 32}])
def test_parameter_count(kwargs):
    module = DoubleAttention(256, **kwargs)
    m, n = kwargs.get("value_channels", 128), kwargs.get("key_channels", 128)
    expected = a2_param_count(256, m, n, kwargs.get("bias", True), kwargs.get("norm", False))
    assert sum(p.numel() for p in module.parameters()) == expected
    assert sum(b.numel() for b in module.buffers() if b.dtype.is_floating_point) == (2 * 256 if "norm" in kwargs else 0)


def test_positions():
    assert a2_positions((3, 4, 6, 3)) == ((1, 1), (1, 3), (2, 1), (2, 3), (2, 5))  # ResNet-50 and -34
    assert a2_positions((3, 4, 23, 3)) == ((1, 1), (1, 3), (2, 6), (2, 13), (2, 20))  # the NL code's R-101
    assert a2_positions((2, 2, 2, 2)) == ((1, 0), (1, 1), (2, 0), (2, 1))  # ResNet-18
    assert a2_positions((3, 8, 36, 3)) == ((1, 3), (1, 7), (2, 11), (2, 23), (2, 35))  # ResNet-152
    for depths in ((3, 4, 6, 3), (2, 2, 2, 2), (3, 24, 36, 3), (1, 1, 1, 1)):
        for stage, block in a2_positions(depths):
            assert 0 <= block < depths[stage]


def test_resnet50_with_paper_placement():
    # 5 blocks with m = n = C/2 (2 C^2 weights + 2 C biases each) after res3 units 1, 3 and res4 units 1, 3, 5:
    # 2 * (2 * 512^2 + 1024) + 3 * (2 * 1024^2 + 2048) = 7,350,272, i.e. 32.91M in all; the paper prints 33.0M.
    model = torchvision.models.resnet50()
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    added = 0
    for stage, block in a2_positions((3, 4, 6, 3)):
        channels = stages[stage][block].conv3.out_channels
        attention = DoubleAttention(channels)
        added += a2_param_count(channels, channels // 2, channels // 2)
        stages[stage][block] = nn.Sequential(stages[stage][block], attention)
    assert added == 7_350_272
    assert sum(p.numel() for p in model.parameters()) == 25_557_032 + added
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
