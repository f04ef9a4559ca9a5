"""What the methods that edit a torchvision ResNet block (the table's `block` place) read of it."""

from torch import nn


def block_out_channels(block: nn.Module) -> int:
    """The output width of a torchvision Bottleneck (its bn3) or BasicBlock (its bn2)."""
    return block.bn3.num_features if hasattr(block, "bn3") else block.bn2.num_features


__all__ = ["block_out_channels"]
