"""Excitations: map a pooled descriptor (B, C, K) to gate logits (B, C).

These are the W_m2 of the EMCA paper and the bodies of the plain SE / ECA / SRM modules; what each
one reads (mean, mean_std) is declared in the attention table (emca/layers/create_attn.py). They are
written against the pooled descriptor, not the feature map (timm's SEModule and EcaModule pool
internally), because EMCA applies them to a fused multi-scale vector rather than to a map.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def eca_kernel_size(channels: int, gamma: int = 2, beta: int = 1, minimum: int = 3) -> int:
    """ECA's adaptive kernel: |log2(C)/gamma + beta/gamma| rounded to the nearest odd integer.

    Every t in [2m, 2m + 2) is nearest to 2m + 1; an even integer t (a tie) therefore goes up, as
    in the ECA authors' int(t) + 1 for even int(t).
    """
    t = abs(math.log2(channels) / gamma + beta / gamma)
    nearest_odd = 2 * math.floor(t / 2) + 1
    return max(nearest_odd, minimum)


class SEExcitation(nn.Module):
    """Squeeze-and-Excitation body: FC(C -> C/r) -> ReLU -> FC(C/r -> C).

    bias=True is Hu et al.'s SE (timm's SEModule); bias=False is the EMCA authors' SE, whose
    parameter counts the paper prints (docs/paper.md#parameter-counts).
    """

    def __init__(self, channels: int, reduction: int = 16, bias: bool = True):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc1 = nn.Linear(channels, hidden, bias=bias)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels, bias=bias)

    def forward(self, descriptor: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(descriptor.squeeze(-1))))


class ECAExcitation(nn.Module):
    """Efficient Channel Attention body: a 1-D convolution of size k across the channel axis.

    kernel: 'adaptive' (or None) for ECA's formula at this width, else an odd size.
    """

    def __init__(self, channels: int, kernel: int | str | None = "adaptive"):
        super().__init__()
        kernel_size = eca_kernel_size(channels) if kernel in (None, "adaptive") else kernel
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"ECA kernel size must be a positive odd number or 'adaptive', got {kernel!r}")
        # The weight lives in a Conv1d for timm's EcaModule layout (`conv.weight`, (1, 1, k)).
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, descriptor: torch.Tensor) -> torch.Tensor:
        # The same cross-correlation as self.conv, as k-channel windows times the kernel: on a
        # one-channel signal conv1d costs 2.5-4x more on CPU (forward+backward, batch 8), and its
        # weight gradient comes back with strides that DDP's gradient buckets warn about.
        k = self.conv.kernel_size[0]
        windows = self.padded(descriptor.squeeze(-1), k // 2).unfold(-1, k, 1)  # (B, C, k)
        return windows @ self.conv.weight.view(k)

    def padded(self, d: torch.Tensor, half: int) -> torch.Tensor:
        """(B, C) -> (B, C + 2 half): ECA's zero padding at both ends of the channel axis."""
        return F.pad(d, (half, half))


class SRMExcitation(nn.Module):
    """Style-based Recalibration body: channel-wise FC over (mean, std), then BatchNorm."""

    # optimizer.no_weight_decay=[srm] exempts the attention modules built on this excitation, as SRM's own
    # code trains them without weight decay (emca.engine.optim reads this, importing no layer class).
    no_weight_decay = "srm"

    def __init__(self, channels: int):
        super().__init__()
        # Zero-initialised as in the SRM authors' code: every gate starts at sigmoid(0) = 0.5.
        self.cfc = nn.Parameter(torch.zeros(channels, 2))
        self.bn = nn.BatchNorm1d(channels)

    def forward(self, descriptor: torch.Tensor) -> torch.Tensor:
        return self.bn((descriptor * self.cfc).sum(dim=-1))


__all__ = ["SEExcitation", "ECAExcitation", "SRMExcitation", "eca_kernel_size"]
