"""Plain channel attention (SE, ECA, SRM as published): pool the residual branch, excite, gate."""

import torch
from torch import nn

from .pooling import pool_statistics


class ChannelAttention(nn.Module):
    """y -> y * sigmoid(excitation(pool(y))).

    The sigmoid is a named child (`gate`) so that the learned scales can be read with a forward
    hook, as timm's attention layers allow.
    """

    def __init__(self, excitation: nn.Module):
        super().__init__()
        self.excitation = excitation
        self.gate = nn.Sigmoid()

    @property
    def num_statistics(self) -> int:
        return self.excitation.num_statistics

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        scales = self.gate(self.excitation(pool_statistics(y, self.num_statistics)))
        return y * scales[:, :, None, None]
