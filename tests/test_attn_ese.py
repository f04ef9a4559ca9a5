"""Effective SE (CenterMask / VoVNetV2) against timm's EffectiveSEModule with the same weights, the authors'
ReLU6(z + 3) / 6 gate written out, a hand-computed case, and its place as EMCA's W_m2."""

import pytest
import torch
from timm.layers.squeeze_excite import EffectiveSEModule

from emca.layers import EMCA
from emca.layers.effective_se import EffectiveSE, ESEExcitation
from emca.models import EMCAResNet

from conftest import randomise_parameters

R50_PLAIN_PARAMS = 25_557_032  # torchvision.models.resnet50()
R50_STAGES = ((256, 3), (512, 4), (1024, 6), (2048, 3))  # (block output channels, blocks)


def timm_copy(ours: EffectiveSE) -> EffectiveSEModule:
    channels = ours.excitation.fc.in_features
    ref = EffectiveSEModule(channels).to(ours.excitation.fc.weight.dtype)
    with torch.no_grad():
        ref.fc.weight.copy_(ours.excitation.fc.weight[:, :, None, None])
        ref.fc.bias.copy_(ours.excitation.fc.bias)
    return ref


def test_timms_gate_is_the_hard_sigmoid():
    z = torch.linspace(-5, 5, 41)
    torch.testing.assert_close(EffectiveSEModule(4).gate(z), torch.clamp(z + 3, 0, 6) / 6)


def test_matches_timm_effective_se_with_the_same_weights():
    torch.manual_seed(0)
    # Scale 0.5 puts logits on both sides of +-3: the gate's flat parts and its slope are all exercised.
    ours = randomise_parameters(EffectiveSE(48), 0.5, seed=1).double()
    y = 2 * torch.randn(3, 48, 1, 1, dtype=torch.float64) + torch.randn(3, 48, 7, 5, dtype=torch.float64)
    logits = ours.excitation(y.mean(dim=(2, 3)).unsqueeze(-1))
    assert (logits < -3).any() and (logits > 3).any() and (logits.abs() < 3).any()
    torch.testing.assert_close(ours(y), timm_copy(ours)(y), rtol=1e-12, atol=1e-12)


def test_matches_the_papers_equation_written_out():
    torch.manual_seed(2)
    ours = randomise_parameters(EffectiveSE(16), 0.5, seed=3).double()
    y = torch.randn(2, 16, 4, 6, dtype=torch.float64)
    weight, bias = ours.excitation.fc.weight, ours.excitation.fc.bias
    expected = torch.empty_like(y)
    for b in range(2):
        d = [y[b, c].sum() / 24 for c in range(16)]
        for c in range(16):
            z = sum(weight[c, j] * d[j] for j in range(16)) + bias[c]
            expected[b, c] = y[b, c] * torch.nn.functional.relu6(z + 3) / 6  # the authors' Hsigmoid
    torch.testing.assert_close(ours(y), expected, rtol=1e-12, atol=1e-12)


def test_hand_computed():
    module = EffectiveSE(2)
    with torch.no_grad():
        module.excitation.fc.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, -3.0]]))
        module.excitation.fc.bias.copy_(torch.tensor([-1.0, 0.5]))
    y = torch.tensor([[[[1.0, 3.0]], [[0.0, 1.0]]]])  # means 2, 0.5
    # z = (2 + 1 - 1, -1.5 + 0.5) = (2, -1) -> hsigmoid (5/6, 2/6)
    expected = y * torch.tensor([5 / 6, 2 / 6])[None, :, None, None]
    torch.testing.assert_close(module(y), expected)
    torch.testing.assert_close(module.factors(y).flatten(), torch.tensor([5 / 6, 2 / 6]))


def test_init_is_the_authors_kaiming_normal():
    torch.manual_seed(4)
    weight = ESEExcitation(1024).fc.weight
    assert weight.mean().abs() < 2e-3 and abs(weight.std().item() - (2 / 1024) ** 0.5) < 2e-3


def test_emca_ese_uses_the_layer_as_w_m2_under_emcas_sigmoid():
    torch.manual_seed(5)
    excitation = randomise_parameters(ESEExcitation(8), 0.5, seed=6)
    module = EMCA(8, [], excitation)  # one scale: EMCA is the plain gate
    y = torch.randn(2, 8, 3, 3)
    logits = excitation.fc(y.mean(dim=(2, 3)))
    torch.testing.assert_close(module(y, []), y * torch.sigmoid(logits)[:, :, None, None])
    model = EMCAResNet("resnet18", attention="emca_ese")
    assert isinstance(model.layer2[0].attn.excitation, ESEExcitation) and model.layer2[1].attn is None


def test_resnet50_with_ese_in_every_block():
    added = sum(blocks * (c * c + c) for c, blocks in R50_STAGES)
    model = EMCAResNet("resnet50", attention="ese")
    assert sum(p.numel() for p in model.parameters()) == R50_PLAIN_PARAMS + added == 45_691_688
    assert all(isinstance(block.attn, EffectiveSE) for stage in model._stages for block in stage)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradients_reach_every_parameter(mode):
    torch.manual_seed(7)
    module = randomise_parameters(EffectiveSE(16), 0.2, seed=8).train(mode == "train")
    y = torch.randn(3, 16, 5, 5, requires_grad=True)
    (module(y) * torch.randn(3, 16, 5, 5)).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
