"""SK: the Selective Kernel convolution of SKNet (Li, Wang, Hu & Yang, "Selective Kernel Networks", CVPR 2019,
arXiv 1903.06586; authors' release github.com/implus/SKNet @ 17dd708, Caffe, models/sknet50.prototxt).

A "block" part: `SKConv` replaces a residual block's 3x3 convolution together with the BN after it, as the SK
unit replaces ResNeXt's grouped 3x3 in SKNet-50. With M paths of kernel sizes k_1..k_M (SKNet-50: M = 2, 3x3 and
5x5) on an input X of C' channels, C output channels:

    Split   U_m = ReLU(BN(conv_m(X)))          conv_m: 3x3, dilation (k_m - 1) / 2 (5x5 -> 3x3 dilated 2, the
                                               paper's "further efficiency"), G groups, the block's stride, no bias
    Fuse    U   = sum_m U_m                    element-wise
            s   = mean_{h,w} U                 global average pool, (B, C)
            z   = ReLU(BN(W_z s))              W_z: d x C, d = max(C / r, L)   (paper Eq. 4; r = 16, L = 32)
    Select  a_m = softmax_m(W_m z)             W_m: C x d, one per path; softmax across the M paths, per channel
            V   = sum_m a_m * U_m              (B, C, H', W')

The prototxt fixes what the paper leaves open: fc1 (W_z) and fc2 (the W_m stacked, M*C outputs) are 1x1
convolutions without bias, fc1 is followed by BN and ReLU, fc2's output is reshaped to (M, C) and softmaxed over M;
d = max(C/16, 32) (32 at C = 128, 256, 512; 64 at C = 1024); every path conv has 32 groups (ResNeXt's
cardinality) and the block's stride, and is followed by its own BN and ReLU. SKNet-50 is ResNeXt-50 (32x4d) with
every bottleneck 3x3 replaced: torchvision's resnext50_32x4d edited so gives 27,479,784 parameters, the published
27.5M (tests/test_attn_sk.py).

Our backbones are torchvision ResNets, not ResNeXts: the bottleneck is 64..512 wide (ResNeXt-50: 128..1024) and its
3x3 is dense. `groups` keeps the paper's G = 32 by default, so the SK paths are grouped as in SKNet-50 but each
group is 2..16 channels wide instead of 4..32, and the network is smaller than the plain ResNet-50 (15.32M: the
dense 3x3s it replaces held 11.3M). `groups=1` keeps the replaced convolution's own (dense) grouping, the other
reading of "replace each 3x3 by an SK convolution" (37.25M, about +1.85 GFLOPs: each path costs a full 3x3).
Neither can be SKNet-50's 27.5M, whose widths are ResNeXt's (method_reference.py says so).

Where it sits (`sk_block`):
- Bottleneck (ResNet-50/101/152): conv2 becomes the SK conv and bn2 the identity (each path has its BN). The
  block's ReLU after bn2 stays: it is the identity on V, a convex combination of ReLU outputs, so the block
  computes exactly the SK unit.
- BasicBlock (ResNet-18/34; the paper has none): conv1 (with the stage's stride and channel change) becomes the
  SK conv and bn1 the identity, conv2 stays a plain 3x3 -- timm's SelectiveKernelBasic (skresnet18/34), the
  one published convention. timm additionally splits the input channels across the paths (`split_input`) and
  uses r = 8 there; we keep the paper's unit (whole input to every path, r = 16, L = 32).

Initialisation: path convs as torchvision initialises a ResNet's convs (Kaiming normal, fan_out), fc1/fc2 normal
with std 0.01 (the prototxt's gaussian fillers). In training mode the BN after fc1 normalises over the batch of
1x1 descriptors, so (as in the authors' model and timm's) a training batch needs at least 2 images.
"""

from __future__ import annotations

import torch
from torch import nn


