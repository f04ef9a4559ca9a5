"""The double attention block of A^2-Nets (Chen et al., "A^2-Nets: Double Attention Networks", NeurIPS 2018,
arXiv 1810.11579; official code in MXNet, github.com/cypw/A2-Net).

For an input X (C x HW), with m = value_channels and n = key_channels (Sec. 3, Eqs. 2-6 of the paper):

    A = phi(X)                       1x1 conv -> m feature maps             (m x HW)
    B = softmax_HW(theta(X))         1x1 conv -> n attention maps, each normalised over the HW locations
    V = softmax_n(rho(X))            1x1 conv -> n attention weights at every location, normalised over n
    gather      G = A B^T            n global descriptors of m dims         (m x n)
    distribute  Z = G V              each location takes a convex mix of the descriptors   (m x HW)
    out  = X + conv1x1(Z)            the extra 1x1 conv brings Z back to C channels, added to the input

Z is computed left-associated, (A B^T) V, which never forms an HW x HW matrix (the paper's advice whenever
HW^2 > m n). Note that V is a softmax over the n descriptors at each location; several re-implementations
softmax it over the locations instead, which is not the paper's distribution step.

Where the paper's ResNet-50 has them, and the block's width (see `a2_positions`): 5 blocks, each after the
output of a residual unit, as in the Non-local Networks setup A^2-Nets compares against: after every other
unit of res3 (2) and res4 (3). m = n = C/2 (the defaults) reproduces the published size best
(32.91M vs 33.0M printed, 6.5 GFLOPs); the paper's Kinetics ablations (ResNet-26) used C/4 instead.
The paper names no BatchNorm in the block; `norm=True` adds one after the output conv, zero-initialised so
that the block starts as the identity (the Non-local Networks recipe), as an option.
"""

from typing import Sequence

import torch
from torch import nn

from emca.layers.blocks import block_out_channels

# Blocks per stage (0-based stage index: 1 = res3, 2 = res4) of the paper's 5-block ResNet-50.
A2_BLOCKS_PER_STAGE = {1: 2, 2: 3}


def a2_positions(stage_depths: Sequence[int]) -> tuple:
    """The (stage_index, block_index) pairs (both 0-based) after whose output a DoubleAttention is applied.

    ResNet-50 (3, 4, 6, 3): ((1, 1), (1, 3), (2, 1), (2, 3), (2, 5)) - every other unit of res3 and res4, the
    last of each pair, as the Non-local reference code places its 5 blocks (facebookresearch/video-nonlocal-net,
    lib/models/resnet_helper.py: `idx % nonlocal_mod == nonlocal_mod - 1` with nonlocal_mod 2).
    Other depths keep 2 blocks in res3 and 3 in res4, spread evenly by the same rule with the period
    depth // count; for ResNet-101 this is the reference code's own choice (res4: period 7 -> units 6, 13, 20).
    A stage with fewer units than blocks gets one block after each unit (ResNet-18: (1, 0), (1, 1), (2, 0), (2, 1)).
    """
    depths = tuple(int(d) for d in stage_depths)
    positions = []
    for stage, wanted in A2_BLOCKS_PER_STAGE.items():
        if stage >= len(depths) or depths[stage] < 1:
            continue
        count = min(wanted, depths[stage])
        period = depths[stage] // count
        units = [i for i in range(depths[stage]) if i % period == period - 1][:count]
        positions.extend((stage, i) for i in units)
    return tuple(positions)


class DoubleAttention(nn.Module):
    """X -> X + conv1x1((A softmax_HW(B)^T) softmax_n(V)), applied to a block's output (B, C, H, W)."""

    def __init__(
        self,
        channels: int,
        key_channels: int | None = None,
        value_channels: int | None = None,
        *,
        bias: bool = True,
        norm: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.key_channels = key_channels or max(1, channels // 2)  # n: number of global descriptors
        self.value_channels = value_channels or max(1, channels // 2)  # m: width of each descriptor
        m, n = self.value_channels, self.key_channels
        self.features = nn.Conv2d(channels, m, 1, bias=bias)  # phi -> A
        self.gather_maps = nn.Conv2d(channels, n, 1, bias=bias)  # theta -> B
        self.distribute_maps = nn.Conv2d(channels, n, 1, bias=bias)  # rho -> V
        self.proj = nn.Conv2d(m, channels, 1, bias=bias)
        if norm:
            self.norm = nn.BatchNorm2d(channels)
            nn.init.zeros_(self.norm.weight)
        else:
            self.norm = None

    def extra_repr(self) -> str:
        return f"channels={self.channels}, key_channels(n)={self.key_channels}, value_channels(m)={self.value_channels}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.features(x).flatten(2)  # (B, m, HW)
        b = self.gather_maps(x).flatten(2).softmax(dim=-1)  # (B, n, HW): each map sums to 1 over locations
        v = self.distribute_maps(x).flatten(2).softmax(dim=1)  # (B, n, HW): sums to 1 over n at each location
        descriptors = a @ b.transpose(1, 2).to(a.dtype)  # (B, m, n)
        z = (descriptors @ v.to(a.dtype)).unflatten(2, x.shape[2:])  # (B, m, H, W)
        out = self.proj(z)
        if self.norm is not None:
            out = self.norm(out)
        # Back to the input's dtype: under autocast a float32 softmax or BN output would otherwise promote it.
        return x + out.to(x.dtype)


def a2_block(block: nn.Module) -> None:
    """Apply a DoubleAttention (the paper's widths) to a torchvision block's output."""
    block.after = DoubleAttention(block_out_channels(block))
