"""Mixup / CutMix of the training batches: timm's Mixup, its randomness fixed by the step.

timm's Mixup draws from numpy's global generator. Here each batch draws from a generator seeded by
(seed, optimizer step, rank) instead, so a run resumed mid-epoch mixes the batches it has still to
train exactly as the uninterrupted run did (the batches before the stop are skipped, not mixed),
and the global generator is left as it was.

timm builds the per-image (mode=elem) and per-pair (mode=pair) mixing factors with
torch.tensor(..., device=images.device): on a CUDA device a blocking copy from pageable memory that
makes the host wait for the device on every step. HostFactorMixup builds them on the host and copies
them without that wait; everything else is timm's.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import numpy as np
import torch
from timm.data import Mixup
from timm.data.mixup import cutmix_bbox_and_lam

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


def to_device_of(factors: np.ndarray, images: torch.Tensor) -> torch.Tensor:
    """`factors` as a (B, 1) tensor on the images' device and in their dtype, without making the host
    wait: pinned memory and an asynchronous copy on CUDA (the pinned block is held until the copy is done)."""
    factors = torch.from_numpy(factors).to(images.dtype)
    if images.device.type == "cuda":
        factors = factors.pin_memory().to(images.device, non_blocking=True)
    return factors.unsqueeze(1)


class HostFactorMixup(Mixup):
    """timm's Mixup whose mode=elem and mode=pair hand their factors to the device without a host
    synchronisation; the mixing itself is timm's code, operation for operation (timm 1.0)."""

    def _mix_elem(self, x: torch.Tensor) -> torch.Tensor:
        batch_size = len(x)
        lam_batch, use_cutmix = self._params_per_elem(batch_size)
        x_orig = x.clone()  # the unmixed images each image is mixed with
        for i in range(batch_size):
            if lam_batch[i] != 1.0:
                lam_batch[i] = self._mix(x, x_orig, i, batch_size - i - 1, lam_batch[i], use_cutmix[i], both=False)
        return to_device_of(lam_batch, x)

    def _mix_pair(self, x: torch.Tensor) -> torch.Tensor:
        batch_size = len(x)
        lam_batch, use_cutmix = self._params_per_elem(batch_size // 2)
        x_orig = x.clone()
        for i in range(batch_size // 2):
            if lam_batch[i] != 1.0:
                lam_batch[i] = self._mix(x, x_orig, i, batch_size - i - 1, lam_batch[i], use_cutmix[i], both=True)
        return to_device_of(np.concatenate((lam_batch, lam_batch[::-1])), x)

    def _mix(self, x: torch.Tensor, x_orig: torch.Tensor, i: int, j: int, lam: float, cutmix: bool,
             both: bool) -> float:
        """Image i mixed with image j's original (and j with i's when `both`: mode=pair), in place; the
        factor, which CutMix corrects to the pasted box's area."""
        if cutmix:
            (yl, yh, xl, xh), lam = cutmix_bbox_and_lam(
                x[i].shape, lam, ratio_minmax=self.cutmix_minmax, correct_lam=self.correct_lam)
            x[i][:, yl:yh, xl:xh] = x_orig[j][:, yl:yh, xl:xh]
            if both:
                x[j][:, yl:yh, xl:xh] = x_orig[i][:, yl:yh, xl:xh]
        else:
            x[i] = x[i] * lam + x_orig[j] * (1 - lam)
            if both:
                x[j] = x[j] * lam + x_orig[i] * (1 - lam)
        return lam


class BatchMixing:
    """(images, class indices) -> (mixed images, soft targets with the label smoothing folded in)."""

    def __init__(self, mixup_cfg, num_classes: int, label_smoothing: float, seed: int, rank: int):
        self.mixup = HostFactorMixup(
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
