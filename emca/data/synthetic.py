"""Synthetic batches for throughput measurement: random tensors made once on the device.

No files are read and nothing is decoded (as in NVIDIA DeepLearningExamples' synthetic loader), so
a run measures the model and the training step alone.
"""
from __future__ import annotations

import torch


class SyntheticLoader:
    def __init__(self, *, batch_size: int, image_size: int, num_classes: int, steps: int,
                 device: torch.device, channels_last: bool, seed: int):
        generator = torch.Generator().manual_seed(seed)
        images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
        labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.images = images.to(device).contiguous(memory_format=memory_format)
        self.labels = labels.to(device)
        self.steps = steps

    def set_epoch(self, epoch: int) -> None:
        """Every epoch is the same batch repeated; nothing depends on the epoch."""

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.images, self.labels
