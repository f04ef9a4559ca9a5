"""GC: the global context block of GCNet (Cao, Xu, Lin, Wei and Hu, ICCVW 2019 / TPAMI 2020).

The block adds one global context vector, computed from the residual branch y itself, to every
position of y (the paper's Eq. 3 with its three steps):

    context modelling   a = softmax_hw(W_k y)                       W_k: 1x1 conv C -> 1, with bias
                        c = sum_hw a * y                            (B, C): attention pooling
    transform           t = W_v2 ReLU(LN(W_v1 c))                  C -> C / r -> C, with biases
    fusion              out = y + t                                 broadcast over H x W

The layout follows the authors' code (github.com/xvjiarui/GCNet, mmdet/ops/gcb/context_block.py,
pooling_type='att', fusion_types=('channel_add',)): biases everywhere, the LayerNorm over the
C / r bottleneck with scale and shift (eps 1e-5), the mask conv Kaiming-initialised (fan_in) and the
last transform layer zero-initialised, so that the block starts as the identity. The paper's bottleneck
ratio 1/r is given as its divisor r (`reduction`, as every method's): hidden width C // r, the width of
the authors' int(C * ratio). The transform acts on a pooled vector, so it is written with Linear layers
and a LayerNorm over (C // r,), the same arithmetic as the authors' 1x1 convs on (B, C, 1, 1).
"""

import torch
from torch import nn


class GlobalContext(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = channels // reduction
        if hidden < 1:
            raise ValueError(f"GC's bottleneck {channels} // {reduction} must be at least 1 channel")
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.fc1 = nn.Linear(channels, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The authors' init (mmcv kaiming_init / constant_init): the mask conv Kaiming-normal (fan_in,
        # ReLU gain) with zero bias; the last layer zero, so the added context starts at zero.
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def context(self, y: torch.Tensor) -> torch.Tensor:
        """Attention pooling: (B, C, H, W) -> (B, C), the softmax-weighted sum over positions."""
        logits = self.conv_mask(y).flatten(1)  # (B, H*W)
        # The softmax over H*W positions is taken in at least float32 (a bfloat16 exp-sum over
        # thousands of positions loses most of its digits), then weights y in y's dtype.
        weights = logits.softmax(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        return (y.flatten(2) @ weights.to(y.dtype).unsqueeze(-1)).squeeze(-1)

    def transform(self, context: torch.Tensor) -> torch.Tensor:
        """The bottleneck transform: (B, C) -> (B, C)."""
        return self.fc2(self.act(self.norm(self.fc1(context))))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        # Cast back to y's dtype: under autocast the float32 LayerNorm would otherwise promote the
        # block output, and so every later block, to float32.
        return y + self.transform(self.context(y))[:, :, None, None].to(y.dtype)


__all__ = ["GlobalContext"]
