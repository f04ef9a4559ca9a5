"""SimAM against the paper's energy with explicit loops, a hand case, and where it sits on ResNet (after
each block's 3x3 convolution, as the authors' ImageNet ResNets)."""

import math

import numpy as np
import pytest
import torch

from emca.layers.simam import SIMAM_LAMBDA, SimAM, SimAMConv2d, simam_block
from emca.models import EMCAResNet


def numpy_simam(x: torch.Tensor, e_lambda: float) -> np.ndarray:
    """The paper's minimal energy e_t = 4 (s^2 + l) / ((t - m)^2 + 2 s^2 + 2 l) per neuron, loop by loop,
    with m and s^2 over the channel's M neurons (s^2 divided by M - 1); out = x * sigmoid(1 / e_t)."""
    a = x.detach().numpy().astype(np.float64)
    batch, channels, height, width = a.shape
    out = np.empty_like(a)
    for b in range(batch):
        for c in range(channels):
            values = [a[b, c, i, j] for i in range(height) for j in range(width)]
            mean = sum(values) / len(values)
            variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
            for i in range(height):
                for j in range(width):
                    t = a[b, c, i, j]
                    energy = 4 * (variance + e_lambda) / ((t - mean) ** 2 + 2 * variance + 2 * e_lambda)
                    out[b, c, i, j] = t / (1 + math.exp(-1 / energy))
    return out


@pytest.mark.parametrize("e_lambda", [SIMAM_LAMBDA, 1e-4])
def test_matches_the_papers_energy_with_explicit_loops(e_lambda):
    torch.manual_seed(0)
    x = 3 * torch.randn(2, 3, 5, 4, dtype=torch.float64) + 1
    np.testing.assert_allclose(SimAM(e_lambda)(x).numpy(), numpy_simam(x, e_lambda), rtol=1e-12, atol=1e-12)


def test_hand_computed():
    # One channel of two neurons (0, 2): mean 1, (t - mean)^2 = 1 for both, variance 2 / (2 - 1) = 2.
    # lambda 0.5: 1 / e_t = 1 / (4 * 2.5) + 1/2 = 0.6 for both, so out = (0, 2 * sigmoid(0.6)).
    x = torch.tensor([[[[0.0, 2.0]]]], dtype=torch.float64)
    expected = torch.tensor([[[[0.0, 2 / (1 + math.exp(-0.6))]]]], dtype=torch.float64)
    torch.testing.assert_close(SimAM(0.5)(x), expected)


def test_a_one_position_map_gets_the_half_energy_term_not_nan():
    x = torch.randn(2, 4, 1, 1)
    torch.testing.assert_close(SimAM()(x), x * torch.sigmoid(torch.tensor(0.5)))


def test_lambda_sets_how_much_an_outlier_stands_out():
    x = torch.zeros(1, 1, 4, 4)
    x[..., 0, 0] = 4.0
    small, large = SimAM(1e-4)(x)[..., 0, 0], SimAM(10.0)(x)[..., 0, 0]
    assert 4 * torch.sigmoid(torch.tensor(0.5)) < large < small < 4


@pytest.mark.parametrize("e_lambda", [0.0, -1.0])
def test_a_lambda_that_is_not_positive_is_refused(e_lambda):
    with pytest.raises(ValueError, match="must be positive"):
        SimAM(e_lambda)


def test_the_authors_placement_after_every_blocks_3x3_conv_before_bn2():
    torch.manual_seed(1)
    model = EMCAResNet("resnet50", attention="simam").eval()
    plain = EMCAResNet("resnet50")
    blocks = [block for stage in model._stages for block in stage]
    assert all(type(block.conv2) is SimAMConv2d and block.attn is None and block.after is None for block in blocks)
    assert all(type(block.conv1) is type(block.conv3) is torch.nn.Conv2d for block in blocks)
    # No parameter and no state_dict key of its own: a plain ResNet's checkpoint loads as it is.
    assert list(model.state_dict()) == list(plain.state_dict())
    model.load_state_dict(plain.state_dict())
    block = model.layer2[0]
    x = torch.randn(2, 256, 12, 12)
    with torch.no_grad():
        y = block.relu(block.bn1(block.conv1(x)))
        y = torch.nn.functional.conv2d(y, block.conv2.weight, stride=2, padding=1)
        y = block.relu(block.bn2(torch.from_numpy(numpy_simam(y, SIMAM_LAMBDA)).float()))
        expected = block.relu(block.bn3(block.conv3(y)) + block.downsample(x))
        torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-5)


def test_the_basic_blocks_second_3x3_carries_it_and_the_option_reaches_it():
    model = EMCAResNet("resnet18", attention="simam", simam_e_lambda=1e-4)
    lambdas = [block.conv2.simam.e_lambda for stage in model._stages for block in stage]
    assert lambdas == [1e-4] * 8 and all(type(block.conv1) is torch.nn.Conv2d for s in model._stages for block in s)


def test_the_wrapped_convolution_keeps_its_parameters():
    conv = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=True)
    wrapped = SimAMConv2d.wrapping(conv, 0.2)
    assert wrapped.weight is conv.weight and wrapped.bias is conv.bias
    assert (wrapped.stride, wrapped.padding, wrapped.simam.e_lambda) == ((2, 2), (1, 1), 0.2)
    x = torch.randn(2, 8, 9, 9)
    torch.testing.assert_close(wrapped(x), SimAM(0.2)(conv(x)))


def test_applying_it_twice_is_refused():
    block = EMCAResNet("resnet18").layer1[0]
    simam_block(block)
    with pytest.raises(ValueError, match="already carries SimAM"):
        simam_block(block)


def test_bfloat16_under_autocast_stays_bfloat16_and_close_to_float32():
    torch.manual_seed(2)
    x = torch.randn(2, 8, 7, 7).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = SimAM()(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), SimAM()(x.float()), rtol=0.02, atol=0.02)
