"""Plain channel attention (SE, ECA, SRM as published): pool the residual branch, excite, gate."""


import torch
from torch import nn

from emca.layers.pooling import pool_descriptor


class ChannelAttention(nn.Module):
    """y -> y * sigmoid(excitation(pool(y))).

    The sigmoid is a named child (`gate`) so that the learned scales can be read with a forward
    hook, as timm's attention layers allow.
    """

    per_channel_gate = True  # emca.models.attention_modules: its `gate` output (B, C) is the learned scales

    def __init__(self, excitation: nn.Module, pooling: str = "mean"):
        super().__init__()
        self.excitation = excitation
        self.pooling = pooling  # what the excitation reads (emca.layers.pooling.POOLINGS)
        self.gate = nn.Sigmoid()

    def extra_repr(self) -> str:
        return f"pooling={self.pooling}"

    def factors(self, y: torch.Tensor) -> torch.Tensor:
        """The per-channel factors (B, C, 1, 1) that the module multiplies y by, in y's dtype: under
        autocast an excitation with a float32 parameter (SRM's cfc) gives float32 factors, which
        would promote the block output and so every later block to float32."""
        return self.gate(self.excitation(pool_descriptor(y, self.pooling)))[:, :, None, None].to(y.dtype)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.factors(y)
