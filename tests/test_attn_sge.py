"""SGE (Li, Hu and Yang, 2019) against a numpy float64 reference looping over samples, groups and positions,
a hand-computed case, the authors' initialisation, the cases their code leaves undefined (a 1 x 1 map,
equal similarities), the groups option and the R-50 size. timm has no SGE module."""

import math

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from emca.layers.sge import EPS, SpatialGroupEnhance, spatial_group_enhance

from conftest import randomise_parameters

R50_PLAIN_PARAMS = 25_557_032  # torchvision.models.resnet50()


def numpy_sge(module: SpatialGroupEnhance, y: torch.Tensor) -> np.ndarray:
    """The paper's equations position by position, with the authors' unbiased std + eps."""
    x = y.detach().double().numpy()
    gamma = module.weight.detach().double().flatten().numpy()
    beta = module.bias.detach().double().flatten().numpy()
    batch, channels, height, width = x.shape
    size = channels // module.groups
    out = np.empty_like(x)
    for b in range(batch):
        for g in range(module.groups):
            group = x[b, g * size:(g + 1) * size].reshape(size, -1)  # (C/G, m)
            mean = group.mean(axis=1)
            similarity = np.array([mean @ group[:, i] for i in range(group.shape[1])])
            centred = similarity - similarity.mean()
            normalised = centred / (similarity.std(ddof=1) + EPS)
            gate = 1 / (1 + np.exp(-(gamma[g] * normalised + beta[g])))
            out[b, g * size:(g + 1) * size] = (group * gate).reshape(size, height, width)
    return out


@pytest.mark.parametrize(("channels", "groups"), [(32, 8), (16, 16), (24, 1)])
def test_matches_a_numpy_reference(channels, groups):
    torch.manual_seed(0)
    module = randomise_parameters(SpatialGroupEnhance(channels, groups), 1.0, seed=groups).double()
    y = torch.randn(2, channels, 5, 7, dtype=torch.float64)
    np.testing.assert_allclose(module(y).detach().numpy(), numpy_sge(module, y), rtol=1e-10, atol=1e-12)


def test_hand_computed():
    """One group of 2 channels over 3 positions x = (1, 0), (0, 1), (2, 2): mean (1, 1), similarities
    (1, 1, 4), centred (-1, -1, 2), unbiased variance (1 + 1 + 4) / 2 = 3."""
    module = SpatialGroupEnhance(2, groups=1)
    with torch.no_grad():
        module.weight.fill_(math.sqrt(3))
        module.bias.fill_(0.5)
    y = torch.tensor([[[[1.0, 0.0, 2.0]], [[0.0, 1.0, 2.0]]]])
    torch.testing.assert_close(module.similarity(y), torch.tensor([[[1.0, 1.0, 4.0]]]))
    scale = math.sqrt(3) / (math.sqrt(3) + EPS)  # gamma / (std + eps): 1 up to eps
    gates = torch.sigmoid(torch.tensor([-1.0, -1.0, 2.0]) * scale + 0.5)
    torch.testing.assert_close(module(y), y * gates.view(1, 1, 1, 3))


def test_authors_init_gates_everything_by_sigmoid_one():
    torch.manual_seed(1)
    module = SpatialGroupEnhance(128, 64)
    assert module.weight.shape == module.bias.shape == (1, 64, 1, 1)
    y = torch.randn(2, 128, 6, 6)
    torch.testing.assert_close(module(y), y * torch.sigmoid(torch.tensor(1.0)))


@pytest.mark.parametrize("zeros", [False, True])
def test_equal_similarities_give_finite_values_and_gradients(zeros):
    """The authors' code divides by m - 1 = 0 on a 1 x 1 map and differentiates std at 0 where all
    similarities are exactly equal (here a 1 x 1 map, and a zero 3 x 3 one); both are NaN there. Here the
    normalised similarity is 0, so every gate is sigmoid(bias), and every gradient is finite."""
    torch.manual_seed(2)
    module = randomise_parameters(SpatialGroupEnhance(8, 2), 1.0, seed=3)
    y = (torch.zeros(2, 8, 3, 3) if zeros else torch.randn(2, 8, 1, 1)).requires_grad_()
    out = module(y)
    torch.testing.assert_close(out, y * torch.sigmoid(module.bias).repeat_interleave(4, dim=1))
    (out * torch.randn(out.shape)).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (y, module.weight, module.bias))


def test_gradients_reach_every_parameter():
    torch.manual_seed(4)
    module = randomise_parameters(SpatialGroupEnhance(16, 4), 1.0, seed=5)
    y = torch.randn(2, 16, 5, 6, requires_grad=True)
    (module(y) * torch.randn(2, 16, 5, 6)).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_groups_are_capped_at_the_width_and_must_divide_it():
    assert spatial_group_enhance(64).groups == 64  # ResNet-18/34's stage 1: one channel per group, as the authors'
    assert spatial_group_enhance(64, groups=128).groups == 64
    assert spatial_group_enhance(256, groups=128).groups == 128
    with pytest.raises(ValueError, match=r"channels \(96\) must be a positive multiple of groups \(64\)") as error:
        spatial_group_enhance(96)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="multiple of groups"):
        SpatialGroupEnhance(64, 0)


def test_parameters_and_counted_multiply_adds():
    module = SpatialGroupEnhance(256, 64)
    assert sum(p.numel() for p in module.parameters()) == 2 * 64
    with FlopCounterMode(display=False) as counter:
        module(torch.randn(1, 256, 56, 56))
    assert counter.get_total_flops() // 2 == 256 * 56 * 56  # the similarity's multiply-adds, nothing else
    total = R50_PLAIN_PARAMS + 16 * 128  # a module in each of the 16 bottlenecks
    assert total == 25_559_080 and round(total / 1e6, 2) == 25.56


def test_bfloat16_under_autocast_stays_bfloat16_and_close_to_float32():
    torch.manual_seed(6)
    module = randomise_parameters(SpatialGroupEnhance(32, 8), 1.0, seed=7)
    y = torch.randn(2, 32, 8, 8).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(y)
    assert out.dtype == torch.bfloat16 and out.shape == y.shape
    torch.testing.assert_close(out.float(), module(y.float()), rtol=0.05, atol=0.05)
