"""Triplet attention (Misra et al., WACV 2021) against an independent implementation written as the paper
describes it (rotate the tensor, Z-pool, conv, BN, sigmoid, gate, rotate back, average the three), a
hand-computed case, the authors' initialisation and the R-50 parameter count. timm has no triplet module."""

import math

import pytest
import torch
import torch.nn.functional as F

from emca.layers.triplet_attention import TripletAttention

from conftest import randomise_parameters

R50_PLAIN_PARAMS = 25_557_032  # torchvision.models.resnet50()


def randomised(module: TripletAttention, seed: int = 0) -> TripletAttention:
    """Random conv kernels and BN affine parameters and running statistics (the zero H-W BN scale would
    otherwise hide that branch from the comparison)."""
    randomise_parameters(module, 0.5, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    for gate in (module.cw, module.hc, module.hw):
        gate.bn.running_mean.normal_(0, 0.5, generator=generator)
        gate.bn.running_var.uniform_(0.5, 2.0, generator=generator)
    return module


def paper_triplet(module: TripletAttention, x: torch.Tensor, training: bool) -> torch.Tensor:
    """Each branch on its rotated tensor, as the paper's Fig. 3 draws it: the rotation is a permute that
    puts the dimension to reduce first (after the batch), Z-pool concatenates max and mean over it, and the
    gated tensor is permuted back. BN statistics: the batch's (training) or running ones (copies, so the
    module's stay untouched)."""

    def branch(rotated: torch.Tensor, gate) -> torch.Tensor:
        pooled = torch.cat((rotated.max(dim=1, keepdim=True).values, rotated.mean(dim=1, keepdim=True)), dim=1)
        logits = F.conv2d(pooled, gate.conv.weight, padding=gate.conv.padding)
        normed = F.batch_norm(logits, gate.bn.running_mean.clone(), gate.bn.running_var.clone(), gate.bn.weight,
                              gate.bn.bias, training=training, eps=gate.bn.eps)
        return rotated * torch.sigmoid(normed)

    # (B, H, C, W): rotation about H, gate over the C-W plane; (B, W, H, C): rotation about W, gate over H-C.
    out_cw = branch(x.permute(0, 2, 1, 3), module.cw).permute(0, 2, 1, 3)
    out_hc = branch(x.permute(0, 3, 2, 1), module.hc).permute(0, 3, 2, 1)
    out_hw = branch(x, module.hw)
    return (out_cw + out_hc + out_hw) / 3


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("kernel", [7, 3])
def test_matches_the_papers_rotations(training, kernel):
    torch.manual_seed(0)
    module = randomised(TripletAttention(48, kernel=kernel), seed=kernel).double().train(training)
    x = torch.randn(3, 48, 9, 11, dtype=torch.float64)  # C, H and W all differ: a swapped plane fails
    expected = paper_triplet(module, x, training)
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-12)


def test_each_gate_reduces_its_own_dimension_hand_computed():
    """1x1 kernels, identity BNs (eval, mean 0, var 1, eps 0): each gate is sigmoid of its 1x1 conv of
    [max, mean]. Only one branch has a non-zero kernel at a time; the others gate by sigmoid(0) = 1/2."""
    module = TripletAttention(1, kernel=1).eval()
    with torch.no_grad():
        for gate in (module.cw, module.hc, module.hw):
            gate.conv.weight.zero_()
            gate.bn.weight.fill_(1.0)
            gate.bn.eps = 0.0
        # C-W gate: ln 3 times the mean over H.
        module.cw.conv.weight.copy_(torch.tensor([0.0, math.log(3)]).view(1, 2, 1, 1))
    y = torch.tensor([[[[2.0], [0.0]]]])  # C = 1, H = 2, W = 1: the mean over H is 1 -> gate 3/4 at both rows
    # Average gate (3/4 + 1/2 + 1/2) / 3 = 7/12 (pooling over W or C instead would give 9/10 and 1/2 by row).
    torch.testing.assert_close(module(y), y * 7 / 12)

    with torch.no_grad():
        module.cw.conv.weight.zero_()
        module.hw.conv.weight.copy_(torch.tensor([math.log(3), 0.0]).view(1, 2, 1, 1))  # ln 3 times the max over C
    y = torch.tensor([[[[1.0, 0.0]], [[0.0, -1.0]]]])  # C = 2, H = 1, W = 2: maxima over C 1 and 0
    # Gates by column: (1/2 + 1/2 + 3/4) / 3 = 7/12 and (1/2 + 1/2 + 1/2) / 3 = 1/2.
    expected = torch.tensor([[[[7 / 12, 0.0]], [[0.0, -1 / 2]]]])
    torch.testing.assert_close(module(y), expected)


def test_authors_init_starts_the_spatial_gate_at_one_half():
    torch.manual_seed(1)
    module = TripletAttention(64)
    assert [g.bn.weight.tolist() for g in (module.cw, module.hc, module.hw)] == [[1.0], [1.0], [0.0]]
    assert all(g.bn.momentum == 0.01 and g.conv.bias is None for g in (module.cw, module.hc, module.hw))
    # Kaiming normal with fan_out = 49: std sqrt(2 / 49), about 0.2 (torch's default would be about 0.06).
    assert 0.12 < module.cw.conv.weight.std().item() < 0.3
    pooled = torch.randn(2, 2, 5, 6)
    assert torch.equal(module.hw(pooled), torch.full((2, 1, 5, 6), 0.5))


@pytest.mark.parametrize("kernel", [7, 3])
def test_parameter_count_is_three_gates_whatever_the_width(kernel):
    for channels in (64, 2048):
        assert sum(p.numel() for p in TripletAttention(channels, kernel).parameters()) == 3 * (2 * kernel**2 + 2)


def test_resnet50_with_a_module_in_every_block_has_the_papers_25_56_million():
    total = R50_PLAIN_PARAMS + 16 * 300  # 3 + 4 + 6 + 3 bottlenecks
    assert total == 25_561_832 and round(total / 1e6, 2) == 25.56


@pytest.mark.parametrize("kernel", [0, 4])
def test_an_even_or_empty_kernel_is_refused(kernel):
    with pytest.raises(ValueError, match="positive odd number"):
        TripletAttention(64, kernel=kernel)


def test_gradients_reach_every_parameter():
    torch.manual_seed(2)
    module = randomised(TripletAttention(16)).train()
    y = torch.randn(2, 16, 6, 5, requires_grad=True)
    (module(y) * torch.randn(2, 16, 6, 5)).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert y.grad.abs().sum() > 0


def test_bfloat16_under_autocast_stays_bfloat16_and_close_to_float32():
    torch.manual_seed(3)
    module = randomised(TripletAttention(32)).eval()
    y = torch.randn(2, 32, 8, 8).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(y)
    assert out.dtype == torch.bfloat16 and out.shape == y.shape
    torch.testing.assert_close(out.float(), module(y.float()), rtol=0.05, atol=0.05)
