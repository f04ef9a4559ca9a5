"""SGE: Spatial Group-wise Enhance (Li, Hu and Yang, "Spatial Group-wise Enhance: Improving Semantic
Feature Learning in Convolutional Networks", 2019, arXiv:1905.09646; authors' code:
github.com/implus/PytorchInsight, classification/models/imagenet/resnet_sge.py, SpatialGroupEnhance).

A branch module. The C channels of y (B, C, H, W) are split into G groups of C/G channels; within a
group every position i holds a sub-feature vector x_i (C/G values) among m = H x W:

    global descriptor   g = (1/m) sum_i x_i                            the group's spatial mean
    similarity          c_i = g . x_i                                  one number per position
    normalisation       n_i = (c_i - mean_j c_j) / (std_j c_j + eps)    over the m positions, eps = 1e-5
    gate                a_i = sigmoid(gamma_g n_i + beta_g)             one (gamma, beta) per group
    out                 x_i * a_i                                       every channel of the group

As in the authors' code (the released SGE-ResNet models): std is the unbiased one (divided by m - 1)
and eps is added to it, not to the variance; gamma starts at 0 and beta at 1, so every gate starts at
sigmoid(1); the parameters are named weight and bias, shaped (1, G, 1, 1), so their checkpoints load
key for key. Two choices of ours where their code has no defined value: with one position (m = 1,
a 1 x 1 map) the centred similarity is 0 and so is n (their m - 1 = 0 gives NaN), and the std is
taken as a norm, whose gradient is defined where all similarities are equal (torch.std's is NaN there).

The similarity is written as a batched matrix product (the group mean against every position), so
torch's flop counter counts its C x H x W multiply-adds per module, the only ones SGE adds; it has
2G parameters per module (G = 64 in the authors' ResNets, in every block, after the branch's last BN
and before the shortcut is added).
"""

import torch
from torch import nn

EPS = 1e-5  # added to the std, as the authors' code does


class SpatialGroupEnhance(nn.Module):
    """y (B, C, H, W) -> y * sigmoid(weight * normalised similarity + bias), per group and position."""

    def __init__(self, channels: int, groups: int = 64):
        super().__init__()
        if groups < 1 or channels % groups != 0:
            raise ValueError(
                f"SGE splits the channels into groups of equal size: channels ({channels}) must be a positive "
                f"multiple of groups ({groups}); choose a groups that divides every stage's width (64 does)"
            )
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(1, groups, 1, 1))
        self.bias = nn.Parameter(torch.ones(1, groups, 1, 1))

    def similarity(self, y: torch.Tensor) -> torch.Tensor:
        """c_i = g . x_i of every group and position: (B, C, H, W) -> (B, G, H*W)."""
        b, c, h, w = y.shape
        x = y.reshape(b * self.groups, c // self.groups, h * w)
        mean = x.mean(dim=2, keepdim=True)  # g: (B*G, C/G, 1)
        return (mean.transpose(1, 2) @ x).reshape(b, self.groups, h * w)

    def normalise(self, similarity: torch.Tensor) -> torch.Tensor:
        """(c - mean) / (unbiased std + eps) over the positions, in at least float32."""
        c = similarity.to(torch.promote_types(similarity.dtype, torch.float32))
        centred = c - c.mean(dim=2, keepdim=True)
        # m - 1 as a tensor, at least 1: no Python branch on the size (torch.fx traces it), and a 1 x 1 map,
        # whose centred similarity is exactly 0, normalises to 0 rather than 0 / 0.
        positions = torch.ones_like(centred).sum(dim=2, keepdim=True)
        std = torch.linalg.vector_norm(centred, dim=2, keepdim=True) / (positions - 1).clamp(min=1).sqrt()
        return centred / (std + EPS)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        b, c, h, w = y.shape
        normalised = self.normalise(self.similarity(y))  # (B, G, H*W)
        gate = torch.sigmoid(normalised * self.weight.view(1, -1, 1) + self.bias.view(1, -1, 1))
        # The gate in y's dtype: float32 statistics would otherwise promote a bfloat16 branch, and with it
        # every later block, to float32.
        grouped = y.reshape(b, self.groups, c // self.groups, h * w) * gate.to(y.dtype).unsqueeze(2)
        return grouped.reshape(b, c, h, w)


def spatial_group_enhance(channels: int, groups: int = 64) -> SpatialGroupEnhance:
    """The table's constructor: `groups` capped at the width, so that a value above a stage's channels
    (say 128 on ResNet-18's 64-channel stage 1) gives that stage one channel per group, as the authors'
    64 groups give there; a groups that does not divide a width is refused (SpatialGroupEnhance)."""
    return SpatialGroupEnhance(channels, min(groups, channels))


__all__ = ["SpatialGroupEnhance", "spatial_group_enhance"]