def sk_block(block: nn.Module, groups: int = 32, reduction: int = 16, min_channels: int = 32) -> None:
    """Make a torchvision block an SK block: a Bottleneck's conv2 + bn2, a BasicBlock's conv1 + bn1 (timm's
    SelectiveKernelBasic) become one SKConv of the same widths and stride (see the module docstring)."""
    name = "conv2" if hasattr(block, "conv3") else "conv1"  # the bottleneck's 3x3; a basic block's first 3x3
    conv = getattr(block, name)
    setattr(block, name, SKConv(conv.in_channels, conv.out_channels, conv.stride[0], groups=groups,
                                reduction=reduction, min_channels=min_channels))
    setattr(block, name.replace("conv", "bn"), nn.Identity())  # each SK path has its own BN (and ReLU)


def attention_width(channels: int, reduction: int, min_channels: int) -> int:
    """d = max(C / r, L), the paper's Eq. 4 (C / r rounded down, as the prototxt's 1024 / 16 = 64)."""
    return max(channels // reduction, min_channels)


class SKConv(nn.Module):
    """Drop-in replacement of a 3x3 conv + BN (in_channels -> out_channels at `stride`): the SK convolution.

    kernels: the paths' receptive fields (odd, >= 3), each realised as a 3x3 with dilation (k - 1) / 2.
    groups: G of every path conv; reduction, min_channels: r and L of d = max(C / r, L).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, kernels: tuple = (3, 5),
                 groups: int = 32, reduction: int = 16, min_channels: int = 32):
        super().__init__()
        kernels = tuple(kernels)
        if len(kernels) < 2 or any(k < 3 or k % 2 == 0 for k in kernels):
            raise ValueError(f"SKConv needs at least 2 odd kernel sizes >= 3 (paths to select among), got {kernels}")
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"SK groups={groups} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}: pick a divisor of both (e.g. 1)")
        if reduction < 1 or min_channels < 1:
            raise ValueError(f"SK reduction ({reduction}) and min_channels ({min_channels}) must be positive")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.kernels, self.groups = kernels, groups
        self.paths = nn.ModuleList(self._path(k) for k in kernels)
        hidden = attention_width(out_channels, reduction, min_channels)
        self.fc1 = nn.Conv2d(out_channels, hidden, 1, bias=False)  # W_z
        self.bn = nn.BatchNorm2d(hidden)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, out_channels * len(kernels), 1, bias=False)  # W_1..W_M, path-major
        for fc in (self.fc1, self.fc2):
            nn.init.normal_(fc.weight, std=0.01)

    def _path(self, kernel: int) -> nn.Sequential:
        dilation = (kernel - 1) // 2
        # padding = dilation keeps every path at the plain 3x3's output size, so the paths can be summed.
        conv = nn.Conv2d(self.in_channels, self.out_channels, 3, stride=self.stride, padding=dilation,
                         dilation=dilation, groups=self.groups, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        return nn.Sequential(conv, nn.BatchNorm2d(self.out_channels), nn.ReLU(inplace=True))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, stride={self.stride}, kernels={self.kernels}, "
                f"groups={self.groups}, d={self.fc1.out_channels}")

    def path_weights(self, fused: torch.Tensor) -> torch.Tensor:
        """The selection a (B, M, C): softmax across the M paths of fc2(relu(bn(fc1(mean_hw U)))), per channel."""
        z = self.relu(self.bn(self.fc1(fused.mean(dim=(2, 3), keepdim=True))))
        logits = self.fc2(z).flatten(1).unflatten(1, (len(self.kernels), self.out_channels))
        return logits.softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paths = torch.stack([path(x) for path in self.paths], dim=1)  # (B, M, C, H', W')
        # In the paths' dtype: under autocast the softmax may run in float32, which would otherwise promote the
        # output (and every later layer) away from the dtype the replaced nn.Conv2d would give.
        weights = self.path_weights(paths.sum(dim=1)).to(paths.dtype)
        return (paths * weights[..., None, None]).sum(dim=1)
