"""SKConv (SKNet) against timm's SelectiveKernel with the same weights, configured as the paper's unit, against a
numpy reference written from the paper's equations, and by hand; sk_block's placement in both block types."""

import math

import numpy as np
import pytest
import timm
import torch
import torchvision
from timm.layers import SelectiveKernel
from timm.models.sknet import SelectiveKernelBasic, SelectiveKernelBottleneck
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from emca.layers.selective_kernel import SKConv, attention_width, sk_block
from emca.models.summary import count_parameters, measure_gflops

from conftest import randomise_parameters

# Our module's state_dict keys -> timm's SelectiveKernel's (the same tensors under other names).
TIMM_NAMES = {"paths.{m}.0": "paths.{m}.conv", "paths.{m}.1": "paths.{m}.bn", "fc1": "attn.fc_reduce",
              "bn": "attn.bn", "fc2": "attn.fc_select"}


def timm_key(key: str) -> str:
    for ours, theirs in TIMM_NAMES.items():
        for m in range(4):
            prefix = ours.format(m=m)
            if key.startswith(prefix + "."):
                return theirs.format(m=m) + key[len(prefix):]
    raise KeyError(key)


def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random parameters and BN running statistics (positive variances), so eval mode uses them."""
    randomise_parameters(module, 0.5, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.copy_(0.3 * torch.randn(bn.running_mean.shape, generator=generator))
                bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=generator))
    return module


def paper_timm_sk(module: SKConv) -> SelectiveKernel:
    """timm's SelectiveKernel set to the paper's unit (whole input to every path, 3x3 dilated for 5x5, d given),
    with `module`'s weights."""
    theirs = SelectiveKernel(module.in_channels, module.out_channels, kernel_size=list(module.kernels),
                             stride=module.stride, groups=module.groups, rd_channels=module.fc1.out_channels,
                             keep_3x3=True, split_input=False).to(module.fc1.weight.dtype)
    theirs.load_state_dict({timm_key(k): v for k, v in module.state_dict().items()})
    return theirs


