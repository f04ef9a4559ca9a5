"""CBAM: Convolutional Block Attention Module (Woo, Park, Lee and Kweon, ECCV 2018).

The module refines the residual branch y twice, channel attention first, then spatial attention:

    channel   M_c = sigmoid(MLP(mean_hw(y)) + MLP(max_hw(y)))     one MLP shared by both statistics
              y'  = y * M_c                                         (B, C, 1, 1) scales
    spatial   M_s = sigmoid(BN(conv_kxk([max_c(y'); mean_c(y')])))  one map shared by all channels
              out = y' * M_s                                        (B, 1, H, W) scales

The layout follows the authors' code (github.com/Jongchan/attention-module, MODELS/cbam.py), whose
parameters the paper's counts are made of: the MLP's two layers have biases, the 7x7 spatial conv
has none and is followed by a one-channel BatchNorm (momentum 0.01), the spatial input stacks
[max, mean] in that order, and the spatial BN's scale starts at zero (MODELS/model_resnet.py), so
every spatial gate starts at sigmoid(0) = 0.5. timm's CbamModule differs in its defaults (no MLP
biases, [mean, max], BN momentum 0.1) but has the same structure.
"""

import torch
from torch import nn

from emca.layers.excitation import SEExcitation
from emca.layers.pooling import pool_descriptor

# The authors' BasicConv builds the spatial BN with momentum 0.01 (torch's default is 0.1).
SPATIAL_BN_MOMENTUM = 0.01


def z_pool(y: torch.Tensor, dim: int) -> torch.Tensor:
    """[max; mean] of y over `dim`, stacked as 2 channels after the batch dimension: the authors' ChannelPool
    (timm stacks [mean, max]), over the channels for CBAM's spatial gate, over any dimension for Triplet's."""
    return torch.stack((y.amax(dim=dim), y.mean(dim=dim)), dim=1)


class CBAMChannelExcitation(SEExcitation):
    """CBAM's channel-attention body on a pooled descriptor: (B, C, K) -> logits (B, C).

    logits = sum_k MLP(descriptor[..., k]), MLP = FC(C -> C/r) -> ReLU -> FC(C/r -> C), one MLP for
    every statistic. On the 'mean_max' descriptor this is MLP(mean) + MLP(max) as in the paper (its
    Eq. 2); it pools nothing itself, so that EMCA can apply it (as W_m2) to a fused descriptor. The
    sum is symmetric in the statistics, so their order does not matter.
    """

    def __init__(self, channels: int, reduction: int = 16, bias: bool = True):
        super().__init__(channels, reduction, bias)  # SE's MLP: fc1 (C -> C/r), act, fc2 (C/r -> C)

    def forward(self, descriptor: torch.Tensor) -> torch.Tensor:
        # (B, C, K) -> (B, K, C): the MLP runs on every statistic at once, then the K outputs add up.
        return self.fc2(self.act(self.fc1(descriptor.transpose(1, 2)))).sum(dim=1)


class CBAM(nn.Module):
    """The CBAM branch module: y (B, C, H, W) -> channel-gated, then spatially gated y.

    `gate` is the channel sigmoid (its output, (B, C), holds the per-channel scales, readable with a
    forward hook); `spatial_gate` is the spatial sigmoid ((B, 1, H, W)).
    """

    per_channel_gate = True  # emca.models.attention_modules: `gate` (the channel part) gives the scales

    def __init__(self, channels: int, reduction: int = 16, spatial_kernel: int = 7, bias: bool = True):
        super().__init__()
        if spatial_kernel < 1 or spatial_kernel % 2 == 0:
            raise ValueError(f"CBAM's spatial kernel must be a positive odd number, got {spatial_kernel}")
        self.excitation = CBAMChannelExcitation(channels, reduction, bias)
        self.gate = nn.Sigmoid()
        # No conv bias: the BN that follows has its own shift.
        self.spatial_conv = nn.Conv2d(2, 1, spatial_kernel, padding=spatial_kernel // 2, bias=False)
        self.spatial_bn = nn.BatchNorm2d(1, momentum=SPATIAL_BN_MOMENTUM)
        self.spatial_gate = nn.Sigmoid()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As the authors' ResNet initialises its CBAM modules: Kaiming (fan_out) for the conv, and a
        # zero BN scale, so the spatial gate starts as a constant 0.5 and only the channel gate
        # discriminates until the BN scale has grown. The MLP keeps torch's default Linear init.
        nn.init.kaiming_normal_(self.spatial_conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.spatial_bn.weight)
        nn.init.zeros_(self.spatial_bn.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        # Casts back to y's dtype: under autocast the float32 BN (and any float32 parameter) would
        # otherwise promote the block output, and so every later block, to float32.
        channel_scales = self.gate(self.excitation(pool_descriptor(y, "mean_max")))
        y = y * channel_scales[:, :, None, None].to(y.dtype)
        spatial_scales = self.spatial_gate(self.spatial_bn(self.spatial_conv(z_pool(y, 1))))
        return y * spatial_scales.to(y.dtype)


__all__ = ["CBAM", "CBAMChannelExcitation", "SPATIAL_BN_MOMENTUM", "z_pool"]
