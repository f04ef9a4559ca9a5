"""CBAM against timm's CbamModule (same weights), a numpy reference with explicit loops, and a hand case."""

import math

import numpy as np
import pytest
import torch
from timm.layers.cbam import CbamModule

from emca.layers.cbam import CBAM, CBAMChannelExcitation
from emca.layers.pooling import pool_descriptor

from conftest import randomise_parameters

R50_PLAIN_PARAMS = 25_557_032  # torchvision.models.resnet50()
R50_STAGES = ((256, 3), (512, 4), (1024, 6), (2048, 3))  # (block output channels, blocks)


def randomized(module: CBAM, seed: int = 0) -> CBAM:
    """Every parameter and BN statistic random (the zero-initialised BN scale would otherwise make
    the spatial gate a constant 0.5, and a comparison blind to the spatial conv)."""
    randomise_parameters(module, 1.0, seed)
    with torch.no_grad():
        module.spatial_bn.running_mean.fill_(0.3)
        module.spatial_bn.running_var.fill_(2.0)
    return module


def timm_copy(ours: CBAM) -> CbamModule:
    """timm's CbamModule holding our weights: it has the same structure (MLP, conv without bias,
    one-channel BN), so it is made equal by settings alone: MLP biases on, BN momentum 0.01 as in
    the authors' code, and the conv's two input channels swapped (timm stacks [mean, max], the
    authors and we [max, mean])."""
    channels = ours.excitation.fc2.out_features
    hidden = ours.excitation.fc1.out_features
    k = ours.spatial_conv.kernel_size[0]
    ref = CbamModule(channels, rd_channels=hidden, spatial_kernel_size=k, mlp_bias=True)
    ref = ref.to(ours.spatial_conv.weight.dtype)
    bn = ref.spatial.conv.bn
    bn.momentum = 0.01  # the authors' BasicConv (MODELS/cbam.py); timm's default is 0.1
    with torch.no_grad():
        ref.channel.fc1.weight.copy_(ours.excitation.fc1.weight[:, :, None, None])
        ref.channel.fc1.bias.copy_(ours.excitation.fc1.bias)
        ref.channel.fc2.weight.copy_(ours.excitation.fc2.weight[:, :, None, None])
        ref.channel.fc2.bias.copy_(ours.excitation.fc2.bias)
        ref.spatial.conv.conv.weight.copy_(ours.spatial_conv.weight[:, [1, 0]])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, name).copy_(getattr(ours.spatial_bn, name))
    return ref


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_matches_timm_cbam_module_with_the_same_weights(mode):
    torch.manual_seed(1)
    ours = randomized(CBAM(32, reduction=8)).double()
    ref = timm_copy(ours)
    ours.train(mode == "train")
    ref.train(mode == "train")
    y = torch.randn(3, 32, 9, 7, dtype=torch.float64)
    torch.testing.assert_close(ours(y), ref(y), rtol=1e-10, atol=1e-12)
    # In train mode the BN statistics must move the same way too (momentum 0.01 on both sides).
    torch.testing.assert_close(ours.spatial_bn.running_mean, ref.spatial.conv.bn.running_mean)
    torch.testing.assert_close(ours.spatial_bn.running_var, ref.spatial.conv.bn.running_var)


