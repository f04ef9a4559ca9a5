"""The non-local block (Wang, Girshick, Gupta and He, "Non-local Neural Networks", CVPR 2018, arXiv 1711.07971;
the authors' code: github.com/facebookresearch/video-nonlocal-net, lib/models/nonlocal_helper.py).

For an input x (C x N, N = H W positions) and an inner width d = C / reduction (the paper's C/2):

    theta = W_theta x,  phi = W_phi x,  g = W_g x       three 1x1 convs C -> d, with biases     (d x N each)
    f_ij  = theta_i . phi_j                             pairwise affinity of positions i and j   (N x N)
    embedded Gaussian (Eq. 3): y_i = sum_j softmax_j(f_ij * s) g_j,   s = d^-1/2 with use_scale, else 1
    dot product      (Eq. 4): y_i = sum_j (f_ij / N) g_j              N: the number of positions j
    z = BN(W_z y) + x                                   1x1 conv d -> C with bias, then BatchNorm (Eq. 6)

The defaults are the released code's (config.py's NONLOCAL defaults and the Kinetics configs): the embedded
Gaussian with USE_SCALE (the dot products scaled by d^-1/2 before the softmax, which the paper's text does not
mention), d = C/2, biases on the four convs, the convs N(0, 0.01^2) with zero biases and the BN's scale and
shift zero, so that the block starts as the identity (BN_INIT_GAMMA 0). `subsample` is the paper's
subsampling trick (Sec. 3.3; the video code's USE_MAXPOOL, there on by default): a 2x2 max pool, stride 2, on
the input of phi and g (the released code pools before those convs; mmcv's NonLocal2d pools after them), so
that N counts a quarter of the positions; it needs maps of at least 2x2. It is off by default, as in the 2D
image implementations (timm's NonLocalAttn has none; mmcv's NonLocal2d, sub_sample=False), where one block
on res4 attends over all its positions (196 at 224 px).

Where it sits on a ResNet (`nl_positions`, `a2_positions`): the block is applied to a residual unit's output.
"+1 NL" (the paper's COCO models and Table 2a's single block, GCNet's detection rows): one block in res4
right before its last residual unit, i.e. after unit depth - 2 (ResNet-50: the fifth of six). The paper's
5-block model (Table 2c): 2 in res3 and 3 in res4 after every other unit, the placement A^2-Nets copies
(emca.layers.double_attention.a2_positions, shared).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from emca.layers.blocks import block_out_channels

PAIRWISE = ("embedded_gaussian", "dot_product")
RES4 = 2  # 0-based stage index of res4 (conv4_x)


def nl_positions(stage_depths: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """The single block of "+1 NL": res4, after its next-to-last unit (right before the last one).

    ResNet-50 / 34 (6 units in res4): ((2, 4),); ResNet-18: ((2, 0),); ResNet-101: ((2, 21),). A one-unit
    res4 has no unit before its last: the block then follows that unit.
    """
    depths = tuple(int(d) for d in stage_depths)
    if len(depths) <= RES4 or depths[RES4] < 1:
        return ()
    return ((RES4, max(depths[RES4] - 2, 0)),)


class NonLocal(nn.Module):
    """z = x + BN(W_z y(x)): the non-local block of the module docstring on a (B, C, H, W) map."""

    def __init__(
        self,
        channels: int,
        reduction: int = 2,
        use_scale: bool = True,
        pairwise: str = "embedded_gaussian",
        subsample: bool = False,
    ):
        super().__init__()
        if pairwise not in PAIRWISE:
            raise ValueError(f"non-local pairwise must be one of {PAIRWISE}, got '{pairwise}'")
        if not isinstance(reduction, int) or reduction < 1 or channels // reduction < 1:
            raise ValueError(f"non-local inner width {channels} // {reduction} must be at least 1: lower the reduction")
        self.channels, self.inner = channels, channels // reduction
        self.pairwise, self.subsample = pairwise, bool(subsample)
        # The scale is the released code's d^-1/2 (timm's NonLocalAttn scales by C^-1/2 instead).
        self.scale = self.inner**-0.5 if use_scale and pairwise == "embedded_gaussian" else 1.0
        self.theta = nn.Conv2d(channels, self.inner, 1)
        self.phi = nn.Conv2d(channels, self.inner, 1)
        self.g = nn.Conv2d(channels, self.inner, 1)
        self.out = nn.Conv2d(self.inner, channels, 1)
        self.norm = nn.BatchNorm2d(channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The released code's init: every conv N(0, 0.01^2) (CONV_INIT_STD) with zero bias; the BN's
        # scale zero (BN_INIT_GAMMA 0.0) and shift zero, so the block adds nothing until it has learnt.
        for conv in (self.theta, self.phi, self.g, self.out):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, inner={self.inner}, pairwise={self.pairwise}, scale={self.scale:.4g}, "
                f"subsample={self.subsample}")

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """y before W_z: (B, C, H, W) -> (B, d, H, W)."""
        keys = F.max_pool2d(x, 2, 2) if self.subsample else x  # the positions j
        theta = self.theta(x).flatten(2)  # (B, d, N_i)
        phi = self.phi(keys).flatten(2)  # (B, d, N_j)
        g = self.g(keys).flatten(2)  # (B, d, N_j)
        affinity = theta.transpose(1, 2) @ phi  # (B, N_i, N_j)
        if self.pairwise == "embedded_gaussian":
            # The softmax over positions j in at least float32 (a bfloat16 exp-sum over N terms loses digits).
            weights = (affinity * self.scale).softmax(dim=-1, dtype=torch.promote_types(affinity.dtype, torch.float32))
        else:
            weights = affinity / affinity.shape[-1]  # f / N, the paper's normalisation of the dot product
        y = g @ weights.to(g.dtype).transpose(1, 2)  # (B, d, N_i): y_i = sum_j w_ij g_j
        return y.unflatten(2, x.shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Back to the input's dtype: under autocast a float32 BN output would otherwise promote what follows.
        return x + self.norm(self.out(self.attention(x))).to(x.dtype)


def nl_block(block: nn.Module, **options) -> None:
    """Apply a NonLocal (of the block's output width) to a torchvision block's output."""
    block.after = NonLocal(block_out_channels(block), **options)


__all__ = ["NonLocal", "nl_block", "nl_positions", "PAIRWISE"]
