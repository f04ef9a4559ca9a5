"""Gather-Excite: GE-theta- and GE-theta+ (Hu, Shen, Albanie, Sun, Vedaldi, NeurIPS 2018, arXiv:1810.12348).

A GE module gates a block's residual branch y (B, C, H, W) with context gathered over a spatial
extent e and redistributed to every position:

    gather   z = xi_G(y)                          (B, C, H/e, W/e); global extent: (B, C)
    excite   out = y * sigmoid(interp(f(z)))      interp: nearest-neighbour back to H x W

    GE-theta-   xi_G = average pooling, kernel 2e - 1, stride e (global: the mean); f = identity.
                Parameter-free.
    GE-theta+   xi_G = depthwise convolutions with BN: log2(e) 3x3 stride-2 ones, or for global extent
                one whose kernel covers the whole map; then ReLU and f = SE's excitation
                (1x1 C -> C/r, ReLU, 1x1 C/r -> C, with biases).

Defaults follow the authors' released ResNet-50 prototxts (github.com/hujie-frank/GENet @ ae791f8,
models/RN50-GEPF.prototxt for GE-theta-, RN50-GEPP.prototxt for GE-theta+), the paper's best ImageNet
variants, one module on the residual branch of every bottleneck, before the shortcut add (their Axpy):
- GEPF: global average pooling, sigmoid, gate (global extent; the paper's 2/4/8 are `extent`).
- GEPP: a depthwise conv without bias whose kernel is the stage's map at 224 px (56/28/14/7),
  BatchNorm, ReLU, 1x1 conv to C/16 with bias, ReLU, 1x1 conv back with bias, sigmoid, gate.
  The ReLU after the gather's BN is in the authors' GE-theta+ (not in their GE-theta, RN50-GEP, where
  the BN output goes to the sigmoid); timm's GatherExcite omits it for global extent. For extents
  2/4/8, which the authors released no GE-theta+ for, ReLU follows every gather BN, as it follows the
  global gather's: the excite MLP reads the gather's rectified output either way.
Their init is kept: the gather conv MSRA (Kaiming normal, fan_in), the excite 1x1s N(0, 0.01^2) with
zero biases, BN at scale 1, shift 0.

A global gather at another map size (another input resolution than 224 px) reads the map average-
pooled to the kernel's size, as FcaNet's DCT does (emca.layers.fcanet): the kernel, not the map, is
resampled (pooling is linear), so the conv's k x k weights serve every resolution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from emca.layers.excitation import SEExcitation
from emca.layers.fcanet import adaptive_pool_matrix

GLOBAL = "global"


def check_extent(extent) -> int:
    """'global' -> 0, else a power of two >= 2 (the strided gathers halve the map log2(e) times)."""
    if extent == GLOBAL:
        return 0
    if isinstance(extent, bool) or not isinstance(extent, int) or extent < 2 or extent & (extent - 1):
        raise ValueError(f"GE extent must be 'global' or a power of two >= 2 (2, 4, 8), got {extent!r}")
    return extent


# Leaves of torch.fx tracing (as timm wraps its own functions): both read the map's size, which a
# traced graph must read at run time, not fix once at tracing.
@torch.fx.wrap
def excite_to(context: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour interpolation of the gathered context (B, C, h, w) back to y's H x W."""
    return F.interpolate(context, size=y.shape[-2:], mode="nearest")


