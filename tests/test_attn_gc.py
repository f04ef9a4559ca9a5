"""GC block against timm's GlobalContext (same weights), a numpy reference with explicit loops, and a hand case."""

import math

import numpy as np
import pytest
import torch
from timm.layers.global_context import GlobalContext as TimmGlobalContext

from emca.layers.global_context import GlobalContext

from conftest import randomise_parameters

R50_PLAIN_PARAMS = 25_557_032  # torchvision.models.resnet50()
R50_STAGES = ((256, 3), (512, 4), (1024, 6), (2048, 3))  # (block output channels, blocks), c2..c5


def randomized(module: GlobalContext, seed: int = 0) -> GlobalContext:
    """Every parameter random: the zero-initialised last layer would otherwise make the block the
    identity, and a comparison blind to everything before it."""
    return randomise_parameters(module, 0.5, seed)


def timm_copy(ours: GlobalContext) -> TimmGlobalContext:
    """timm's GlobalContext in the authors' ImageNet form (attention pooling, add fusion, no scale
    fusion) holding our weights. timm's LayerNorm2d uses eps 1e-6; the authors' nn.LayerNorm, and
    ours, 1e-5, so the reference is given 1e-5."""
    channels, hidden = ours.fc1.in_features, ours.fc1.out_features
    ref = TimmGlobalContext(channels, use_attn=True, fuse_add=True, fuse_scale=False, rd_channels=hidden)
    ref = ref.to(ours.fc1.weight.dtype)
    mlp = ref.mlp_add
    mlp.norm.eps = 1e-5
    with torch.no_grad():
        ref.conv_attn.weight.copy_(ours.conv_mask.weight)
        ref.conv_attn.bias.copy_(ours.conv_mask.bias)
        mlp.fc1.weight.copy_(ours.fc1.weight[:, :, None, None])
        mlp.fc1.bias.copy_(ours.fc1.bias)
        mlp.norm.weight.copy_(ours.norm.weight)
        mlp.norm.bias.copy_(ours.norm.bias)
        mlp.fc2.weight.copy_(ours.fc2.weight[:, :, None, None])
        mlp.fc2.bias.copy_(ours.fc2.bias)
    return ref


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_matches_timm_global_context_with_the_same_weights(mode):
    torch.manual_seed(1)
    ours = randomized(GlobalContext(64)).double()
    ref = timm_copy(ours)
    ours.train(mode == "train")
    ref.train(mode == "train")
    y = torch.randn(3, 64, 9, 7, dtype=torch.float64)
    assert ours.fc1.out_features == 4  # 64 / 16
    torch.testing.assert_close(ours(y), ref(y), rtol=1e-10, atol=1e-12)


def numpy_gc(module: GlobalContext, y: torch.Tensor) -> np.ndarray:
    """The paper's Eq. 3 with explicit loops: an independent formulation."""
    x = y.detach().numpy().astype(np.float64)

    def array(t):
        return t.detach().double().numpy()

    wk, bk = array(module.conv_mask.weight).reshape(-1), module.conv_mask.bias.item()
    w1, b1 = array(module.fc1.weight), array(module.fc1.bias)
    gamma, beta, eps = array(module.norm.weight), array(module.norm.bias), module.norm.eps
    w2, b2 = array(module.fc2.weight), array(module.fc2.bias)
    batch, channels, height, width = x.shape
    out = np.empty_like(x)
    for b in range(batch):
        logits = np.array([[wk @ x[b, :, i, j] + bk for j in range(width)] for i in range(height)])
        weights = np.exp(logits - logits.max())
        weights /= weights.sum()
        context = np.zeros(channels)
        for i in range(height):
            for j in range(width):
                context += weights[i, j] * x[b, :, i, j]
        hidden = w1 @ context + b1
        normed = (hidden - hidden.mean()) / math.sqrt(hidden.var() + eps) * gamma + beta
        out[b] = x[b] + (w2 @ np.maximum(normed, 0) + b2)[:, None, None]
    return out


def test_matches_a_numpy_reference_with_explicit_loops():
    torch.manual_seed(2)
    module = randomized(GlobalContext(32, reduction=8), seed=3).double()
    y = torch.randn(2, 32, 5, 6, dtype=torch.float64)
    np.testing.assert_allclose(module(y).detach().numpy(), numpy_gc(module, y), rtol=1e-10, atol=1e-12)


def test_attention_pooling_hand_computed():
    module = GlobalContext(2, reduction=2)
    with torch.no_grad():
        module.conv_mask.weight.copy_(torch.tensor([math.log(3) / 4, 0.0]).view(1, 2, 1, 1))
        module.conv_mask.bias.fill_(0.7)  # a shared shift: the softmax ignores it
    # Two positions (H=1, W=2): channel 0 = (0, 4), channel 1 = (2, -2). Logits (0, ln 3) + 0.7
    # -> softmax (1/4, 3/4) -> context (0/4 + 12/4, 2/4 - 6/4) = (3, -1).
    y = torch.tensor([[[[0.0, 4.0]], [[2.0, -2.0]]]])
    torch.testing.assert_close(module.context(y), torch.tensor([[3.0, -1.0]]))


def test_official_init_starts_as_the_identity():
    torch.manual_seed(4)
    module = GlobalContext(64)
    y = torch.randn(2, 64, 5, 5)
    assert torch.equal(module(y), y)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradients_reach_every_parameter(mode):
    torch.manual_seed(5)
    module = randomized(GlobalContext(32)).train(mode == "train")
    y = torch.randn(3, 32, 6, 5, requires_grad=True)
    (module(y) * torch.randn(3, 32, 6, 5)).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert y.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_keeps_shape_and_dtype(dtype):
    module = GlobalContext(32).to(dtype)
    y = torch.randn(2, 32, 7, 7, dtype=dtype)
    out = module(y)
    assert out.shape == y.shape and out.dtype == dtype


def test_bfloat16_under_autocast_stays_bfloat16_and_close_to_float32():
    torch.manual_seed(6)
    module = randomized(GlobalContext(32)).eval()
    y = torch.randn(2, 32, 8, 8).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(y)
    assert out.dtype == torch.bfloat16 and out.shape == y.shape
    torch.testing.assert_close(out.float(), module(y.float()), rtol=0.05, atol=0.1)


@pytest.mark.parametrize(("channels", "reduction"), [(256, 16), (2048, 16), (64, 4)])
def test_parameter_count(channels, reduction):
    hidden = channels // reduction
    mask = channels + 1  # 1x1 conv C -> 1 with bias
    transform = (channels * hidden + hidden) + 2 * hidden + (hidden * channels + channels)  # fc1, LN, fc2
    assert sum(p.numel() for p in GlobalContext(channels, reduction).parameters()) == mask + transform


def test_resnet50_with_gc_in_c3_to_c5_has_the_papers_28_08_million():
    # GCNet, ImageNet: ResNet-50 + GC (r16) with 28.08M parameters, which is one GC block in every
    # bottleneck of c3, c4 and c5 (1-based stages 2-4); every bottleneck of c2 too would be 28.11M.
    def added(stages):
        return sum(blocks * sum(p.numel() for p in GlobalContext(c).parameters()) for c, blocks in stages)

    c3_to_c5 = R50_PLAIN_PARAMS + added(R50_STAGES[1:])
    assert c3_to_c5 == 28_078_773 and round(c3_to_c5 / 1e6, 2) == 28.08
    assert round((R50_PLAIN_PARAMS + added(R50_STAGES)) / 1e6, 2) == 28.11


def test_too_narrow_a_bottleneck_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        GlobalContext(8, reduction=16)
