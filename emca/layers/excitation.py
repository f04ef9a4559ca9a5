"""Excitations: map a pooled descriptor (B, C, K) to gate logits (B, C).

These are the W_m2 of the EMCA paper and the bodies of the plain SE / ECA / SRM modules. They are
written against the pooled descriptor, not the feature map (timm's SEModule and EcaModule pool
internally), because EMCA applies them to a fused multi-scale vector rather than to a map.
"""

import math
from typing import Sequence

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
    parameter counts the paper prints (PAPER.md §6).
    """

    num_statistics = 1

    def __init__(self, channels: int, reduction: int = 16, bias: bool = True):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc1 = nn.Linear(channels, hidden, bias=bias)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels, bias=bias)

    def forward(self, descriptor: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(descriptor.squeeze(-1))))


class ECAExcitation(nn.Module):
    """Efficient Channel Attention body: a 1-D convolution of size k across the channel axis."""

    num_statistics = 1

    def __init__(self, channels: int, kernel_size: int | None = None):
        super().__init__()
        kernel_size = kernel_size or eca_kernel_size(channels)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"ECA kernel size must be a positive odd number, got {kernel_size}")
        # The weight lives in a Conv1d for timm's EcaModule layout (`conv.weight`, (1, 1, k)).
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, descriptor: torch.Tensor) -> torch.Tensor:
        # The same cross-correlation as self.conv, as k-channel windows times the kernel: on a
        # one-channel signal conv1d costs 2.5-4x more on CPU (forward+backward, batch 8), and its
        # weight gradient comes back with strides that DDP's gradient buckets warn about.
        k = self.conv.kernel_size[0]
        windows = F.pad(descriptor.squeeze(-1), (k // 2, k // 2)).unfold(-1, k, 1)  # (B, C, k)
        return windows @ self.conv.weight.view(k)


class SRMExcitation(nn.Module):
    """Style-based Recalibration body: channel-wise FC over (mean, std), then BatchNorm."""

    num_statistics = 2

    def __init__(self, channels: int):
        super().__init__()
        # Zero-initialised as in the SRM authors' code: every gate starts at sigmoid(0) = 0.5.
        self.cfc = nn.Parameter(torch.zeros(channels, 2))
        self.bn = nn.BatchNorm1d(channels)

    def forward(self, descriptor: torch.Tensor) -> torch.Tensor:
        return self.bn((descriptor * self.cfc).sum(dim=-1))


EXCITATIONS = {"se": SEExcitation, "eca": ECAExcitation, "srm": SRMExcitation}


def create_excitation(
    kind: str, channels: int, *, se_ratio: int = 16, se_bias: bool = True, eca_kernel: int | None = None
) -> nn.Module:
    if kind == "se":
        return SEExcitation(channels, se_ratio, se_bias)
    if kind == "eca":
        return ECAExcitation(channels, eca_kernel)
    if kind == "srm":
        return SRMExcitation(channels)
    raise ValueError(f"unknown excitation '{kind}': choose one of {sorted(EXCITATIONS)}")


def resolve_eca_kernels(eca_kernel, stage_channels: Sequence[int]) -> list[int]:
    """'adaptive' -> the formula per stage; an explicit list (one odd size per stage) is kept."""
    if eca_kernel in (None, "adaptive"):
        return [eca_kernel_size(c) for c in stage_channels]
    kernels = list(eca_kernel)
    if len(kernels) != len(stage_channels):
        raise ValueError(
            f"eca_kernel lists {len(kernels)} sizes but the backbone has {len(stage_channels)} stages: "
            f"give one odd size per stage, e.g. [3, 5, 5, 7], or 'adaptive'"
        )
    for k in kernels:
        if not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"eca_kernel sizes must be positive odd integers, got {kernels}")
    return kernels


__all__ = [
    "SEExcitation",
    "ECAExcitation",
    "SRMExcitation",
    "EXCITATIONS",
    "create_excitation",
    "eca_kernel_size",
    "resolve_eca_kernels",
]
