"""Small building blocks of attention, one module per method (in the spirit of timm.layers), and the
table that declares them (create_attn.ATTENTION_KINDS)."""

from emca.layers.channel_attention import ChannelAttention
from emca.layers.create_attn import ATTENTION_KINDS, ATTENTIONS, AttentionKind, kind_of
from emca.layers.emca import EMCA
from emca.layers.excitation import ECAExcitation, SEExcitation, SRMExcitation, eca_kernel_size
from emca.layers.pooling import POOLINGS, pool_descriptor

__all__ = [
    "ATTENTIONS",
    "ATTENTION_KINDS",
    "AttentionKind",
    "ChannelAttention",
    "EMCA",
    "ECAExcitation",
    "POOLINGS",
    "SEExcitation",
    "SRMExcitation",
    "eca_kernel_size",
    "kind_of",
    "pool_descriptor",
]
