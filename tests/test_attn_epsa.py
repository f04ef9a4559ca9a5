"""PSAConv (EPSANet) against references written from the paper's equations, not from the module."""

import math

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from emca.layers.epsanet import EPSA_SIZES, PSAConv, SEWeight, psa_conv_options

from conftest import randomise_parameters


def reference_psa(module: PSAConv, x: torch.Tensor) -> torch.Tensor:
    """Eqs. of the PSA module in numpy: each grouped conv as an explicit sum over its input-channel group and
    kernel window (im2col by slicing), SE as matrix products on the spatial means, softmax by exp / sum."""
    x = x.detach().double().numpy()
    batch, cin = x.shape[:2]
    stride = module.stride
    feats, logits = [], []
    ses = [module.se] * len(module.kernels) if isinstance(module.se, SEWeight) else list(module.se)
    for branch, k, g, se in zip(module.branches, module.kernels, module.groups, ses, strict=True):
        w = branch.weight.detach().double().numpy()  # (split, cin / g, k, k)
        split = w.shape[0]
        pad = k // 2
        xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        h_out = (x.shape[2] + 2 * pad - k) // stride + 1
        w_out = (x.shape[3] + 2 * pad - k) // stride + 1
        out = np.zeros((batch, split, h_out, w_out))
        cin_g, cout_g = cin // g, split // g
        for o in range(split):
            grp = o // cout_g
            for dy in range(k):
                for dx in range(k):
                    window = xp[:, grp * cin_g:(grp + 1) * cin_g,
                                dy:dy + stride * (h_out - 1) + 1:stride, dx:dx + stride * (w_out - 1) + 1:stride]
                    out[:, o] += np.einsum("bchw,c->bhw", window, w[o, :, dy, dx])
        feats.append(out)
        pooled = out.mean(axis=(2, 3))  # (B, split)
        w1 = se.fc1.weight.detach().double().numpy()[:, :, 0, 0]
        b1 = se.fc1.bias.detach().double().numpy()
        w2 = se.fc2.weight.detach().double().numpy()[:, :, 0, 0]
        b2 = se.fc2.bias.detach().double().numpy()
        hidden = np.maximum(pooled @ w1.T + b1, 0.0)
        logits.append(1.0 / (1.0 + np.exp(-(hidden @ w2.T + b2))))
    e = np.exp(np.stack(logits, axis=0))  # (S, B, split): softmax over the S branches per channel
    att = e / e.sum(axis=0, keepdims=True)
    return torch.from_numpy(np.concatenate([f * a[:, :, None, None] for f, a in zip(feats, att, strict=True)], 1))


def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    return randomise_parameters(module, 0.3, seed)


