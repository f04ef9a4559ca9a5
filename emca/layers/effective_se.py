"""ESE: effective Squeeze-Excitation (Lee & Park, "CenterMask: Real-Time Anchor-Free Instance
Segmentation", CVPR 2020, Sec. 3.2 and Eq. 3), the channel attention of VoVNetV2.

SE's two fully connected layers squeeze C to C / r and back; the paper argues that the squeeze loses
channel information and keeps one layer at full width instead:

    d = mean_hw y                       (B, C): global average pooling
    z = W d + b                         W: C x C, b: C  (one 1x1 convolution with bias)
    out = y * hsigmoid(z)               hsigmoid(z) = ReLU6(z + 3) / 6

Where it sits follows the authors' released VoVNetV2 (github.com/youngwanLEE/vovnet-detectron2,
vovnet/vovnet.py @ d2fba5b, eSEModule): on the aggregated output of every OSA module, before the
identity add, i.e. on a block's residual branch before the shortcut, where SE sits in a ResNet. Its
ImageNet models put one in every OSA module of every stage; on a ResNet that is every block
(integration all), as timm's create_attn('ese') gives. The module has no option: the authors' eSEModule
takes a `reduction` it never uses, and timm's `add_maxpool` is an experiment of timm's, not the paper's.

The layer acts on the pooled vector, so it is a Linear C -> C on (B, C) (the same arithmetic as the
authors' 1x1 convolution on (B, C, 1, 1)), initialised as the authors' backbone initialises every
convolution: Kaiming-normal weight (fan_in, ReLU gain), the bias as PyTorch's default.

As EMCA's W_m2 (attention=emca_ese) the excitation is the layer alone, on EMCA's fused mean descriptor.
EMCA's gate stays its sigmoid (Algorithm 1: Z = sigmoid(W_m2(X_a))), as for every other W_m2 (EMCA-CBAM
uses CBAM's MLP, not CBAM's module): EMCA has no per-excitation gate, and the comparison of EMCA-X with
X is then one of W_m1's fusion alone, not of two different gates.
"""

import torch
from torch import nn

from emca.layers.channel_attention import ChannelAttention


class ESEExcitation(nn.Module):
    """ESE's excitation: one fully connected layer C -> C with bias on the mean descriptor."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Linear(channels, channels)
        # The authors' VoVNet init (kaiming_normal_ on every Conv2d, the eSE layer among them).
        nn.init.kaiming_normal_(self.fc.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, descriptor: torch.Tensor) -> torch.Tensor:
        return self.fc(descriptor.squeeze(-1))


class EffectiveSE(ChannelAttention):
    """y -> y * hsigmoid(W mean_hw(y) + b): the plain ESE module (attention=ese).

    A ChannelAttention whose `gate` is the hard sigmoid, so that the learned scales are read from
    `gate` as for every other channel attention (emca.models.attention_modules).
    """

    def __init__(self, channels: int):
        super().__init__(ESEExcitation(channels), pooling="mean")
        # nn.Hardsigmoid is ReLU6(z + 3) / 6 (as the authors' Hsigmoid and timm's 'hard_sigmoid'),
        # one ONNX op (HardSigmoid) rather than an add, a clip and a division.
        self.gate = nn.Hardsigmoid()


__all__ = ["ESEExcitation", "EffectiveSE"]