def numpy_cbam(module: CBAM, y: torch.Tensor) -> np.ndarray:
    """The paper's Eqs. 2-3 with explicit loops, eval-mode BN: an independent formulation."""
    x = y.detach().numpy().astype(np.float64)
    e = module.excitation
    w1, b1 = e.fc1.weight.detach().double().numpy(), e.fc1.bias.detach().double().numpy()
    w2, b2 = e.fc2.weight.detach().double().numpy(), e.fc2.bias.detach().double().numpy()
    kernel = module.spatial_conv.weight.detach().double().numpy()[0]  # (2, k, k)
    bn = module.spatial_bn
    gamma, beta = bn.weight.item(), bn.bias.item()
    mu, var, eps = bn.running_mean.item(), bn.running_var.item(), bn.eps

    def sigmoid(t):
        return 1 / (1 + np.exp(-t))

    batch, channels, height, width = x.shape
    k = kernel.shape[-1]
    out = np.empty_like(x)
    for b in range(batch):
        logits = np.zeros(channels)
        for statistic in (x[b].mean(axis=(1, 2)), x[b].max(axis=(1, 2))):
            hidden = np.maximum(w1 @ statistic + b1, 0)
            logits += w2 @ hidden + b2
        refined = x[b] * sigmoid(logits)[:, None, None]
        planes = np.stack((refined.max(axis=0), refined.mean(axis=0)))  # (2, H, W), [max, mean]
        padded = np.pad(planes, ((0, 0), (k // 2, k // 2), (k // 2, k // 2)))
        conv = np.zeros((height, width))
        for i in range(height):
            for j in range(width):
                conv[i, j] = (padded[:, i : i + k, j : j + k] * kernel).sum()
        spatial = sigmoid(gamma * (conv - mu) / math.sqrt(var + eps) + beta)
        out[b] = refined * spatial[None]
    return out


def test_matches_a_numpy_reference_with_explicit_loops():
    torch.manual_seed(2)
    module = randomized(CBAM(8, reduction=4, spatial_kernel=3), seed=3).double().eval()
    y = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    np.testing.assert_allclose(module(y).detach().numpy(), numpy_cbam(module, y), rtol=1e-10, atol=1e-12)


def test_channel_excitation_hand_computed():
    excitation = CBAMChannelExcitation(2, reduction=2)  # hidden width 1
    with torch.no_grad():
        excitation.fc1.weight.copy_(torch.tensor([[1.0, -1.0]]))
        excitation.fc1.bias.copy_(torch.tensor([0.5]))
        excitation.fc2.weight.copy_(torch.tensor([[2.0], [-1.0]]))
        excitation.fc2.bias.copy_(torch.tensor([0.1, 0.2]))
    # mean (1, 0): fc1 -> 1.5 -> (3.1, -1.3); max (3, 1): fc1 -> 2.5 -> (5.1, -2.3); a third
    # statistic (0, 4): fc1 -> -3.5, ReLU -> 0 -> (0.1, 0.2), the biases alone.
    descriptor = torch.tensor([[[1.0, 3.0, 0.0], [0.0, 1.0, 4.0]]])  # (B=1, C=2, K=3)
    torch.testing.assert_close(excitation(descriptor[..., :2]), torch.tensor([[8.2, -3.6]]))
    torch.testing.assert_close(excitation(descriptor), torch.tensor([[8.3, -3.4]]))


def test_channel_excitation_on_a_given_descriptor_is_mlp_of_each_statistic_summed():
    # As EMCA's W_m2 it gets a fused (B, C, 2) vector, not a map: no pooling of its own.
    torch.manual_seed(4)
    excitation = CBAMChannelExcitation(48, reduction=16).double()
    descriptor = torch.randn(5, 48, 2, dtype=torch.float64)
    w1, b1 = excitation.fc1.weight, excitation.fc1.bias
    w2, b2 = excitation.fc2.weight, excitation.fc2.bias
    hidden = torch.einsum("hc,bck->bkh", w1, descriptor) + b1[None, None]
    expected = torch.einsum("ch,bkh->bc", w2, hidden.clamp(min=0)) + 2 * b2
    torch.testing.assert_close(excitation(descriptor), expected)


def test_gate_child_exposes_the_channel_scales():
    torch.manual_seed(5)
    module = randomized(CBAM(16, reduction=4)).eval()
    seen = []
    module.gate.register_forward_hook(lambda _m, _i, out: seen.append(out))
    y = torch.randn(2, 16, 6, 6)
    module(y)
    assert isinstance(module.gate, torch.nn.Sigmoid)
    torch.testing.assert_close(seen[0], torch.sigmoid(module.excitation(pool_descriptor(y, "mean_max"))))
    assert seen[0].shape == (2, 16)


def test_official_init_starts_the_spatial_gate_at_one_half():
    torch.manual_seed(6)
    module = CBAM(16, reduction=4).train()
    y = torch.randn(4, 16, 5, 5)
    channel_gated = y * torch.sigmoid(module.excitation(pool_descriptor(y, "mean_max")))[:, :, None, None]
    torch.testing.assert_close(module(y), channel_gated * 0.5)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradients_reach_every_parameter(mode):
    torch.manual_seed(7)
    module = randomized(CBAM(16, reduction=4)).train(mode == "train")
    y = torch.randn(3, 16, 6, 5, requires_grad=True)
    module(y).square().sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert y.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_keeps_shape_and_dtype(dtype):
    module = CBAM(32).to(dtype)
    y = torch.randn(2, 32, 7, 7, dtype=dtype)
    out = module(y)
    assert out.shape == y.shape and out.dtype == dtype


def test_bfloat16_under_autocast_stays_bfloat16_and_close_to_float32():
    torch.manual_seed(8)
    module = randomized(CBAM(32)).eval()
    y = torch.randn(2, 32, 8, 8).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(y)
    assert out.dtype == torch.bfloat16 and out.shape == y.shape
    torch.testing.assert_close(out.float(), module(y.float()), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("channels", "reduction", "kernel"), [(64, 16, 7), (256, 16, 7), (48, 8, 3)])
def test_parameter_count(channels, reduction, kernel, bias):
    hidden = channels // reduction
    mlp = 2 * channels * hidden + (hidden + channels if bias else 0)
    spatial = 2 * kernel * kernel + 2  # conv without bias, BN scale and shift
    module = CBAM(channels, reduction=reduction, spatial_kernel=kernel, bias=bias)
    assert sum(p.numel() for p in module.parameters()) == mlp + spatial


def test_resnet50_with_cbam_in_every_bottleneck_has_the_papers_28_09_million():
    # CBAM paper Table 4: ResNet50 + CBAM, 28.09M parameters (decimal millions), with one CBAM in
    # each of the 16 bottlenecks on the residual branch before the shortcut add.
    added = sum(blocks * sum(p.numel() for p in CBAM(c).parameters()) for c, blocks in R50_STAGES)
    total = R50_PLAIN_PARAMS + added
    assert total == 28_089_624
    assert round(total / 1e6, 2) == 28.09


def test_even_spatial_kernel_is_refused():
    with pytest.raises(ValueError, match="odd"):
        CBAM(16, spatial_kernel=4)