@torch.fx.wrap
def global_gather(weight: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, C): each channel's inner product with its (k, k) kernel, the depthwise conv that spans the
    whole map. On a map of another size H x W, the kernel's inner product with the map adaptively
    average-pooled to k x k, computed as <A_h^T W A_w, y> (A: the pooling matrices, pool(y) = A_h y A_w^T)."""
    kernel = weight.flatten(0, 1)  # (C, 1, k, k) -> (C, k, k)
    height, width = y.shape[-2:]
    if (height, width) != tuple(kernel.shape[-2:]):
        rows = adaptive_pool_matrix(height, kernel.shape[-2], dtype=kernel.dtype, device=kernel.device)
        columns = adaptive_pool_matrix(width, kernel.shape[-1], dtype=kernel.dtype, device=kernel.device)
        kernel = torch.einsum("ih,cij,jw->chw", rows, kernel, columns)
    return torch.einsum("bchw,chw->bc", y, kernel.to(y.dtype))


class GatherExcite(nn.Module):
    """GE-theta-: y -> y * sigmoid(nearest(avg_pool(y))), parameter-free.

    extent: 'global' (the authors' RN50-GEPF) or 2, 4, 8 (average pooling of kernel 2e - 1, stride e,
    padding e - 1 not counted in the average, as the paper's Sec. 3).
    """

    def __init__(self, channels: int, extent="global"):
        super().__init__()
        self.channels = channels
        self.extent = check_extent(extent)
        # Global extent gates whole channels: its `gate` output (B, C) is the learned scales
        # (emca.models.attention_modules); a smaller extent gates positions too.
        self.per_channel_gate = self.extent == 0
        self.gate = nn.Sigmoid()

    def extra_repr(self) -> str:
        return f"channels={self.channels}, extent={self.extent or GLOBAL}"

    def factors(self, y: torch.Tensor) -> torch.Tensor:
        """What y is multiplied by: (B, C, 1, 1) for global extent, else (B, C, H, W)."""
        if self.extent == 0:
            return self.gate(y.mean(dim=(2, 3)))[:, :, None, None]
        kernel = 2 * self.extent - 1
        context = F.avg_pool2d(y, kernel, stride=self.extent, padding=kernel // 2, count_include_pad=False)
        return self.gate(excite_to(context, y))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.factors(y)


class GatherExcitePlus(nn.Module):
    """GE-theta+: y -> y * sigmoid(nearest(SE-MLP(ReLU(BN(depthwise gather(y)))))).

    extent: 'global' (the authors' RN50-GEPP: one depthwise conv of kernel feature_size) or 2, 4, 8
        (log2(e) depthwise 3x3 stride-2 convs, each with BN and ReLU).
    feature_size: the global gather's kernel, the block's map size at 224 px (ResNet stages 56, 28,
        14, 7; the table gives one per stage). Unused for the other extents.
    reduction: the excite MLP's C -> C // r (16, the authors').
    """

    def __init__(self, channels: int, extent="global", feature_size: int = 7, reduction: int = 16):
        super().__init__()
        self.channels = channels
        self.extent = check_extent(extent)
        bad_size = isinstance(feature_size, bool) or not isinstance(feature_size, int) or feature_size < 1
        if self.extent == 0 and bad_size:
            raise ValueError(f"GE-theta+ global gather: feature_size must be a positive integer, got {feature_size!r}")
        if channels // reduction < 1:
            raise ValueError(f"GE-theta+ excite bottleneck {channels} // {reduction} must be at least 1 channel")
        steps = [(feature_size, 1, 0)] if self.extent == 0 else [(3, 2, 1)] * int(math.log2(self.extent))
        layers = []
        for kernel, stride, padding in steps:
            layers += [
                nn.Conv2d(channels, channels, kernel, stride=stride, padding=padding, groups=channels, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            ]
        self.gather = nn.Sequential(*layers)
        self.excitation = SEExcitation(channels, reduction, bias=True)
        self.per_channel_gate = self.extent == 0  # as GatherExcite
        self.gate = nn.Sigmoid()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The authors' fillers (RN50-GEPP.prototxt): msra for the gather, gaussian std 0.01 and
        # constant 0 for the excite 1x1s; Caffe's msra draws with fan_in.
        for module in self.gather:
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        for fc in (self.excitation.fc1, self.excitation.fc2):
            nn.init.normal_(fc.weight, std=0.01)
            nn.init.zeros_(fc.bias)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, extent={self.extent or GLOBAL}"

    def context(self, y: torch.Tensor) -> torch.Tensor:
        """The gathered context: (B, C) for global extent, else (B, C, H / e, W / e)."""
        if self.extent == 0:
            conv, norm, act = self.gather
            # The global conv as an inner product (global_gather), so that any map size is read;
            # BN and ReLU act on (B, C) as on the conv's (B, C, 1, 1) output.
            return act(norm(global_gather(conv.weight, y)[:, :, None, None])).flatten(1)
        return self.gather(y)

    def factors(self, y: torch.Tensor) -> torch.Tensor:
        """What y is multiplied by, in y's dtype (under autocast the float32 BN would otherwise
        promote the block output, and so every later block)."""
        context = self.context(y)
        if self.extent == 0:
            return self.gate(self.excitation(context.unsqueeze(-1)))[:, :, None, None].to(y.dtype)
        # The excite MLP at every gathered position: the 1x1 convs as Linear layers on channels-last.
        logits = self.excitation(context.permute(0, 2, 3, 1).unsqueeze(-1)).permute(0, 3, 1, 2)
        return self.gate(excite_to(logits, y)).to(y.dtype)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.factors(y)


__all__ = ["GLOBAL", "GatherExcite", "GatherExcitePlus", "check_extent", "excite_to", "global_gather"]
