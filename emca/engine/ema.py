"""An exponential moving average of the weights: timm's ModelEmaV3 with the trainer's schedule.

The average covers parameters and buffers (BatchNorm statistics), in float32 on the model's device,
and is evaluated beside the trained weights. Its decay at an update depends only on the update's
number, itself a function of the optimizer step, so a checkpoint needs nothing but the averaged
state_dict to continue exactly.
"""

from __future__ import annotations

from typing import Optional

from timm.utils import ModelEmaV3
from torch import nn

from emca.options import require, require_int


class WeightAverage:
    """Updated after every `every`-th optimizer step; `module` is the averaged model (eval mode)."""

    def __init__(self, model: nn.Module, decay: float, every: int = 1, warmup: bool = False,
                 warmup_power: float = 0.75, copy_steps: int = 0):
        self.every = every
        # timm numbers updates from 1; updates 1 .. update_after_step + 1 copy the weights. So the
        # first always copies, and with copy_steps every update within them does.
        copies = max(1, copy_steps // every)
        self.ema = ModelEmaV3(model, decay=decay, update_after_step=copies - 1, use_warmup=warmup,
                              warmup_power=warmup_power)
        self.module = self.ema.module

    def after_step(self, model: nn.Module, optimizer_step: int) -> None:
        """`optimizer_step`: optimizer steps taken so far, this one included (1, 2, ...)."""
        if optimizer_step % self.every == 0:
            self.ema.update(model, step=optimizer_step // self.every)

    def decay_at(self, optimizer_step: int) -> float:
        """The decay the update after `optimizer_step` uses (0: a copy)."""
        return self.ema.get_decay(optimizer_step // self.every)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


def build_weight_average(model: nn.Module, ema_cfg, steps_per_epoch: int) -> Optional[WeightAverage]:
    """trainer.ema as a WeightAverage of `model` (the unwrapped one), or None when decay is null."""
    if ema_cfg.decay is None:
        return None
    require(0 < ema_cfg.decay < 1, "trainer.ema.decay", ema_cfg.decay, "in (0, 1), e.g. 0.9998, or null for no EMA")
    require_int("trainer.ema.every", ema_cfg.every, 1)
    require(ema_cfg.warmup_power > 0, "trainer.ema.warmup_power", ema_cfg.warmup_power, "> 0")
    require_int("trainer.ema.copy_epochs", ema_cfg.copy_epochs, 0)
    return WeightAverage(model, ema_cfg.decay, ema_cfg.every, ema_cfg.warmup, ema_cfg.warmup_power,
                         copy_steps=ema_cfg.copy_epochs * steps_per_epoch)
