"""SimAM: a simple, parameter-free attention module (Yang, Zhang, Li and Xie, ICML 2021).

Every neuron t of a channel (one of its M = H x W positions) gets its own weight, from the minimal
energy of a linear separation of t from the channel's other neurons (the paper's Eqs. 2-6). With the
channel's mean mu and variance sigma^2 (over its M positions, divided by M - 1 as the authors' code
does) and the regulariser lambda, the minimal energy is

    e_t = 4 (sigma^2 + lambda) / ((t - mu)^2 + 2 sigma^2 + 2 lambda)

and a neuron that stands out from its channel (low energy) matters more. The module scales each
neuron by the sigmoid of its inverse energy:

    1 / e_t = (t - mu)^2 / (4 (sigma^2 + lambda)) + 1/2
    out     = x * sigmoid(1 / e_t)                              (B, C, H, W), no parameters

Where it sits and its lambda follow the authors' released ImageNet code (github.com/ZjjConan/SimAM
@ ae98f43): networks/imagenet/resnet.py puts the module right after each block's 3x3 convolution
(`conv2 = Sequential(conv2, simam)`, before bn2), in the BasicBlock (its second 3x3) and the
Bottleneck alike, in every block: not after the block's last BatchNorm, where the same file puts SE and
CBAM. The README's ImageNet training commands pass `--attention_param 0.1`, lambda = 0.1, and so do the
mmdetection configs that start from the released ImageNet ResNet-50 (mask_rcnn_r50simam_fpn.py); 1e-4
is only the module's constructor default (simam_module.py), so `e_lambda` defaults to 0.1 here.

On ResNet the block's conv2 becomes a SimAMConv2d: the same convolution (the same parameter, so the
same state_dict keys and initialisation as the plain ResNet's, and plain checkpoints load) followed by
SimAM. A map of one position (H = W = 1: ResNet stage 4 at 32 px) has t = mu, so its energy term is 0
for any variance; the variance's divisor is taken as 1 there, where the authors' code divides 0 by 0.
"""

from __future__ import annotations

import torch
from torch import nn

SIMAM_LAMBDA = 0.1  # the released ImageNet models' (module docstring)


def inverse_energy(x: torch.Tensor, e_lambda: float) -> torch.Tensor:
    """1 / e_t for every neuron of x (B, C, H, W), same shape."""
    positions = x.shape[-2] * x.shape[-1]
    # M - 1, or 1 for a one-position map (module docstring). Written without `max` or an `if`, so that
    # torch.fx traces it as arithmetic on the input's size instead of fixing one branch.
    others = positions - 1 + (positions == 1)
    squared = (x - x.mean(dim=(2, 3), keepdim=True)).square()
    variance = squared.sum(dim=(2, 3), keepdim=True) / others
    return squared / (4 * (variance + e_lambda)) + 0.5


class SimAM(nn.Module):
    """The paper's module on a (B, C, H, W) map: x * sigmoid(1 / e_t), no parameters."""

    def __init__(self, e_lambda: float = SIMAM_LAMBDA):
        super().__init__()
        if not e_lambda > 0:
            raise ValueError(f"SimAM's e_lambda must be positive (it keeps the energy finite), got {e_lambda}")
        self.e_lambda = float(e_lambda)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(inverse_energy(x, self.e_lambda))

    def extra_repr(self) -> str:
        return f"e_lambda={self.e_lambda}"


class SimAMConv2d(nn.Conv2d):
    """A convolution followed by SimAM, with the convolution's own parameter names (weight, bias)."""

    def __init__(self, *args, e_lambda: float = SIMAM_LAMBDA, **kwargs):
        super().__init__(*args, **kwargs)
        self.simam = SimAM(e_lambda)

    @classmethod
    def wrapping(cls, conv: nn.Conv2d, e_lambda: float = SIMAM_LAMBDA) -> "SimAMConv2d":
        """`conv` followed by SimAM, holding conv's own parameters (not copies of them)."""
        wrapped = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                      dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                      padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
                      e_lambda=e_lambda)
        wrapped.weight = conv.weight
        wrapped.bias = conv.bias
        return wrapped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.simam(super().forward(x))


def simam_block(block: nn.Module, e_lambda: float = SIMAM_LAMBDA) -> None:
    """SimAM after a torchvision block's 3x3 convolution conv2 (the Bottleneck's 3x3, a BasicBlock's
    second 3x3), as the authors' ImageNet ResNets place it."""
    if isinstance(block.conv2, SimAMConv2d):
        raise ValueError("this block already carries SimAM: apply simam_block once per block")
    block.conv2 = SimAMConv2d.wrapping(block.conv2, e_lambda)


__all__ = ["SIMAM_LAMBDA", "SimAM", "SimAMConv2d", "inverse_energy", "simam_block"]
