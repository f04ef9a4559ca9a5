"""GCT (emca.layers.gct) against the paper's equations written here in numpy, a hand-computed case, where the
authors' ResNet-50 puts it, and its EMCA version (emca_gct: the same excitation under EMCA's sigmoid)."""

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from emca.layers import EMCA
from emca.layers.create_attn import reads
from emca.layers.gct import GatedChannelTransformation, GCTExcitation, gct_block
from emca.layers.pooling import pool_descriptor
from emca.models import EMCAResNet
from emca.models.summary import count_parameters, stage_layout

from conftest import randomise_parameters

EPS = 1e-5


def reference_gct(x: np.ndarray, alpha: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """The l2 GCT as the authors' code computes it, channel by channel with explicit loops."""
    batch, channels = x.shape[:2]
    out = np.empty_like(x)
    for b in range(batch):
        s = np.array([alpha[c] * math.sqrt(float((x[b, c] ** 2).sum()) + EPS) for c in range(channels)])
        rms = math.sqrt(sum(v * v for v in s) / channels + EPS)  # sqrt(mean_c s_c^2 + eps)
        for c in range(channels):
            out[b, c] = x[b, c] * (1 + math.tanh(gamma[c] * s[c] / rms + beta[c]))
    return out


def parameters(module: GatedChannelTransformation) -> tuple[np.ndarray, ...]:
    e = module.excitation
    return tuple(p.detach().double().numpy() for p in (e.alpha, e.gamma, e.beta))


def test_matches_the_reference_with_random_parameters():
    module = randomise_parameters(GatedChannelTransformation(6), 0.8, seed=1).double()
    x = torch.randn(3, 6, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(module(x), torch.from_numpy(reference_gct(x.numpy(), *parameters(module))),
                               rtol=1e-12, atol=1e-12)


def test_hand_computed_case():
    """Channel norms 1 and 1, alpha (3, 4): s = (3, 4), ||s|| = 5, s_hat = sqrt(2) (3, 4) / 5 = (0.6, 0.8) sqrt(2)."""
    module = GatedChannelTransformation(2)
    with torch.no_grad():
        module.excitation.alpha.copy_(torch.tensor([3.0, 4.0]))
        module.excitation.gamma.copy_(torch.tensor([1.0, 1.0]))
        module.excitation.beta.copy_(torch.tensor([0.0, -1.0]))
    x = torch.tensor([[[[1.0, 0.0]], [[0.0, -1.0]]]])
    gates = [1 + math.tanh(0.6 * math.sqrt(2)), 1 + math.tanh(0.8 * math.sqrt(2) - 1)]
    expected = x * torch.tensor(gates)[None, :, None, None]
    torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)


def test_starts_as_the_identity_and_alpha_scales_nothing_alone():
    module = GatedChannelTransformation(8)
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(module(x), x, rtol=0, atol=0)
    with torch.no_grad():  # a common alpha cancels in the normalisation (up to eps)
        module.excitation.gamma.fill_(0.7)
        before = module(x)
        module.excitation.alpha.fill_(5.0)
    torch.testing.assert_close(module(x), before, rtol=1e-5, atol=1e-5)


def test_l2_pooling_is_the_embedding():
    x = torch.randn(2, 3, 4, 5)
    x[0, 1] = 0  # an all-zero channel: sqrt(eps), with a finite gradient
    x.requires_grad_(True)
    pooled = pool_descriptor(x, "l2")
    assert pooled.shape == (2, 3, 1)
    torch.testing.assert_close(pooled[..., 0], (x.detach() ** 2).sum(dim=(2, 3)).add(EPS).sqrt())
    pooled.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[0, 1].abs().sum() == 0
    half = pool_descriptor(x.detach().bfloat16(), "l2")
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), pooled.detach(), rtol=1e-2, atol=0)


