"""One optimizer step from one batch: mixup, micro-batches, mixed precision, clipping, the update,
the schedule and the weight average. What train_one_epoch calls once per step.

With trainer.accumulate=K the rank's batch runs as K micro-batches whose gradients add up before
one update: each micro-batch's loss is divided by K, so the sum is the batch's mean loss, and under
DDP only the last micro-batch all-reduces (no_sync on the others).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from timm.utils import dispatch_clip_grad
from torch import nn

from emca.engine.ema import WeightAverage
from emca.engine.mixing import BatchMixing
from emca.engine.precision import autocast
from emca.options import require, require_int


@dataclass
class StepResult:
    """What the step's metrics need: the batch's mean loss, its logits and the class each image counts as."""

    loss: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor


@dataclass
class Clipping:
    threshold: float
    mode: str  # norm | value | agc (timm's dispatch_clip_grad)

    def __call__(self, parameters) -> None:
        dispatch_clip_grad(parameters, self.threshold, mode=self.mode)


def build_clipping(trainer_cfg) -> Optional[Clipping]:
    if trainer_cfg.clip_grad is None:
        return None
    require(trainer_cfg.clip_grad > 0, "trainer.clip_grad", trainer_cfg.clip_grad, "> 0, or null for no clipping")
    return Clipping(float(trainer_cfg.clip_grad), trainer_cfg.clip_mode.value)


def check_accumulation(accumulate, global_batch: int, world_size: int) -> None:
    require_int("trainer.accumulate", accumulate, 1)
    require(global_batch // world_size % accumulate == 0, "trainer.accumulate", accumulate,
            f"a divisor of the per-process batch {global_batch // world_size} (dataset.batch_size={global_batch} "
            f"over {world_size} process(es))")


class OptimizerStep:
    def __init__(self, model: nn.Module, train_model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                 scaler: torch.amp.GradScaler, criterion: Callable, amp_dtype: Optional[torch.dtype], *,
                 accumulate: int = 1, clipping: Optional[Clipping] = None, mixing: Optional[BatchMixing] = None,
                 average: Optional[WeightAverage] = None):
        """`model`: the plain model (clipping, EMA); `train_model`: what runs the batches (DDP, compiled)."""
        self.model, self.train_model = model, train_model
        self.optimizer, self.scheduler, self.scaler, self.criterion = optimizer, scheduler, scaler, criterion
        self.amp_dtype, self.accumulate, self.clipping = amp_dtype, accumulate, clipping
        self.mixing, self.average = mixing, average
        self.device_type = next(model.parameters()).device.type

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> StepResult:
        """Train on one batch; `step` is the optimizer step it makes (0-based, over the whole run)."""
        targets = labels
        if self.mixing is not None:
            images, targets = self.mixing(images, labels, step)
        self.optimizer.zero_grad(set_to_none=True)
        loss, logits = self._forward_backward(images, targets)
        if self.clipping is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the loss-scaled ones
            self.clipping(self.model.parameters())
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.average is not None:
            self.average.after_step(self.model, step + 1)
        # Under mixup an image counts as the class with the largest share of its target.
        counted = labels if targets is labels else targets.argmax(dim=1)
        return StepResult(loss, logits, counted)

    def _forward_backward(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of the batch's mean loss, summed over the micro-batches; (mean loss, logits)."""
        if self.accumulate == 1:
            return self._micro_batch(images, targets, 1.0)
        losses, logits = [], []
        parts = zip(images.chunk(self.accumulate), targets.chunk(self.accumulate), strict=True)
        for index, (part_images, part_targets) in enumerate(parts):
            last = index == self.accumulate - 1
            # Gradients are all-reduced once, with the last micro-batch's backward.
            sync = contextlib.nullcontext() if last or not hasattr(self.train_model, "no_sync") \
                else self.train_model.no_sync()
            with sync:
                loss, part_logits = self._micro_batch(part_images, part_targets, 1.0 / self.accumulate)
            losses.append(loss)
            logits.append(part_logits)
        return torch.stack(losses).mean(), torch.cat(logits)

    def _micro_batch(self, images, targets, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(self.device_type, self.amp_dtype):
            logits = self.train_model(images)
            loss = self.criterion(logits, targets)
        self.scaler.scale(loss * weight if weight != 1.0 else loss).backward()
        return loss.detach(), logits.detach()
