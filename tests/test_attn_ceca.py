"""Circular ECA against timm's CecaModule with the same weights, a loop over channels with modular
indices, a hand-computed wrap, the kernel option shared with ECA, and EMCA-CECA."""

import pytest
import torch
from timm.layers.eca import CecaModule

from emca.layers import EMCA, ChannelAttention
from emca.layers.ceca import CECAExcitation
from emca.layers.excitation import ECAExcitation, eca_kernel_size
from emca.models import EMCAResNet

from conftest import randomise_parameters


def ceca(channels: int, **options) -> ChannelAttention:
    return ChannelAttention(CECAExcitation(channels, **options), "mean")


@pytest.mark.parametrize("channels", [16, 64, 256, 2048])
def test_matches_timm_ceca_with_the_same_weights(channels):
    torch.manual_seed(0)
    ours = randomise_parameters(ceca(channels), 1.0, seed=channels).double()
    ref = CecaModule(channels).double()
    assert ref.conv.weight.shape == ours.excitation.conv.weight.shape == (1, 1, eca_kernel_size(channels))
    with torch.no_grad():
        ref.conv.weight.copy_(ours.excitation.conv.weight)
    y = torch.randn(2, channels, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(ours(y), ref(y), rtol=1e-12, atol=1e-12)


def test_matches_modular_indexing_and_the_circular_conv1d():
    torch.manual_seed(1)
    excitation = randomise_parameters(CECAExcitation(12, kernel=5), 1.0, seed=2).double()
    d = torch.randn(3, 12, 1, dtype=torch.float64)
    w = excitation.conv.weight.flatten()
    expected = torch.stack([sum(w[j] * d[:, (c + j - 2) % 12, 0] for j in range(5)) for c in range(12)], dim=1)
    torch.testing.assert_close(excitation(d), expected, rtol=1e-12, atol=1e-12)
    # The Conv1d holding the weight is circular itself: its own forward gives the same.
    torch.testing.assert_close(excitation.conv(d.transpose(1, 2)).squeeze(1), expected, rtol=1e-12, atol=1e-12)


def test_hand_computed_wrap_differs_from_ecas_zero_padding():
    circular, zero = CECAExcitation(4, kernel=3), ECAExcitation(4, kernel=3)
    with torch.no_grad():
        for module in (circular, zero):
            module.conv.weight.copy_(torch.tensor([1.0, 10.0, 100.0]).view(1, 1, 3))
    d = torch.tensor([[1.0, 2.0, 3.0, 4.0]]).unsqueeze(-1)
    # z_c = d_{c-1} + 10 d_c + 100 d_{c+1}, indices mod 4: the ends read each other.
    torch.testing.assert_close(circular(d), torch.tensor([[4 + 10 + 200.0, 1 + 20 + 300, 2 + 30 + 400, 3 + 40 + 100]]))
    torch.testing.assert_close(zero(d), torch.tensor([[0 + 10 + 200.0, 1 + 20 + 300, 2 + 30 + 400, 3 + 40 + 0]]))


def test_kernel_one_has_nothing_to_wrap():
    excitation = CECAExcitation(3, kernel=1)
    with torch.no_grad():
        excitation.conv.weight.fill_(2.0)
    d = torch.tensor([[1.0, -1.0, 5.0]]).unsqueeze(-1)
    torch.testing.assert_close(excitation(d), 2 * d.squeeze(-1))


def test_kernel_option_is_ecas_adaptive_rule_or_one_per_stage():
    model = EMCAResNet("resnet50", attention="ceca")
    assert [stage[0].attn.excitation.conv.kernel_size[0] for stage in model._stages] == [5, 5, 5, 7]
    fixed = EMCAResNet("resnet18", attention="ceca", ceca_kernel=[3, 5, 5, 7])
    assert [stage[1].attn.excitation.conv.kernel_size[0] for stage in fixed._stages] == [3, 5, 5, 7]
    assert sum(p.numel() for p in model.parameters()) == 25_557_032 + 3 * 5 + 4 * 5 + 6 * 5 + 3 * 7


def test_bad_kernels_are_refused():
    with pytest.raises(ValueError, match="positive odd number"):
        CECAExcitation(16, kernel=4)
    with pytest.raises(ValueError, match="wraps more than once around 2 channels"):
        CECAExcitation(2, kernel=7)
    CECAExcitation(2, kernel=5)  # exactly one turn on each side


def test_emca_ceca_uses_the_circular_convolution_as_w_m2():
    torch.manual_seed(3)
    excitation = randomise_parameters(CECAExcitation(8, kernel=3), 1.0, seed=4)
    y = torch.randn(2, 8, 3, 3)
    expected = y * torch.sigmoid(excitation(y.mean(dim=(2, 3)).unsqueeze(-1)))[:, :, None, None]
    torch.testing.assert_close(EMCA(8, [], excitation)(y, []), expected)
    model = EMCAResNet("resnet18", attention="emca_ceca")
    assert isinstance(model.layer3[0].attn.excitation, CECAExcitation)