def test_the_excitation_under_a_sigmoid_is_half_the_gct_gate():
    """EMCA's sigmoid of the excitation's logits is exactly GCT's 1 + tanh gate halved, for the same weights."""
    module = randomise_parameters(GatedChannelTransformation(5), 0.8, seed=2).double()
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    gate = module(x) / x
    z = torch.sigmoid(module.excitation(pool_descriptor(x, "l2")))[:, :, None, None]
    torch.testing.assert_close(2 * z.expand_as(x), gate)
    # EMCA with nothing to fuse is that gate (multiply gating) on the branch.
    emca = EMCA(5, [], module.excitation, pooling="l2")
    torch.testing.assert_close(emca(x, []), x * z)


def expected_gct_channels(model: nn.Module, convs: str) -> list[int]:
    """The input widths of the convolutions that should carry a GCT, from the plain block's layout."""
    widths = []
    for stage in model._stages:
        for block in stage:
            names = [n for n in ("conv1", "conv2", "conv3") if hasattr(block, n)]
            names = names if convs == "all" else names[:1] if convs == "first" else names[-1:]
            widths += [getattr(block, n).in_channels for n in names]
            if convs == "all" and block.downsample is not None:
                widths.append(block.downsample[0].in_channels)
    return widths


@pytest.mark.parametrize("depth,convs", [(18, "all"), (18, "first"), (18, "last"), (50, "all"), (50, "last")])
def test_gct_sits_before_the_convs_that_convs_names(depth, convs):
    plain = EMCAResNet(f"resnet{depth}")
    model = EMCAResNet(f"resnet{depth}", attention="gct", gct_convs=convs)
    gcts = [m.channels for m in model.modules() if isinstance(m, GatedChannelTransformation)]
    assert sorted(gcts) == sorted(expected_gct_channels(plain, convs))
    assert count_parameters(model) - count_parameters(plain) == 3 * sum(gcts)
    # Each GCT directly precedes its conv and matches its input width.
    for module in model.modules():
        if isinstance(module, nn.Sequential) and isinstance(module[0], GatedChannelTransformation):
            assert isinstance(module[1], nn.Conv2d) and module[1].in_channels == module[0].channels
    assert [row["attention_blocks"] for row in stage_layout(model)] == [list(range(n)) for n in model.stage_depths]
    if (depth, convs) == (50, "all"):  # the authors' GCT-ResNet-50 (less the stem's GCT(3)): 52 GCTs, 3 x 22,528
        assert len(gcts) == 52 and count_parameters(model) - count_parameters(plain) == 67_584


def test_the_network_starts_as_the_plain_one():
    """gamma = beta = 0: with the same convolutions and BNs the GCT network computes the plain one's function."""
    torch.manual_seed(0)
    model = EMCAResNet("resnet18", attention="gct", num_classes=5).eval()
    plain = EMCAResNet("resnet18", num_classes=5).eval()
    # conv1.1.weight -> conv1.weight, downsample.0.1.weight -> downsample.0.weight; the GCTs' own are dropped.
    weights = {re.sub(r"(conv\d|downsample\.0)\.1\.weight$", r"\1.weight", name): value
               for name, value in model.state_dict().items() if ".0.excitation." not in name}
    plain.load_state_dict(weights, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
        model.layer3[1].conv2[0].excitation.beta.fill_(0.5)  # and stops being it once a gate opens
        assert not torch.allclose(model(x), plain(x))


def test_bad_convs_option_names_the_choices():
    with pytest.raises(ValueError, match=r"convs must be one of \('all', 'first', 'last'\)"):
        gct_block(EMCAResNet("resnet18").layer1[0], convs="every")


def test_emca_gct_gates_the_first_block_with_the_gct_excitation():
    model = EMCAResNet("resnet18", attention="emca_gct", num_classes=3)
    assert reads("emca_gct") == () and reads("gct") == ("gct_convs",)
    carried = [[i for i, block in enumerate(stage) if block.attn is not None] for stage in model._stages]
    assert carried == [[0]] * 4
    first = model.layer2[0].attn
    assert isinstance(first, EMCA) and isinstance(first.excitation, GCTExcitation) and first.pooling == "l2"
    assert model.pooling == "l2"
    assert not any(isinstance(m, GatedChannelTransformation) for m in model.modules())
    EMCAResNet("resnet18", attention="emca_gct", integration="all")  # a branch gate: integration applies
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