def psa_param_count(cin, cout, kernels, groups, reduction, shared):
    split = cout // len(kernels)
    hidden = max(1, split // reduction)
    convs = sum((cin // g) * split * k * k for k, g in zip(kernels, groups, strict=True))
    se = split * hidden + hidden + hidden * split + split
    return convs + se * (1 if shared else len(kernels))


@pytest.mark.parametrize("shared_se", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
def test_matches_reference_train_and_eval(shared_se, stride):
    module = randomise(PSAConv(64, 64, stride, reduction=4, shared_se=shared_se)).double()
    x = torch.randn(2, 64, 7, 6, dtype=torch.float64)
    expected = reference_psa(module, x)
    for train in (True, False):
        module.train(train)
        out = module(x)
        assert out.shape == (2, 64, (7 - 1) // stride + 1, (6 - 1) // stride + 1)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_in_out_channels_differ():
    module = randomise(PSAConv(16, 64, 2, reduction=16), seed=3).double()
    x = torch.randn(1, 16, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(module(x), reference_psa(module, x), rtol=1e-10, atol=1e-12)


def test_hand_computed():
    # 4 channels, 1x1 kernels, one channel per branch: branch i multiplies the all-ones input by (i + 1) per
    # input channel, so F_i = 4 (i + 1) everywhere. SE (one hidden unit): relu(1 * 4(i+1)) * 0.25 - 1 = i,
    # sigmoid(i); the output channel i is F_i * exp(sigmoid(i)) / sum_j exp(sigmoid(j)).
    module = PSAConv(4, 4, kernels=(1, 1, 1, 1), groups=(1, 1, 1, 1), reduction=1)
    with torch.no_grad():
        for i, branch in enumerate(module.branches):
            branch.weight.fill_(i + 1.0)
        module.se.fc1.weight.fill_(1.0)
        module.se.fc1.bias.zero_()
        module.se.fc2.weight.fill_(0.25)
        module.se.fc2.bias.fill_(-1.0)
    sig = [1.0 / (1.0 + math.exp(-i)) for i in range(4)]
    total = sum(math.exp(s) for s in sig)
    expected = torch.tensor([4.0 * (i + 1) * math.exp(sig[i]) / total for i in range(4)])
    out = module(torch.ones(1, 4, 2, 3))
    torch.testing.assert_close(out, expected[None, :, None, None].expand(1, 4, 2, 3))


def test_dtype_and_autocast():
    module = PSAConv(64, 64)
    x = torch.randn(2, 64, 6, 6)
    assert module(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x.bfloat16())
        # a float32 input gives what the replaced nn.Conv2d would give under autocast
        conv_dtype = nn.Conv2d(64, 64, 3, padding=1)(x).dtype
        assert module(x).dtype == conv_dtype
    assert out.dtype == torch.bfloat16 and out.shape == (2, 64, 6, 6)
    torch.testing.assert_close(out.float(), module(x), rtol=0.1, atol=0.05)


@pytest.mark.parametrize("shared_se", [True, False])
def test_gradients_reach_every_parameter(shared_se):
    module = randomise(PSAConv(64, 64, 2, reduction=4, shared_se=shared_se))
    (module(torch.randn(2, 64, 6, 6)) ** 2).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("shared_se", [True, False])
@pytest.mark.parametrize("size", ["small"])
def test_parameter_count(size, shared_se):
    opts = psa_conv_options(size)
    module = PSAConv(256, 256, reduction=16, shared_se=shared_se, **opts)
    expected = psa_param_count(256, 256, opts["kernels"], opts["groups"], 16, shared_se)
    assert sum(p.numel() for p in module.parameters()) == expected
    # small at 64 channels by hand: 64*16*9 + 16*16*25 + 8*16*49 + 4*16*81 = 27072, SE(16, r=16): 16+1+16+16
    assert sum(p.numel() for p in PSAConv(64, 64).parameters()) == 27072 + 49


def test_resnet50_small_matches_published_count():
    # EPSANet-50 (Small): 22.56M in the official README; every Bottleneck.conv2 replaced, bn2 kept.
    model = torchvision.models.resnet50()
    for block in model.modules():
        if isinstance(block, Bottleneck):
            c = block.conv2
            block.conv2 = PSAConv(c.in_channels, c.out_channels, c.stride[0], **psa_conv_options("small"))
    assert sum(p.numel() for p in model.parameters()) == 22_561_715
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_basic_block_conv2():
    # ResNet-18/34: PSAConv replaces BasicBlock.conv2 (planes -> planes, stride 1); the 64-channel stage fits
    # the small groups, not 32 groups per branch.
    block = BasicBlock(64, 64)
    block.conv2 = PSAConv(64, 64, **psa_conv_options("small"))
    assert block(torch.randn(2, 64, 8, 8)).shape == (2, 64, 8, 8)
    with pytest.raises(ValueError, match="divisible by 32"):
        PSAConv(64, 64, groups=(32,) * 4)


def test_presets_and_errors():
    assert EPSA_SIZES == {"small": {"kernels": (3, 5, 7, 9), "groups": (1, 4, 8, 16)}}
    with pytest.raises(ValueError, match="size"):
        psa_conv_options("large")  # not reproducible (module docstring), so not offered
    with pytest.raises(ValueError, match="not divisible"):
        PSAConv(64, 66)
    with pytest.raises(ValueError, match="one group count per kernel"):
        PSAConv(64, 64, kernels=(3, 5), groups=(1,))
