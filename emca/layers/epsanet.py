"""PSA: the Pyramid Squeeze Attention conv of EPSANet (Zhang et al., "EPSANet: An Efficient Pyramid Squeeze
Attention Block on Convolutional Neural Network", arXiv 2105.14447 / ACCV 2022; official code
github.com/murufeng/EPSANet, models/epsanet.py `PSAModule` and models/SE_weight_module.py `SEWeightModule`).

A "block" part: `PSAConv` replaces the 3x3 conv of a residual block (torchvision Bottleneck.conv2; the block
keeps its bn2, ReLU and everything else), as the EPSA block does:

    SPC    F_i = conv_{k_i, g_i}(x)                 4 parallel convs, each out_channels / 4 wide, same stride
    SE     Z_i = sigmoid(W2 relu(W1 avgpool(F_i) + b1) + b2)     one SEWeight module (biases, r = 16),
                                                                shared by the 4 branches as in the official code
    att    a_i = softmax_i(Z_i)                      per channel, across the 4 branches (of the sigmoid outputs)
    out    concat_i(a_i * F_i)                       -> out_channels

Sizes of the paper: EPSANet-50 (Small) is the released code: kernels (3, 5, 7, 9), groups (1, 4, 8, 16) at
ResNet-50 widths (22.56M params, README "Model Zoo"; a torchvision resnet50 with every Bottleneck.conv2 replaced
gives exactly 22,561,715). EPSANet-50 (Large) was never released (issue #21); the maintainers' answer (issue #15)
is groups (32, 32, 32, 32) with wider PSA inputs/outputs (paper Table 1), i.e. a doubled bottleneck width
(torchvision `width_per_group=128`). That reading gives 30.10M, not the published 27.90M, so "large" is not
offered (EPSA_SIZES) until its configuration can be reproduced.

BasicBlock (ResNet-18/34; the paper has no such model): replace `block.conv2`, not conv1. conv2 maps planes ->
planes at stride 1 in every block, which is exactly the PSA of the EPSA block (PSAModule(planes, planes)),
and the attention then sits right before bn2 and the residual add, where the other methods act; conv1 carries
the stage's stride and channel change, which its shortcut (downsample) mirrors, so it stays a plain 3x3.
With the "small" groups every width of ResNet-18/34 works (64-channel stage: 16 channels per branch, divisible
by 16; inputs 64..512 divisible by 16).
"""

import torch
from torch import nn

# What PSAConv takes (kernels, groups) for each offered size of the paper.
EPSA_SIZES = {
    "small": {"kernels": (3, 5, 7, 9), "groups": (1, 4, 8, 16)},
}


def psa_conv_options(size: str) -> dict:
    """The PSAConv keyword options of a named EPSANet size. Only "small", the released and reproducible
    one, is offered: "large" was never released and no reading of the paper reproduces its 27.90M."""
    if size not in EPSA_SIZES:
        raise ValueError(f"EPSANet size must be one of {tuple(EPSA_SIZES)}, got '{size}'")
    return dict(EPSA_SIZES[size])


def epsa_block(block: nn.Module, size: str = "small", reduction: int = 16) -> None:
    """Make a torchvision block an EPSA block: its conv2 (the Bottleneck's 3x3; a BasicBlock's second
    3x3, see the module docstring) becomes a PSAConv of the same widths and stride."""
    conv = block.conv2
    block.conv2 = PSAConv(conv.in_channels, conv.out_channels, conv.stride[0], reduction=reduction,
                          **psa_conv_options(size))


class SEWeight(nn.Module):
    """The official SEWeightModule: avgpool -> 1x1 conv (bias) -> ReLU -> 1x1 conv (bias) -> sigmoid, returning
    the (B, C) weights. PSA softmaxes these sigmoid outputs across the branches (not the raw logits)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        # channels // reduction as in the official code; at least 1 so that narrow branches still build.
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1)
        self.gate = nn.Sigmoid()

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        pooled = f.mean(dim=(2, 3), keepdim=True)
        return self.gate(self.fc2(self.relu(self.fc1(pooled))))[:, :, 0, 0]


class PSAConv(nn.Module):
    """Drop-in replacement of a 3x3 conv (in_channels -> out_channels at `stride`), bias-free like it.

    `shared_se=True` is the official code (one SEWeight applied to the 4 branches); False gives each branch its
    own SEWeight (the paper's text reads either way).

    The output channels are ordered branch by branch, smallest kernel first. The official code concatenates
    them in the reverse order (largest kernel first): a fixed channel permutation that the following bn2 and
    1x1 conv absorb, so the networks are the same up to relabelling channels.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        kernels: tuple = (3, 5, 7, 9),
        groups: tuple = (1, 4, 8, 16),
        reduction: int = 16,
        shared_se: bool = True,
    ):
        super().__init__()
        kernels, groups = tuple(kernels), tuple(groups)
        if len(kernels) != len(groups):
            raise ValueError(f"PSAConv needs one group count per kernel, got kernels={kernels} groups={groups}")
        splits = len(kernels)
        if out_channels % splits:
            raise ValueError(f"PSAConv splits out_channels={out_channels} into {splits} branches: not divisible")
        split = out_channels // splits
        for k, g in zip(kernels, groups, strict=True):
            if k % 2 == 0:
                raise ValueError(f"PSAConv kernels must be odd (same padding), got {k}")
            if in_channels % g or split % g:
                raise ValueError(
                    f"PSAConv branch {k}x{k} with {g} groups needs in_channels={in_channels} and the branch width "
                    f"out_channels/{splits}={split} divisible by {g}"
                )
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.kernels, self.groups, self.split = kernels, groups, split
        # padding k // 2 keeps every branch at the 3x3 conv's output size, so the branches can be stacked.
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, split, k, stride=stride, padding=k // 2, groups=g, bias=False)
            for k, g in zip(kernels, groups, strict=True)
        )
        if shared_se:
            self.se = SEWeight(split, reduction)
        else:
            self.se = nn.ModuleList(SEWeight(split, reduction) for _ in kernels)
        self.softmax = nn.Softmax(dim=1)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, stride={self.stride}, kernels={self.kernels}, "
                f"groups={self.groups}, shared_se={isinstance(self.se, SEWeight)}")

    def branch_weights(self, feats: list) -> torch.Tensor:
        """The softmax attention (B, S, C/S) over the S branches, per channel."""
        if isinstance(self.se, SEWeight):
            z = [self.se(f) for f in feats]
        else:
            z = [se(f) for se, f in zip(self.se, feats, strict=True)]
        return self.softmax(torch.stack(z, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [branch(x) for branch in self.branches]
        stacked = torch.stack(feats, dim=1)  # (B, S, C/S, H', W')
        # In the branch convs' dtype: under autocast the softmax may run in float32, which would otherwise
        # promote the output (and every later layer) away from the dtype an nn.Conv2d here would give.
        weights = self.branch_weights(feats).to(stacked.dtype)
        out = stacked * weights[..., None, None]
        return out.flatten(1, 2)
