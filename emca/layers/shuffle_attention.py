"""SA: Shuffle Attention (Zhang and Yang, "SA-Net: Shuffle Attention for Deep Convolutional Neural
Networks", ICASSP 2021, arXiv:2102.00240; authors' code: github.com/wofmanaf/SA-Net,
models/sa_resnet.py, class sa_layer).

A branch module. The C channels of the residual branch are split into G groups of C/G channels; each
group is split into two halves of n = C/(2G) channels, and the same 4n + 2n parameters serve every
group:

    channel half  x_c * sigmoid(cweight * AvgPool(x_c) + cbias)         one gate per channel
    spatial half  x_s * sigmoid(sweight * GN(x_s) + sbias)              one gate per position
    out           concat(halves) per group, groups back in order, then a channel shuffle with 2 groups

GN is a GroupNorm with one group per channel (an InstanceNorm over H x W, as the authors confirm in
their issue #8), affine as in their code: its weight and bias are parameters even though sweight and
sbias follow. Initial values are the authors': cweight = sweight = 0 and cbias = sbias = 1 (every
gate starts at sigmoid(1)), GN weight 1 and bias 0. With sweight = 0 the GN's affine parameters get
no gradient at the start; they learn once sweight has moved.

Parameters: 3C/G per module (3 * 2n). In the authors' SA-ResNet-50 a module sits in every
bottleneck, after bn3 and before the shortcut is added (SABottleneck.forward).
"""

import torch
from torch import nn


class ShuffleAttention(nn.Module):
    """y -> channel_shuffle(concat over groups of [channel-gated half, spatially-gated half], 2)."""

    def __init__(self, channels: int, groups: int = 64):
        super().__init__()
        if groups < 1 or channels % (2 * groups) != 0:
            raise ValueError(
                f"Shuffle attention splits the channels into {groups} groups of two equal halves: "
                f"channels ({channels}) must be a positive multiple of 2 * groups ({2 * groups})"
            )
        self.groups = groups
        half = channels // (2 * groups)
        # The authors' names and (1, n, 1, 1) shapes, so that their checkpoints load key for key.
        self.cweight = nn.Parameter(torch.zeros(1, half, 1, 1))
        self.cbias = nn.Parameter(torch.ones(1, half, 1, 1))
        self.sweight = nn.Parameter(torch.zeros(1, half, 1, 1))
        self.sbias = nn.Parameter(torch.ones(1, half, 1, 1))
        self.gn = nn.GroupNorm(half, half)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        b, c, h, w = y.shape
        # Every group becomes its own sample, so that the n-channel parameters broadcast over groups.
        grouped = y.reshape(b * self.groups, c // self.groups, h, w)
        y_channel, y_spatial = grouped.chunk(2, dim=1)

        channel_gate = torch.sigmoid(self.cweight * y_channel.mean(dim=(2, 3), keepdim=True) + self.cbias)
        spatial_gate = torch.sigmoid(self.sweight * self.gn(y_spatial) + self.sbias)
        # Gates in y's dtype: the float32 parameters (and GroupNorm, float32 under autocast) would
        # otherwise promote a bfloat16 branch, and with it every later block, to float32.
        out = torch.cat((y_channel * channel_gate.to(y.dtype), y_spatial * spatial_gate.to(y.dtype)), dim=1)
        # Channel shuffle with 2 groups: channel k of the first half and channel k of the second half
        # of the concatenated map become neighbours 2k and 2k + 1.
        return out.reshape(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)


def shuffle_attention(channels: int, groups: int = 64) -> ShuffleAttention:
    """The paper's 64 groups where the width allows, else as many as it does (channels // 2): ResNet-18/34's
    64-channel first stage gets 32 groups. SA-Net has no basic-block model; this keeps every depth buildable
    with the paper's value everywhere it fits (every stage of ResNet-50 and deeper)."""
    return ShuffleAttention(channels, min(groups, channels // 2))
