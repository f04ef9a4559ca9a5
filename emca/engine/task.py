"""What a task supplies to a training run; the run (emca/engine/trainer.py) supplies the rest.

The run's life (the folder and its lock, ranks, stop signals, resume, the checkpoint store, the
optimizer, schedule, mixed precision, accumulation, clipping, the weight average, step lines,
trackers, results.json) is the same for every task and knows nothing of images, labels or boxes.
A task owns what is particular to it, as torchvision's references/classification and
references/detection each own their data, model, loss and evaluation:

- the data (a training loader whose epochs are set with `set_epoch`, and a validation loader) and
  the model, built and initialised but still on the CPU, with its architecture fingerprint (what a
  checkpoint must match);
- the step's loss: `prepare` once per batch (mixup, for classification), then `loss` per micro-batch;
- the metrics: running sums the run reduces over ranks (`sums`), and `evaluate`, a pass over the
  validation set for any model (the trained weights and their average alike);
- which validation metric picks best.pt (`best`, higher is better), and what the run's log lines,
  checkpoints and results.json say about the task.

emca/engine/tasks/ holds the tasks; a new task is a new module there and one entry in its TASKS.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Optional, Protocol

import torch
from torch import nn

from emca.engine.distributed import DistributedContext


class TaskMetrics(Protocol):
    """A task's figures over some steps or a validation pass: at least the mean loss (checked for
    NaN by the run) and how many samples they cover."""

    loss: float
    count: int

    def line(self) -> str:
        """The figures of a step line, e.g. 'loss 1.2345  top1 56.78%'."""

    def scalars(self) -> dict[str, float]:
        """The figures a step series and an epoch's training record carry, e.g. {'loss': ..., 'top1': ...}."""


class MetricAccumulator(Protocol):
    """Running sums on the device, with no host synchronisation until read."""

    def update(self, loss: torch.Tensor, outputs: Any, targets: Any) -> None: ...

    def reduce(self, ctx: DistributedContext) -> TaskMetrics:
        """Sum over ranks (a collective: every rank calls it)."""

    def reduce_totals(self, ctx: DistributedContext) -> list[float]:
        """The raw totals summed over ranks, which a checkpoint carries for an epoch cut short."""

    def local(self) -> TaskMetrics:
        """This rank's figures alone (no collective), for a step line between reports."""


class TaskStep(ABC):
    """The task's side of an optimizer step (emca/engine/step.py): a batch's preparation, each
    micro-batch's loss, and how a batch splits into micro-batches and their outputs join."""

    @abstractmethod
    def prepare(self, inputs: Any, targets: Any, step: int) -> tuple[Any, Any, Any]:
        """A batch as the step trains it: (inputs, training targets, the targets its metrics count);
        `step` is the optimizer step it makes (0-based over the run), for seeded augmentation."""

    @abstractmethod
    def loss(self, model: nn.Module, inputs: Any, targets: Any) -> tuple[torch.Tensor, Any]:
        """(mean loss, outputs for the metrics) of one micro-batch, under the run's autocast."""

    def split(self, inputs: Any, targets: Any, parts: int) -> list[tuple[Any, Any]]:
        """A batch as `parts` micro-batches (trainer.accumulate); tensors split along the batch."""
        return list(zip(inputs.chunk(parts), targets.chunk(parts), strict=True))

    def join(self, outputs: list[Any]) -> Any:
        """The micro-batches' outputs as one batch's."""
        return torch.cat(outputs)


class Task(TaskStep):
    """One training task; see the module docstring. Built once per process by emca.engine.tasks.build_task."""

    name: ClassVar[str]
    best: ClassVar[str]  # the validation metric that picks best.pt, higher is better (val_<best>)
    best_label: ClassVar[str]  # how the log names it

    model: nn.Module  # built and initialised, on the CPU; the run moves it and wraps it for DDP
    # len(), set_epoch(epoch), iteration over (inputs, targets); optionally start_at(step) -> batches it
    # skips without reading them (a resumed epoch's trained steps), else the run reads and drops them.
    train_loader: Any
    val_loader: Any
    fingerprint: dict[str, Any]  # what a checkpoint of this task must match (emca.engine.checkpoint)

    @abstractmethod
    def sums(self, device: torch.device, start: Optional[list[float]] = None) -> MetricAccumulator:
        """Empty running sums, or continued from a checkpoint's totals."""

    @abstractmethod
    def evaluate(self, model: nn.Module, ctx: DistributedContext, epoch: int, *, amp_dtype: Optional[torch.dtype],
                 should_stop: Callable[[], bool], trackers: Any, trained: bool) -> Optional[dict[str, float]]:
        """The validation figures of `model` over the whole validation set (summed over ranks), e.g.
        {'loss', 'top1', 'top5'}; None when `should_stop()` cut the pass short. `trained`: the
        trained weights (not their average), whose pass may record more (attention histograms)."""

    @abstractmethod
    def describe(self, steps_per_epoch: int) -> list[str]:
        """The start-up lines on the model and the data (the run trains `steps_per_epoch` steps an epoch)."""

    def recipe(self) -> list[str]:
        """What the task adds to a step, for the start-up's 'with ...' line (mixup, label smoothing)."""
        return []

    @abstractmethod
    def epoch_line(self, record: dict[str, Any]) -> str:
        """An epoch's figures for its log line, from its record (train_*, val_*, ema_val_*)."""

    def checkpoint_entries(self) -> dict[str, Any]:
        """What a checkpoint holds besides the run's state (classification: the class names)."""
        return {}

    def results(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """What results.json holds about the task (model, data, sizes)."""
        return {}

    def params(self) -> dict[str, Any]:
        """Parameters the trackers record besides the config."""
        return {}