@pytest.mark.parametrize("stride,groups,kernels", [(1, 4, (3, 5)), (2, 1, (3, 5)), (1, 2, (3, 5, 7))])
def test_matches_timm_selective_kernel(stride, groups, kernels):
    module = randomise(SKConv(8, 12, stride, kernels=kernels, groups=groups, reduction=4, min_channels=2)).double()
    theirs = paper_timm_sk(module)
    x = torch.randn(3, 8, 7, 6, dtype=torch.float64)
    for train in (False, True):
        module.train(train), theirs.train(train)
        out = module(x)
        assert out.shape == (3, 12, (7 - 1) // stride + 1, (6 - 1) // stride + 1)
        torch.testing.assert_close(out, theirs(x), rtol=1e-10, atol=1e-12)


def conv_numpy(x: np.ndarray, w: np.ndarray, stride: int, dilation: int, groups: int) -> np.ndarray:
    """A grouped, dilated 3x3 convolution (padding = dilation) as an explicit sum over each output channel's
    input group and kernel taps."""
    batch, cin, h, wd = x.shape
    cout = w.shape[0]
    xp = np.pad(x, ((0, 0), (0, 0), (dilation, dilation), (dilation, dilation)))
    h_out, w_out = (h - 1) // stride + 1, (wd - 1) // stride + 1
    out = np.zeros((batch, cout, h_out, w_out))
    cin_g, cout_g = cin // groups, cout // groups
    for o in range(cout):
        g = o // cout_g
        for dy in range(3):
            for dx in range(3):
                window = xp[:, g * cin_g:(g + 1) * cin_g, dy * dilation:dy * dilation + stride * (h_out - 1) + 1:stride,
                            dx * dilation:dx * dilation + stride * (w_out - 1) + 1:stride]
                out[:, o] += np.einsum("bchw,c->bhw", window, w[o, :, dy, dx])
    return out


def bn_numpy(bn: nn.BatchNorm2d, x: np.ndarray) -> np.ndarray:
    """Eval-mode BN: (x - running mean) / sqrt(running var + eps) * gamma + beta, per channel."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean, var = bn.running_mean.double().numpy().reshape(shape), bn.running_var.double().numpy().reshape(shape)
    gamma, beta = bn.weight.detach().double().numpy().reshape(shape), bn.bias.detach().double().numpy().reshape(shape)
    return (x - mean) / np.sqrt(var + bn.eps) * gamma + beta


def reference_sk(module: SKConv, x: torch.Tensor) -> torch.Tensor:
    """The paper's Split / Fuse / Select in numpy (eval mode), from the equations of the module docstring."""
    xn = x.double().numpy()
    u = []
    for (conv, bn, _), k in zip(module.paths, module.kernels, strict=True):
        pre = conv_numpy(xn, conv.weight.detach().double().numpy(), module.stride, (k - 1) // 2, module.groups)
        u.append(np.maximum(bn_numpy(bn, pre), 0.0))
    s = sum(u).mean(axis=(2, 3))  # (B, C)
    z = np.maximum(bn_numpy(module.bn, s @ module.fc1.weight.detach().double().numpy()[:, :, 0, 0].T), 0.0)
    w = module.fc2.weight.detach().double().numpy()[:, :, 0, 0]  # (M * C, d): W_1 .. W_M stacked
    c = module.out_channels
    logits = np.stack([z @ w[m * c:(m + 1) * c].T for m in range(len(u))])  # (M, B, C)
    e = np.exp(logits - logits.max(axis=0))
    a = e / e.sum(axis=0)
    return torch.from_numpy(sum(a[m][:, :, None, None] * u[m] for m in range(len(u))))


@pytest.mark.parametrize("stride,groups,kernels", [(1, 2, (3, 5)), (2, 4, (3, 5, 7))])
def test_matches_reference(stride, groups, kernels):
    module = randomise(SKConv(8, 8, stride, kernels=kernels, groups=groups, reduction=2, min_channels=3), seed=2)
    module = module.double().eval()
    x = torch.randn(2, 8, 6, 5, dtype=torch.float64)
    torch.testing.assert_close(module(x), reference_sk(module, x), rtol=1e-10, atol=1e-12)


def test_hand_computed():
    # One channel, both paths' kernels only at the centre tap: U_1 = 1 * x, U_2 = 2 * x on x = 1 (BN made the
    # identity: running var 1 - eps). s = 3, z = relu(1 * 3) = 3; logits (0 * 3, ln 2 / 3 * 3) = (0, ln 2), so
    # a = (1/3, 2/3) and V = 1/3 * 1 + 2/3 * 2 = 5/3 at every position (the centre tap never reads the padding).
    module = SKConv(1, 1, groups=1, reduction=1, min_channels=1).eval()
    with torch.no_grad():
        for m, (conv, bn, _) in enumerate(module.paths):
            conv.weight.zero_()
            conv.weight[0, 0, 1, 1] = m + 1.0
            bn.running_var.fill_(1.0 - bn.eps)
        module.bn.running_var.fill_(1.0 - module.bn.eps)
        module.fc1.weight.fill_(1.0)
        module.fc2.weight.copy_(torch.tensor([0.0, math.log(2.0) / 3.0]).view(2, 1, 1, 1))
    torch.testing.assert_close(module(torch.ones(1, 1, 3, 4)), torch.full((1, 1, 3, 4), 5.0 / 3.0))


def test_attention_width_and_options():
    # d = max(C / r, L): the prototxt's fc1 widths at ResNeXt-50's 128 / 256 / 512 / 1024 (32, 32, 32, 64).
    assert [attention_width(c, 16, 32) for c in (128, 256, 512, 1024)] == [32, 32, 32, 64]
    module = SKConv(64, 128, 2, kernels=(3, 5, 7), groups=32, reduction=2, min_channels=8)
    assert [p[0].dilation for p in module.paths] == [(1, 1), (2, 2), (3, 3)]
    assert {p[0].kernel_size for p in module.paths} == {(3, 3)} and module.paths[0][0].groups == 32
    assert module.fc1.out_channels == 64 and module.fc2.out_channels == 3 * 128
    assert module(torch.randn(2, 64, 8, 8)).shape == (2, 128, 4, 4)
    for kwargs, message in (({"groups": 3}, "groups=3 must divide"), ({"kernels": (3,)}, "at least 2 odd"),
                            ({"kernels": (3, 4)}, "at least 2 odd"), ({"reduction": 0}, "must be positive")):
        with pytest.raises(ValueError, match=message):
            SKConv(64, 64, **kwargs)


def copy_into_timm_block(ours: nn.Module, theirs: nn.Module, sk: str) -> None:
    """Our edited torchvision block's tensors into timm's SK block (the SK conv under `sk`, the rest by name)."""
    state = {}
    for key, value in ours.state_dict().items():
        if key.startswith(sk + "."):
            state[f"{sk}." + timm_key(key[len(sk) + 1:])] = value
        else:
            for conv, bn in (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")):
                key = key.replace(f"{conv}.weight", f"{conv}.conv.weight").replace(f"{bn}.", f"{conv}.bn.")
            state[key] = value
    theirs.load_state_dict(state)


def assert_same_block(block: nn.Module, theirs: nn.Module, sk: str, x: torch.Tensor, seed: int) -> None:
    """Our block, randomised, and timm's holding its tensors compute the same in eval and in train mode."""
    randomise(block, seed=seed)
    copy_into_timm_block(block, theirs, sk)
    for train in (False, True):
        block.train(train), theirs.train(train)
        torch.testing.assert_close(block(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_bottleneck_is_timms_sk_bottleneck():
    # SKNet-50's block: a ResNeXt (32 x 4d) bottleneck, stride 2 with a projection shortcut, conv2 + bn2 -> SK.
    downsample = nn.Sequential(nn.Conv2d(64, 256, 1, stride=2, bias=False), nn.BatchNorm2d(256))
    block = Bottleneck(64, 64, stride=2, downsample=downsample, groups=32, base_width=4)
    sk_block(block)
    assert isinstance(block.conv2, SKConv) and isinstance(block.bn2, nn.Identity) and block.conv2.groups == 32
    downsample = nn.Sequential(nn.Conv2d(64, 256, 1, stride=2, bias=False), nn.BatchNorm2d(256))
    theirs = SelectiveKernelBottleneck(64, 64, stride=2, downsample=downsample, cardinality=32, base_width=4,
                                       sk_kwargs=dict(rd_channels=32, split_input=False))
    assert_same_block(block, theirs, "conv2", torch.randn(2, 64, 8, 8), seed=4)


def test_basic_block_is_timms_selective_kernel_basic():
    # ResNet-18/34: conv1 (the stride and the channel change) + bn1 -> SK, conv2 stays: timm's SelectiveKernelBasic.
    downsample = nn.Sequential(nn.Conv2d(32, 64, 1, stride=2, bias=False), nn.BatchNorm2d(64))
    block = BasicBlock(32, 64, stride=2, downsample=downsample)
    sk_block(block, groups=8)
    assert isinstance(block.conv1, SKConv) and isinstance(block.bn1, nn.Identity)
    assert type(block.conv2) is nn.Conv2d and isinstance(block.bn2, nn.BatchNorm2d)
    downsample = nn.Sequential(nn.Conv2d(32, 64, 1, stride=2, bias=False), nn.BatchNorm2d(64))
    theirs = SelectiveKernelBasic(32, 64, stride=2, downsample=downsample,
                                  sk_kwargs=dict(groups=8, rd_channels=32, split_input=False))
    assert_same_block(block, theirs, "conv1", torch.randn(2, 32, 8, 8), seed=5)


def test_sknet50_matches_published_size():
    # SKNet-50 = ResNeXt-50 (32x4d) with every bottleneck 3x3 an SK conv: 27.5M and 4.47 GFLOPs against
    # ResNeXt-50's 4.24 (paper Table 2 / implus/SKNet README). Ours: 27,479,784 (timm's skresnext50_32x4d too),
    # and +0.23 GFLOPs over the same counter's ResNeXt-50.
    # (On the meta device: shapes and counts without the arithmetic.)
    with torch.device("meta"):
        model = torchvision.models.resnext50_32x4d()
        plain = measure_gflops(model, 224)
        for block in model.modules():
            if isinstance(block, Bottleneck):
                sk_block(block)
        assert count_parameters(model) == 27_479_784 == count_parameters(timm.create_model("skresnext50_32x4d"))
    assert round(count_parameters(model) / 1e6, 1) == 27.5
    assert abs((measure_gflops(model, 224) - plain) - (4.47 - 4.24)) <= 0.01


def test_dtype_and_autocast():
    module = SKConv(64, 64)
    x = torch.randn(2, 64, 6, 6)
    assert module(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x.bfloat16())
        assert module(x).dtype == nn.Conv2d(64, 64, 3, padding=1)(x).dtype
    assert out.dtype == torch.bfloat16 and out.shape == (2, 64, 6, 6)
    torch.testing.assert_close(out.float(), module(x), rtol=0.1, atol=0.05)


def test_gradients_reach_every_parameter():
    module = randomise(SKConv(32, 32, 2, groups=4, min_channels=8))
    (module(torch.randn(2, 32, 6, 6)) ** 2).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
