"""BAM (Park et al., BMVC 2018) against a float64 reference written from the equations with explicit
shifts and einsums (no conv2d, no nn.BatchNorm), a hand-computed case, and the published R-50 size."""

import math

import pytest
import torch
import torchvision

from emca.layers.bam import BAM

from conftest import randomise_parameters

EPS = 1e-5  # BatchNorm's default eps, which the reference applies by hand


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter and BN running statistic random, so that no term of the reference hides."""
    randomise_parameters(module, 0.5, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(0.3 * torch.randn(buffer.shape, generator=generator, dtype=buffer.dtype))
            elif name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator, dtype=buffer.dtype))


def batch_norm(z, bn, training, axes):
    """(z - mean) / sqrt(var + eps) * weight + bias; batch statistics (biased var) in training."""
    shape = [1] * z.dim()
    shape[1] = -1
    if training:
        mean = z.mean(dim=axes, keepdim=True)
        var = ((z - mean) ** 2).mean(dim=axes, keepdim=True)
    else:
        mean, var = bn.running_mean.view(shape), bn.running_var.view(shape)
    return (z - mean) / torch.sqrt(var + EPS) * bn.weight.view(shape) + bn.bias.view(shape)


def dilated_conv3x3(z, conv, d):
    """A 'same' 3x3 convolution of dilation d as the sum of nine shifted 1x1 products."""
    h, w = z.shape[2:]
    padded = torch.nn.functional.pad(z, (d, d, d, d))
    out = conv.bias.view(1, -1, 1, 1).expand(z.shape[0], -1, h, w).clone()
    for i in range(3):
        for j in range(3):
            window = padded[:, :, i * d : i * d + h, j * d : j * d + w]
            out = out + torch.einsum("oc,bchw->bohw", conv.weight[:, :, i, j], window)
    return out


def reference_bam(x, bam, training, dilation, combine="sum"):
    relu = torch.relu
    fc1, bn1, _, fc2 = bam.channel_gate
    pooled = x.sum(dim=(2, 3)) / (x.shape[2] * x.shape[3])
    hidden = relu(batch_norm(pooled @ fc1.weight.T + fc1.bias, bn1, training, axes=(0,)))
    channel = (hidden @ fc2.weight.T + fc2.bias)[:, :, None, None]

    layers = list(bam.spatial_gate)
    reduce_conv, reduce_bn = layers[0], layers[1]
    z = torch.einsum("oc,bchw->bohw", reduce_conv.weight[:, :, 0, 0], x) + reduce_conv.bias.view(1, -1, 1, 1)
    z = relu(batch_norm(z, reduce_bn, training, axes=(0, 2, 3)))
    for conv, bn in zip(layers[3:-1:3], layers[4:-1:3], strict=True):
        z = relu(batch_norm(dilated_conv3x3(z, conv, dilation), bn, training, axes=(0, 2, 3)))
    final = layers[-1]
    spatial = torch.einsum("oc,bchw->bohw", final.weight[:, :, 0, 0], z) + final.bias.view(1, -1, 1, 1)

    logits = channel + spatial if combine == "sum" else channel * spatial
    return x * (1 + torch.sigmoid(logits))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("combine", ["sum", "product"])
@pytest.mark.parametrize("dilation", [4, 2])
def test_matches_the_reference(training, combine, dilation):
    torch.manual_seed(0)
    bam = BAM(32, reduction=4, dilation=dilation, combine=combine).double()
    randomise(bam)
    bam.train(training)
    x = torch.randn(3, 32, 9, 7, dtype=torch.float64)  # not square: the pool must cover H and W
    expected = reference_bam(x, bam, training, dilation, combine)
    torch.testing.assert_close(bam(x), expected, rtol=1e-10, atol=1e-10)


def test_hand_computed_case():
    # C = 2, hidden = 1, a 1x1 map: a dilated 3x3 convolution sees only its centre tap, and with
    # identity BatchNorms (eps 0, running mean 0 and var 1, eval) every step is scalar arithmetic.
    bam = BAM(2, reduction=2).double().eval()
    with torch.no_grad():
        for module in bam.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                module.eps = 0.0
        fc1, _, _, fc2 = bam.channel_gate
        fc1.weight.copy_(torch.tensor([[0.5, 0.25]]))  # z = 0.5 * 1 + 0.25 * 2 = 1
        fc2.weight.copy_(torch.tensor([[1.0], [-1.0]]))  # channel = (1, -1)
        layers = list(bam.spatial_gate)
        layers[0].weight.copy_(torch.ones(1, 2, 1, 1))  # 1 + 2 = 3
        layers[3].weight.zero_()[0, 0, 1, 1] = 1.0  # centre tap 1: stays 3
        layers[6].weight.zero_()[0, 0, 1, 1] = 1.0
        layers[-1].weight.fill_(0.5)
        layers[-1].bias.fill_(-1.0)  # spatial = 0.5 * 3 - 1 = 0.5
    x = torch.tensor([1.0, 2.0], dtype=torch.float64).view(1, 2, 1, 1)

    def sigmoid(t):
        return 1 / (1 + math.exp(-t))

    summed = bam(x).flatten().tolist()  # logits (1 + 0.5, -1 + 0.5)
    assert summed == pytest.approx([1 * (1 + sigmoid(1.5)), 2 * (1 + sigmoid(-0.5))], abs=1e-12)
    bam.combine = "product"  # logits (1 * 0.5, -1 * 0.5)
    assert bam(x).flatten().tolist() == pytest.approx([1 + sigmoid(0.5), 2 * (1 + sigmoid(-0.5))], abs=1e-12)


def test_authors_structure_and_init():
    bam = BAM(64)
    kinds = [type(m).__name__ for m in bam.spatial_gate]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU"] * 3 + ["Conv2d"]
    assert [type(m).__name__ for m in bam.channel_gate] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    convs = [m for m in bam.spatial_gate if isinstance(m, torch.nn.Conv2d)]
    assert [(c.dilation, c.padding) for c in convs[1:3]] == [((4, 4), (4, 4))] * 2
    for module in bam.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            assert module.bias is not None and not module.bias.any()
    assert bam(torch.randn(2, 64, 8, 8)).shape == (2, 64, 8, 8)


def bam_parameters(c: int, r: int = 16, n: int = 2) -> int:
    h = c // r
    channel = (c * h + h) + 2 * h + (h * c + c)  # Linear, BN1d, Linear
    spatial = (c * h + h) + 2 * h + n * (9 * h * h + h + 2 * h) + (h + 1)  # 1x1+BN, n x (3x3+BN), 1x1
    return channel + spatial


@pytest.mark.parametrize("channels, reduction", [(64, 16), (256, 16), (96, 8)])
def test_parameter_count(channels, reduction):
    count = sum(p.numel() for p in BAM(channels, reduction).parameters())
    assert count == bam_parameters(channels, reduction)


def test_resnet50_parameter_count_is_the_published_one():
    # A BAM after layer1, layer2, layer3 of R-50 (the authors' model_resnet.py): 25,915,099, the
    # count of the authors' released R-50 + BAM weights; the BAM paper prints 25.92M.
    plain = sum(p.numel() for p in torchvision.models.resnet50().parameters())
    assert plain == 25_557_032
    total = plain + sum(sum(p.numel() for p in BAM(c).parameters()) for c in (256, 512, 1024))
    assert total == 25_915_099
    assert f"{total / 1e6:.2f}" == "25.92"


def test_gradients_reach_every_parameter():
    bam = BAM(32, reduction=4)
    randomise(bam, seed=1)
    bam(torch.randn(4, 32, 6, 6)).square().sum().backward()
    for name, parameter in bam.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dtype_is_kept(training):
    bam = BAM(32, reduction=4).train(training)
    x = torch.randn(2, 32, 6, 6)
    assert bam(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bam(x.bfloat16())
        assert out.dtype == torch.bfloat16 and out.shape == x.shape
        assert bam(x).dtype == torch.float32  # a float32 input stays float32 under autocast too
    assert bam.double()(x.double()).dtype == torch.float64


def test_eval_uses_running_statistics():
    # In eval mode one sample's output does not depend on the rest of the batch; in training it does.
    bam = BAM(32, reduction=4)
    randomise(bam, seed=2)
    x = torch.randn(4, 32, 6, 6)
    bam.eval()
    torch.testing.assert_close(bam(x)[:1], bam(x[:1]))
    bam.train()
    assert not torch.allclose(bam(x)[:2], bam(x[:2]))


@pytest.mark.parametrize(
    "options", [{"reduction": 0}, {"reduction": 64}, {"dilation": 0}, {"num_dilated_convs": -1}, {"combine": "max"}]
)
def test_bad_options_are_refused(options):
    with pytest.raises(ValueError):
        BAM(32, **options)
