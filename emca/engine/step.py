"""One optimizer step from one batch: the task's preparation (mixup), micro-batches, mixed precision,
clipping, the update, the schedule and the weight average. What train_one_epoch calls once per step;
the task (emca/engine/task.py) supplies the batch's preparation and each micro-batch's loss.

With trainer.accumulate=K the rank's batch runs as K micro-batches whose gradients add up before
one update: each micro-batch's loss is divided by K, so the sum is the batch's mean loss, and under
DDP only the last micro-batch all-reduces (no_sync on the others).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional

import torch
from timm.utils import dispatch_clip_grad
from torch import nn

from emca.engine.ema import WeightAverage
from emca.engine.precision import autocast
from emca.engine.task import TaskStep
from emca.options import require, require_int


@dataclass
class StepResult:
    """What the step's metrics need: the batch's mean loss, the model's outputs and the targets they
    count against (classification: the logits, and the class each image counts as under mixup)."""

    loss: torch.Tensor
    outputs: Any
    targets: Any


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
                 scaler: torch.amp.GradScaler, task: TaskStep, amp_dtype: Optional[torch.dtype], *,
                 accumulate: int = 1, clipping: Optional[Clipping] = None, average: Optional[WeightAverage] = None):
        """`model`: the plain model (clipping, EMA); `train_model`: what runs the batches (DDP, compiled)."""
        self.model, self.train_model = model, train_model
        self.optimizer, self.scheduler, self.scaler, self.task = optimizer, scheduler, scaler, task
        self.amp_dtype, self.accumulate, self.clipping, self.average = amp_dtype, accumulate, clipping, average
        self.device_type = next(model.parameters()).device.type

    def __call__(self, inputs: Any, targets: Any, step: int) -> StepResult:
        """Train on one batch; `step` is the optimizer step it makes (0-based, over the whole run)."""
        inputs, trained_on, counted = self.task.prepare(inputs, targets, step)
        self.optimizer.zero_grad(set_to_none=True)
        loss, outputs = self._forward_backward(inputs, trained_on)
        if self.clipping is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the loss-scaled ones
            self.clipping(self.model.parameters())
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.average is not None:
            self.average.after_step(self.model, step + 1)
        return StepResult(loss, outputs, counted)

    def _forward_backward(self, inputs: Any, targets: Any) -> tuple[torch.Tensor, Any]:
        """Gradients of the batch's mean loss, summed over the micro-batches; (mean loss, outputs)."""
        if self.accumulate == 1:
            return self._micro_batch(inputs, targets, 1.0)
        losses, outputs = [], []
        parts = self.task.split(inputs, targets, self.accumulate)
        for index, (part_inputs, part_targets) in enumerate(parts):
            last = index == self.accumulate - 1
            # Gradients are all-reduced once, with the last micro-batch's backward.
            sync = contextlib.nullcontext() if last or not hasattr(self.train_model, "no_sync") \
                else self.train_model.no_sync()
            with sync:
                loss, part_outputs = self._micro_batch(part_inputs, part_targets, 1.0 / self.accumulate)
            losses.append(loss)
            outputs.append(part_outputs)
        return torch.stack(losses).mean(), self.task.join(outputs)

    def _micro_batch(self, inputs: Any, targets: Any, weight: float) -> tuple[torch.Tensor, Any]:
        with autocast(self.device_type, self.amp_dtype):
            loss, outputs = self.task.loss(self.train_model, inputs, targets)
        self.scaler.scale(loss * weight if weight != 1.0 else loss).backward()
        return loss.detach(), outputs.detach() if isinstance(outputs, torch.Tensor) else outputs
