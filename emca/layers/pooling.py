"""Spatial pooling of a feature map into a per-channel descriptor of shape (B, C, K).

A pooling is named (POOLINGS): `mean` (K = 1: SE, ECA), `mean_std` (K = 2: SRM's style pooling),
`mean_max` (K = 2: CBAM's channel attention), `l2` (K = 1: GCT's embedding, sqrt(sum_hw x^2 + eps)).
One descriptor format for every module lets EMCA stack, align and fuse descriptors without caring
which excitation follows; the name, not K, says what the statistics are (mean+std and mean+max are
both K = 2; mean and l2 both K = 1).

The mean-and-std pooling is an autograd Function with a hand-written backward: it runs on full
feature maps, once per SRM module and once per covered block output, and torch.var_mean is several
times slower on CPU than a mean and a norm, while its backward chain (sub, mul, div, add over the
map) costs four passes where the closed form d std / dx = (x - mean) / (N * std) needs two. Its
values are mean and sqrt(var(x, correction=0) + eps) up to float rounding (the two-pass variance sums
in another order than var_mean's Welford update).

The plain mean is an autograd Function too, for its backward alone: autograd's MeanBackward writes a
full-size gradient (grad.expand(...) / N) that is then added to the map's other gradient, one more
full pass over the map than returning the broadcast view, which autograd adds in place. EMCA pools
every covered block output, so the pass is paid many times per step.
"""

import torch

# Keeps the gradient of sqrt finite where a channel is constant (a 1x1 map at small resolutions).
STD_EPS = 1e-5
# GCT's epsilon under its embedding's square root (the authors' 1e-5).
L2_EPS = 1e-5


class _MeanStdPool(torch.autograd.Function):
    """(B, C, H, W) -> (B, C, 2) mean and std, in float32 for half-precision maps (at least float32)."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        # Statistics of half-precision maps accumulate in float32, as var_mean does internally, and
        # stay float32 for the backward: a mean rounded to bfloat16 is off by up to mean * 2^-9, as
        # much as (x - mean) itself where mean/std is large.
        acc = torch.promote_types(x.dtype, torch.float32)
        mean = x.mean(dim=(2, 3), keepdim=True, dtype=acc)
        # Population variance (not unbiased) so that a 1x1 map gives std = sqrt(eps), not NaN.
        var = torch.linalg.vector_norm(x - mean, dim=(2, 3), dtype=acc).square_() / (x.shape[2] * x.shape[3])
        return torch.stack((mean.flatten(1), torch.sqrt(var + STD_EPS)), dim=-1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, stats = ctx.saved_tensors
        count = x.shape[2] * x.shape[3]
        mean, std = stats[..., 0, None, None], stats[..., 1, None, None]
        grad_mean, grad_std = grad[..., 0, None, None], grad[..., 1, None, None]
        # d mean/dx = 1/N and d std/dx = (x - mean) / (N std), written as x * slope + offset with
        # per-channel slope and offset: one multiply and one in-place add over the map. (addcmul with
        # two per-channel operands, or subtracting the mean first, costs 3-4x more on CPU.)
        # slope and offset are float32 for a half-precision x, so the product is computed in float32
        # (x * slope cancels against offset) and only the gradient is rounded to x's dtype.
        slope = grad_std / (count * std)
        offset = grad_mean / count - mean * slope
        return (x * slope).add_(offset).to(x.dtype)


class _MeanPool(torch.autograd.Function):
    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)).unsqueeze(-1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.shape = inputs[0].shape

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = ctx.shape
        return (grad / (height * width)).unsqueeze(-1).expand(batch, channels, height, width)


def _mean_max(x: torch.Tensor) -> torch.Tensor:
    return torch.stack((x.mean(dim=(2, 3)), x.amax(dim=(2, 3))), dim=-1)


def _l2(x: torch.Tensor) -> torch.Tensor:
    """GCT's embedding before its alpha: sqrt(sum_hw x^2 + eps) per channel (emca.layers.gct).

    One vector_norm instead of a squared copy of the map; for half-precision maps its result stays float32
    until the square and the eps are taken, then is rounded to x's dtype. Its backward is 0 where a channel
    is all zeros, and the eps keeps the outer sqrt's gradient finite there. Unlike the mean, it grows as
    sqrt(H W): EMCA's scale weights fuse the l2 descriptors of maps of different sizes as they are."""
    acc = torch.promote_types(x.dtype, torch.float32)
    squares = torch.linalg.vector_norm(x, dim=(2, 3), dtype=acc).square()
    return torch.sqrt(squares + L2_EPS).unsqueeze(-1).to(x.dtype)


# name -> (B, C, H, W) -> (B, C, K), in x's dtype.
POOLINGS = {
    "mean": _MeanPool.apply,
    "mean_std": lambda x: _MeanStdPool.apply(x).to(x.dtype),
    "mean_max": _mean_max,
    "l2": _l2,
}


def pool_descriptor(x: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, K): the named per-channel statistics (POOLINGS)."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling '{pooling}': choose one of {list(POOLINGS)}")
    return _pool(x, pooling)


# A leaf of torch.fx tracing (one call_function node), as timm makes its own functions
# (timm/layers/attention.py: @torch.fx.wrap). Traced through, an autograd Function records its
# forward's ops: the graph would lose the hand-written backward, and autograd refuses the recorded
# in-place square of vector_norm's output. fx.wrap patches this module's global `_pool`, for
# torch.fx.symbolic_trace and timm's tracers alike, whatever pool_descriptor's callers import; timm's
# register_notrace_function patches only names in the globals of a traced module's forward, which
# ChannelAttention.factors and EMCA.factors, called as methods, are not.
@torch.fx.wrap
def _pool(x: torch.Tensor, pooling: str) -> torch.Tensor:
    return POOLINGS[pooling](x)
