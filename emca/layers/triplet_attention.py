"""Triplet attention (Misra, Nalamada, Arasanipalai and Hou, "Rotate to Attend: Convolutional Triplet
Attention Module", WACV 2021, arXiv:2010.03045; authors' code: github.com/landskape-ai/triplet-attention,
MODELS/triplet_attention.py and MODELS/resnet.py, the ImageNet ResNet-50 of the paper's table).

A branch module. Each of three branches looks at y (B, C, H, W) along a different pair of dimensions,
reducing the third one with Z-pool (its max and its mean, stacked as two channels, max first):

    branch C-W   Z_H = [max_h y; mean_h y]            (B, 2, C, W)   reduces H (the paper's rotation about H)
    branch H-C   Z_W = [max_w y; mean_w y]            (B, 2, H, C)   reduces W (rotation about W)
    branch H-W   Z_C = [max_c y; mean_c y]            (B, 2, H, W)   reduces C (no rotation; CBAM's spatial gate)
    each         g = sigmoid(BN(conv_kxk(Z)))          k x k conv 2 -> 1 without bias, then a 1-channel BN
    out          (y * g_CW + y * g_HC + y * g_HW) / 3  each gate broadcast over the dimension it reduced

The paper writes each branch as a rotation (permute) of y, the gate, and the inverse rotation; a gate
depends on y only through its Z-pool, so the module pools y along each dimension directly and keeps y
in place, and the average of the three gated copies is y times the average gate (one product, no
permuted copies of y). The convolution sees each plane in the authors' orientation (rows C and columns W;
rows H and columns C; rows H and columns W), so their kernels load as they are.

Details from the authors' code: BN momentum 0.01 (their BasicConv); the convs initialised Kaiming normal
(fan_out), the BN shifts 0 and the BN scales 1, except the H-W branch's, which their ResNet's init sets to
0 (a key containing "SpatialGate"): that gate starts as the constant sigmoid(0) = 0.5, as CBAM's spatial
gate does. `kernel` is the paper's k: 7 in its ResNet-50 (the README also lists a k = 3 model).

Parameters: 3 (2 k^2 + 2) per module, 300 at k = 7, whatever the width. In the authors' ResNets a module
sits in every block, on the residual branch after its last BN and before the shortcut is added.
"""

import torch
from torch import nn

# CBAM's authors wrote both: each gate is CBAM's spatial gate (Z-pool, BasicConv's BN momentum 0.01).
from emca.layers.cbam import SPATIAL_BN_MOMENTUM, z_pool


class ZPoolGate(nn.Module):
    """One branch's gate: Z-pool map (B, 2, P, Q) -> sigmoid(BN(conv(map))) (B, 1, P, Q)."""

    def __init__(self, kernel: int):
        super().__init__()
        # No conv bias: the BN that follows has its own shift.
        self.conv = nn.Conv2d(2, 1, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, momentum=SPATIAL_BN_MOMENTUM)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.bn(self.conv(pooled)))


class TripletAttention(nn.Module):
    """y (B, C, H, W) -> y * (g_CW + g_HC + g_HW) / 3, the three gates of the module docstring."""

    def __init__(self, channels: int, kernel: int = 7):
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"triplet attention's kernel must be a positive odd number (7 in the paper), got {kernel}")
        # channels is not used: every branch pools one dimension to 2 maps, so the module has the same
        # 3 (2 k^2 + 2) parameters at every width (the table builds branch modules as module(channels, ...)).
        self.cw = ZPoolGate(kernel)  # the authors' ChannelGateH (cw in their later root file)
        self.hc = ZPoolGate(kernel)  # ChannelGateW (hc)
        self.hw = ZPoolGate(kernel)  # SpatialGate (hw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As the authors' ResNet initialises them (module docstring): the H-W gate starts at 0.5 everywhere.
        for gate in (self.cw, self.hc, self.hw):
            nn.init.kaiming_normal_(gate.conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.ones_(gate.bn.weight)
            nn.init.zeros_(gate.bn.bias)
        nn.init.zeros_(self.hw.bn.weight)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        g_cw = self.cw(z_pool(y, 2))  # (B, 1, C, W): pooled over H
        g_hc = self.hc(z_pool(y, 3).transpose(2, 3))  # (B, 2, H, C): pooled over W, rows H as the authors'
        g_hw = self.hw(z_pool(y, 1))  # (B, 1, H, W): pooled over C
        # Each gate back in y's layout, broadcast over the dimension it reduced: (B,C,1,W), (B,C,H,1), (B,1,H,W).
        gate = (g_cw.transpose(1, 2) + g_hc.permute(0, 3, 2, 1) + g_hw) / 3
        # In y's dtype: under autocast the float32 BN would otherwise promote the block output, and with it
        # every later block, to float32.
        return y * gate.to(y.dtype)


__all__ = ["TripletAttention", "ZPoolGate"]
