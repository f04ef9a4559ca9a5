"""Mixup / CutMix of the training batches: timm's Mixup, its randomness fixed by the step.

timm's Mixup draws from numpy's global generator. Here each batch draws from a generator seeded by
(seed, optimizer step, rank) instead, so a run resumed mid-epoch mixes the batches it has still to
train exactly as the uninterrupted run did (the batches before the stop are skipped, not mixed),
and the global generator is left as it was.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import numpy as np
import torch
from timm.data import Mixup

from emca.data.sampling import derive_seed
from emca.options import require


@contextlib.contextmanager
def numpy_seeded(seed: int) -> Iterator[None]:
    """numpy's global generator seeded with `seed` inside, restored to its state outside."""
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(saved)


class BatchMixing:
    """(images, class indices) -> (mixed images, soft targets with the label smoothing folded in)."""

    def __init__(self, mixup_cfg, num_classes: int, label_smoothing: float, seed: int, rank: int):
        self.mixup = Mixup(
            mixup_alpha=mixup_cfg.mixup_alpha, cutmix_alpha=mixup_cfg.cutmix_alpha, prob=mixup_cfg.prob,
            switch_prob=mixup_cfg.switch_prob, mode=mixup_cfg.mode.value, label_smoothing=label_smoothing,
            num_classes=num_classes,
        )
        self.seed, self.rank = seed, rank

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`step`: the optimizer step this batch trains (0-based, over the whole run)."""
        with numpy_seeded(derive_seed(self.seed, step, self.rank)):
            # timm mixes the images in place (the loader's batch is not used again).
            return self.mixup(images, labels)


def build_mixing(mixup_cfg, num_classes: int, label_smoothing: float, seed: int, rank: int, global_batch: int,
                 world_size: int) -> Optional[BatchMixing]:
    """trainer.mixup as a BatchMixing, or None when both alphas are 0."""
    for option in ("mixup_alpha", "cutmix_alpha"):
        require(mixup_cfg[option] >= 0, f"trainer.mixup.{option}", mixup_cfg[option], ">= 0 (0: off)")
    if mixup_cfg.mixup_alpha == 0 and mixup_cfg.cutmix_alpha == 0:
        return None
    for option in ("prob", "switch_prob"):
        require(0 <= mixup_cfg[option] <= 1, f"trainer.mixup.{option}", mixup_cfg[option], "in [0, 1]")
    # timm mixes image i with image B-1-i.
    require(global_batch // world_size % 2 == 0, "dataset.batch_size", global_batch,
            f"even per process ({world_size} of them) for trainer.mixup, which mixes the images in pairs")
    return BatchMixing(mixup_cfg, num_classes, label_smoothing, seed, rank)
