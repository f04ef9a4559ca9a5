"""CoordAtt: coordinate attention (Hou, Zhou and Feng, CVPR 2021).

Channel attention that keeps one spatial direction: y (B, C, H, W) is average-pooled along each axis
separately, the two strips share one bottleneck, and each gives a gate along its own axis (the
paper's Eqs. 4-9):

    z^h = mean_w y                        (B, C, H, 1)   pooled along the width: one value per row
    z^w = mean_h y                        (B, C, 1, W)   pooled along the height: one value per column
    f   = h_swish(BN(F1([z^h, z^w])))     (B, m, H + W)  one 1x1 conv C -> m over both strips, concatenated
    g^h = sigmoid(F_h(f^h))               (B, C, H, 1)   f split back into its H and W parts,
    g^w = sigmoid(F_w(f^w))               (B, C, 1, W)   each mapped m -> C by its own 1x1 conv
    out = y * g^w * g^h                   (B, C, H, W)

The widths and layers follow the authors' released code (github.com/houqb/CoordAttention @ 7619bea,
coordatt.py, and mbv2_ca.py, the model of their released ImageNet weights): the bottleneck width
m = max(8, C // reduction) with reduction 32, 1x1 convolutions with biases, BatchNorm on the
concatenated strips (so its batch statistics are taken over both directions together), h_swish
(x * ReLU6(x + 3) / 6, PyTorch's Hardswish) and sigmoid gates. The authors release no ResNet; on
ResNet the module sits where SE does (the table entry: the residual branch of every block, before the
shortcut add), as in their MobileNetV2 it takes SE's place in the inverted residual block.

timm's CoordAttn (timm/layers/coord_attn.py) computes the same forward with other defaults: a
bottleneck of make_divisible(C / 16 * 2 / 3, 8) channels, no conv biases (tests/test_attn_coord.py
compares the two with the authors' width and biases given to timm's).
"""

from __future__ import annotations

import torch
from torch import nn


class CoordAttention(nn.Module):
    def __init__(self, channels: int, reduction: int = 32, min_hidden: int = 8):
        super().__init__()
        if reduction < 1 or min_hidden < 1:
            raise ValueError(f"CoordAtt's reduction ({reduction}) and min_hidden ({min_hidden}) must be at least 1")
        hidden = max(min_hidden, channels // reduction)
        self.conv1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.act = nn.Hardswish()  # the authors' h_swish: x * ReLU6(x + 3) / 6
        self.conv_h = nn.Conv2d(hidden, channels, kernel_size=1)
        self.conv_w = nn.Conv2d(hidden, channels, kernel_size=1)

    def gates(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The row gate (B, C, H, 1) and the column gate (B, C, 1, W), in y's dtype."""
        height, width = y.shape[-2:]
        rows = y.mean(dim=3, keepdim=True)  # (B, C, H, 1)
        columns = y.mean(dim=2, keepdim=True).transpose(2, 3)  # (B, C, W, 1): both strips along dim 2
        f = self.act(self.bn1(self.conv1(torch.cat((rows, columns), dim=2))))
        f_rows, f_columns = torch.split(f, [height, width], dim=2)
        # In y's dtype: under autocast a float32 BatchNorm output would otherwise make the gates, the
        # block output and every later block float32.
        gate_h = torch.sigmoid(self.conv_h(f_rows)).to(y.dtype)
        gate_w = torch.sigmoid(self.conv_w(f_columns)).transpose(2, 3).to(y.dtype)
        return gate_h, gate_w

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        gate_h, gate_w = self.gates(y)
        return y * gate_w * gate_h  # the authors' order of the two products


__all__ = ["CoordAttention"]
