"""EMCA-Train: EMCA-ResNets (Efficient Multi-scale Channel Attention) and their training framework."""

__version__ = "0.1.0"
