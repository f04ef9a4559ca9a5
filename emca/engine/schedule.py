"""Learning-rate schedules, stepped once per training iteration.

Per-iteration stepping makes warm-up smooth and keeps resume exact: the scheduler's state is the
iteration count, saved with every checkpoint (also mid-epoch ones). Step decay still changes the
rate exactly at epoch boundaries, because its milestones are whole epochs.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR

from emca.options import require, require_int


def _rounded(fractions: Sequence[float], epochs: int) -> list[int]:
    # Half rounds up (Python's round() would send 4.5 to 4 but 13.5 to 14); a milestone is never
    # epoch 0, which would decay the rate before any training in very short runs.
    return [max(1, math.floor(fraction * epochs + 0.5)) for fraction in fractions]


def milestone_epochs(fractions: Sequence[float], epochs: int) -> list[int]:
    """Milestones given as fractions of the run, rounded to whole epochs ([0.3, 0.6, 0.9] of 100 ->
    [30, 60, 90]), so that the recipe scales with trainer.epochs.

    The rule for short runs: fractions that round to the same epoch make one milestone there, so
    the rate is multiplied by gamma once at that epoch, never gamma**2 ([0.3, 0.6, 0.9] of 2 epochs
    -> [1, 2], not [1, 1, 2]); a milestone at trainer.epochs itself falls after the last step. The
    training log names the merged fractions (describe_milestones). Distinct milestones are kept as
    they are, so the schedule of any run whose fractions round to distinct epochs is unchanged.
    """
    fractions = list(fractions)
    increasing = all(a < b for a, b in zip(fractions, fractions[1:], strict=False))
    require(increasing and all(0.0 < fraction <= 1.0 for fraction in fractions), "optimizer.milestones", fractions,
            "increasing fractions of trainer.epochs in (0, 1], e.g. [0.3, 0.6, 0.9]")
    return sorted(set(_rounded(fractions, epochs)))


def distinct_from(fractions: Sequence[float], epochs: int) -> int:
    """The smallest trainer.epochs >= `epochs` at which every fraction rounds to its own epoch."""
    fractions = list(fractions)
    while len(set(_rounded(fractions, epochs))) < len(fractions):
        epochs += 1
    return epochs


def describe_milestones(fractions: Sequence[float], epochs: int, gamma: float) -> str:
    """The step schedule for the training log: 'x0.1 at epochs [30, 60, 90]', with a note naming the
    fractions merged into one milestone when the run is too short to give each its own epoch."""
    milestones = milestone_epochs(fractions, epochs)
    text = f"x{gamma} at epochs {milestones}"
    if len(milestones) == len(fractions):
        return text
    rounded = _rounded(fractions, epochs)
    merged = ", ".join(
        f"{[f for f, e in zip(fractions, rounded, strict=True) if e == epoch]} -> epoch {epoch}"
        for epoch in milestones if rounded.count(epoch) > 1
    )
    return (f"{text} (trainer.epochs={epochs} is too short for optimizer.milestones={list(fractions)}: {merged}, "
            f"merged into one x{gamma}; trainer.epochs>={distinct_from(fractions, epochs)} gives each its own epoch)")


def warmup_epochs_used(warmup_epochs: int, epochs: int) -> int:
    """The warm-up a run of `epochs` trains: optimizer.warmup_epochs, or trainer.epochs - 1 when the run
    is too short to hold it (`recipe=rsb_a3 trainer.epochs=2`: 1 of its 5 epochs), so that at least one
    epoch of the schedule follows. Every run that holds its warm-up keeps it unchanged, and the cap is a
    function of the saved config alone: a resumed run plans the same rates."""
    return min(warmup_epochs, epochs - 1)


def describe_warmup(warmup_epochs: int, epochs: int, warmup_steps: int = 0) -> str:
    """The warm-up for the start-up log, naming the override when a short run capped it."""
    if warmup_steps:
        return f"warm-up {warmup_steps} iterations (optimizer.warmup_steps)"
    used = warmup_epochs_used(warmup_epochs, epochs)
    text = f"warm-up {used} epoch{'' if used == 1 else 's'}"
    if used == warmup_epochs:
        return text
    return (f"{text} (optimizer.warmup_epochs={warmup_epochs} does not fit trainer.epochs={epochs}: capped to leave "
            f"{epochs - used} epoch{'' if epochs - used == 1 else 's'} for the schedule; "
            f"set optimizer.warmup_epochs=N < {epochs} to choose)")


def lr_factor(
    schedule: str,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: int = 0,
    milestones: Sequence[float] = (),
    gamma: float = 0.1,
    warmup_iterations: int = 0,
) -> Callable[[int], float]:
    """The multiplier of the base learning rate at iteration `step` (0-based); a warm-up in epochs the
    run cannot hold is capped (warmup_epochs_used); `warmup_iterations` (optimizer.warmup_steps), when
    non-zero, replaces the epochs (MMDetection counts its warm-up in iterations)."""
    require(schedule in ("step", "cosine"), "optimizer.schedule", schedule, "step or cosine")
    # trainer.epochs first: a warm-up cannot be blamed for a run of no epochs.
    require_int("trainer.epochs", epochs, 1)
    require_int("optimizer.warmup_epochs", warmup_epochs, 0)
    require(gamma > 0, "optimizer.gamma", gamma, "> 0")
    require_int("optimizer.warmup_steps", warmup_iterations, 0)
    warmup_steps = warmup_iterations or warmup_epochs_used(warmup_epochs, epochs) * steps_per_epoch
    total_steps = epochs * steps_per_epoch
    milestone_steps = [epoch * steps_per_epoch for epoch in milestone_epochs(milestones, epochs)]

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "cosine":  # (a warm-up in iterations may outlast the run: then no cosine is reached)
            progress = (step - warmup_steps) / (total_steps - warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return gamma ** sum(step >= boundary for boundary in milestone_steps)

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, optimizer_cfg, epochs: int, steps_per_epoch: int) -> LambdaLR:
    return LambdaLR(
        optimizer,
        lr_factor(
            schedule=optimizer_cfg.schedule.value,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            warmup_epochs=optimizer_cfg.warmup_epochs,
            milestones=optimizer_cfg.milestones,
            gamma=optimizer_cfg.gamma,
            warmup_iterations=optimizer_cfg.warmup_steps,
        ),
    )
