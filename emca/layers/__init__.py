"""Small building blocks of channel attention, each doing one thing (in the spirit of timm.layers)."""

from .channel_attention import ChannelAttention
from .emca import EMCA
from .excitation import ECAExcitation, SEExcitation, SRMExcitation, create_excitation, eca_kernel_size
from .pooling import pool_statistics

__all__ = [
    "ChannelAttention",
    "EMCA",
    "ECAExcitation",
    "SEExcitation",
    "SRMExcitation",
    "create_excitation",
    "eca_kernel_size",
    "pool_statistics",
]
