"""CoordAtt against timm's CoordAttn (same weights), a numpy reference with explicit loops, and its widths."""

import numpy as np
import pytest
import torch
from timm.layers.coord_attn import CoordAttn as TimmCoordAttn

from emca.layers.coord_attention import CoordAttention
from emca.models import EMCAResNet

from conftest import randomise_parameters


def randomized(module: CoordAttention, seed: int = 0) -> CoordAttention:
    """Random parameters and BatchNorm running statistics, so that eval mode reads them too."""
    randomise_parameters(module, 0.5, seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        bn = module.bn1
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=generator, dtype=bn.running_mean.dtype))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=generator, dtype=bn.running_var.dtype) + 0.5)
    return module


def timm_copy(ours: CoordAttention) -> TimmCoordAttn:
    """timm's CoordAttn at the authors' configuration, holding our weights: our bottleneck width (timm's
    default is make_divisible(C / 24, 8)) and conv biases (timm's default has none); its Hardswish
    and BatchNorm are its defaults. Its parameter and buffer names are ours."""
    channels, hidden = ours.conv1.in_channels, ours.conv1.out_channels
    ref = TimmCoordAttn(channels, rd_channels=hidden, bias=True).to(ours.conv1.weight.dtype)
    ref.load_state_dict(ours.state_dict())
    return ref


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_matches_timm_coord_attn_with_the_same_weights(mode):
    torch.manual_seed(1)
    ours = randomized(CoordAttention(64)).double()
    ref = timm_copy(ours)
    ours.train(mode == "train")
    ref.train(mode == "train")
    y = torch.randn(3, 64, 9, 7, dtype=torch.float64)
    torch.testing.assert_close(ours(y), ref(y), rtol=1e-12, atol=1e-12)
    # Train mode updated both running statistics alike (BatchNorm over the H + W strips together).
    torch.testing.assert_close(ours.bn1.running_mean, ref.bn1.running_mean, rtol=1e-12, atol=1e-12)


def test_timms_default_widths_and_biases_are_not_the_authors():
    for channels, authors, timms in ((256, 8, 8), (512, 16, 24), (2048, 64, 88)):
        assert CoordAttention(channels).conv1.out_channels == authors
        assert TimmCoordAttn(channels).conv1.out_channels == timms
    assert CoordAttention(64).conv1.bias is not None and TimmCoordAttn(64).conv1.bias is None


def numpy_coord(module: CoordAttention, y: torch.Tensor) -> np.ndarray:
    """The paper's Eqs. 4-9 in eval mode (BatchNorm with its running statistics), with explicit loops."""
    x = y.detach().numpy().astype(np.float64)

    def array(t):
        return t.detach().double().numpy()

    w1, b1 = array(module.conv1.weight)[:, :, 0, 0], array(module.conv1.bias)
    bn = module.bn1
    scale = array(bn.weight) / np.sqrt(array(bn.running_var) + bn.eps)
    shift = array(bn.bias) - array(bn.running_mean) * scale
    wh, bh = array(module.conv_h.weight)[:, :, 0, 0], array(module.conv_h.bias)
    ww, bw = array(module.conv_w.weight)[:, :, 0, 0], array(module.conv_w.bias)

    def hidden(z):  # conv1, BN, h_swish of one pooled C-vector
        f = (w1 @ z + b1) * scale + shift
        return f * np.clip(f + 3, 0, 6) / 6

    def sigmoid(v):
        return 1 / (1 + np.exp(-v))

    batch, channels, height, width = x.shape
    out = np.empty_like(x)
    for b in range(batch):
        gate_h = [sigmoid(wh @ hidden(x[b, :, i, :].mean(axis=1)) + bh) for i in range(height)]
        gate_w = [sigmoid(ww @ hidden(x[b, :, :, j].mean(axis=1)) + bw) for j in range(width)]
        for i in range(height):
            for j in range(width):
                out[b, :, i, j] = x[b, :, i, j] * gate_h[i] * gate_w[j]
    return out


def test_matches_a_numpy_reference_with_explicit_loops():
    torch.manual_seed(2)
    module = randomized(CoordAttention(48, reduction=4, min_hidden=2), seed=3).double().eval()
    assert module.conv1.out_channels == 12
    y = torch.randn(2, 48, 5, 6, dtype=torch.float64)
    np.testing.assert_allclose(module(y).detach().numpy(), numpy_coord(module, y), rtol=1e-10, atol=1e-12)


def test_each_gate_reads_only_its_own_direction():
    """Hand case: a map that varies only along the width has one value per row after pooling along the
    width, so the row gate is the same for every row; the column gate is not."""
    module = randomized(CoordAttention(16)).eval()
    y = torch.arange(5.0).repeat(2, 16, 4, 1)  # (2, 16, 4, 5): y[..., i, j] = j
    gate_h, gate_w = module.gates(y)
    assert gate_h.shape == (2, 16, 4, 1) and gate_w.shape == (2, 16, 1, 5)
    torch.testing.assert_close(gate_h, gate_h[:, :, :1].expand_as(gate_h))
    assert not torch.allclose(gate_w, gate_w[..., :1].expand_as(gate_w))


@pytest.mark.parametrize(("channels", "reduction", "min_hidden", "hidden"),
                         [(64, 32, 8, 8), (2048, 32, 8, 64), (1024, 16, 8, 64), (64, 32, 4, 4)])
def test_bottleneck_width_and_parameter_count(channels, reduction, min_hidden, hidden):
    module = CoordAttention(channels, reduction, min_hidden)
    assert module.conv1.out_channels == hidden
    expected = (channels * hidden + hidden) + 2 * hidden + 2 * (hidden * channels + channels)
    assert sum(p.numel() for p in module.parameters()) == expected


def test_resnet50_carries_it_on_every_blocks_branch_with_the_authors_widths():
    model = EMCAResNet("resnet50", attention="coord", coord_reduction=32)
    widths = [[block.attn.conv1.out_channels for block in stage] for stage in model._stages]
    assert widths == [[8] * 3, [16] * 4, [32] * 6, [64] * 3]
    plain = sum(p.numel() for p in EMCAResNet("resnet50").parameters())
    assert sum(p.numel() for p in model.parameters()) - plain == 27_474_864 - 25_557_032


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradients_reach_every_parameter(mode):
    torch.manual_seed(5)
    module = randomized(CoordAttention(32)).train(mode == "train")
    y = torch.randn(3, 32, 6, 5, requires_grad=True)
    (module(y) * torch.randn(3, 32, 6, 5)).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert y.grad.abs().sum() > 0


def test_bfloat16_under_autocast_stays_bfloat16_and_close_to_float32():
    torch.manual_seed(6)
    module = randomized(CoordAttention(32)).eval()
    y = torch.randn(2, 32, 8, 8).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(y)
    assert out.dtype == torch.bfloat16 and out.shape == y.shape
    torch.testing.assert_close(out.float(), module(y.float()), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("options", [{"reduction": 0}, {"min_hidden": 0}])
def test_bad_widths_are_refused(options):
    with pytest.raises(ValueError, match="at least 1"):
        CoordAttention(64, **options)
