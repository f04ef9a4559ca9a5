"""Training progress on rank 0: a step line every trainer.log_every steps, in train.log and on the
console, and on a terminal wide enough for one also a tqdm bar under those lines.

A pipe, a log file or a batch system's pseudo-terminal shows nothing but these lines, so whatever
log_every says, rank 0 also writes one right after the first step this process trains and then at
least every trainer.log_every_s seconds of wall time (EpochProgress.interim): figures so far, read on rank 0
alone (no collective, so no rank has to agree on the wall clock) and sent to no tracker, whose step
series stays on the log_every grid.

A step line carries what torchvision's MetricLogger prints (step and data-loading time, peak
memory) and an ETA for the whole run, not only the epoch:

    epoch 3/100 step 400/5005  loss 4.1234  top1 12.50%  lr 0.1  2210 img/s  step 0.116 s  data 0.004 s
    mem 9.81 GiB  eta 12:31:08
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import resource
import shutil
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from emca.engine.task import TaskMetrics

log = logging.getLogger(__name__)

# The wall clock of the time-based lines (tests replace it).
_clock = time.monotonic

# Narrower terminals (a zero-width pseudo-terminal of a batch system, a split pane) get no bar, which
# tqdm would draw as a wrapped mess or not at all: the step lines alone show the progress there.
MIN_BAR_COLUMNS = 40


def peak_memory_gib(device: torch.device) -> float:
    """The process's peak memory so far: CUDA memory allocated on `device` through PyTorch's caching
    allocator, else CPU resident set. DALI's own device memory (its pool: nvJPEG buffers, the batches it
    prefetches) is not in the CUDA figure: DALI 2.4 reports none (nvidia.dali.backend has no memory
    statistics); nvidia-smi shows the process's total."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class StepTimer:
    """Wall time per training step and the part of it spent waiting for the loader.

    `fetched()` right after a batch arrives, `stepped()` after its optimizer step: the time from one
    step's end to the next batch's arrival is data time. Without a device synchronisation, a CUDA
    step's time shows up where the host next waits (the metric reduction of a report), so the
    figures are means over the report window, as MetricLogger's.
    """

    def __init__(self):
        self.last = time.perf_counter()
        self.window_started = self.last
        self.data_s = 0.0
        self.steps = 0

    def fetched(self) -> None:
        now = time.perf_counter()
        self.data_s += now - self.last
        self.last = now

    def stepped(self) -> None:
        self.steps += 1
        self.last = time.perf_counter()

    def peek(self) -> "StepTimes":
        """The means since the last take_window, leaving the window open."""
        now = time.perf_counter()
        steps = max(self.steps, 1)
        return StepTimes(seconds=now - self.window_started, step_s=(now - self.window_started) / steps,
                         data_s=self.data_s / steps)

    def take_window(self) -> "StepTimes":
        """The means since the last call, and a fresh window."""
        times = self.peek()
        self.window_started, self.data_s, self.steps = time.perf_counter(), 0.0, 0
        return times


@dataclass(frozen=True)
class StepTimes:
    seconds: float  # the whole window
    step_s: float  # mean wall time per step, data time included
    data_s: float  # mean time waiting for a batch


def _bar_wanted() -> bool:
    return sys.stdout.isatty() and shutil.get_terminal_size(fallback=(0, 0)).columns >= MIN_BAR_COLUMNS


class EpochProgress(contextlib.AbstractContextManager):
    def __init__(self, epoch: int, epochs: int, steps: int, first_step: int, enabled: bool,
                 every_s: float, first_line: bool = False):
        """`every_s`: the longest wall time without a line; `first_line`: write one after the first step
        (the first this process trains: the start-up's silence is the longest)."""
        self.prefix = f"epoch {epoch}/{epochs}"
        self.steps = steps
        self.step = first_step
        self.enabled = enabled
        self.every_s, self.first_line_due = every_s, first_line
        self.last_line = _clock()
        self.bar = None
        self._redirect = contextlib.nullcontext()
        if enabled and _bar_wanted():
            self.bar = tqdm(total=steps, initial=first_step, desc=self.prefix, dynamic_ncols=True, leave=False,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")
            # Log lines written while the bar is shown would tear it; route them through tqdm (the
            # file handler of train.log is left alone by the redirect and gets them as written).
            self._redirect = logging_redirect_tqdm()

    def __enter__(self) -> "EpochProgress":
        self._redirect.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.bar is not None:
            self.bar.close()
        self._redirect.__exit__(*exc_info)

    def advance(self) -> None:
        self.step += 1
        if self.bar is not None:
            self.bar.update()

    def report(self, metrics: TaskMetrics, lr: float, images_per_s: float, times: StepTimes, memory_gib: float,
               eta_s: float, note: str = "") -> None:
        """One step line (rank 0), to the console and train.log alike; `note` ends it."""
        if not self.enabled:
            return
        self.last_line, self.first_line_due = _clock(), False
        eta = datetime.timedelta(seconds=round(eta_s))
        log.info(
            f"{self.prefix} step {self.step}/{self.steps}  {metrics.line()}  "
            f"lr {lr:.4g}  {images_per_s:.0f} img/s  step {times.step_s:.3f} s  data {times.data_s:.3f} s  "
            f"mem {memory_gib:.2f} GiB  eta {eta}{note}"
        )

    def line_due(self) -> bool:
        """A line between log_every's is due (rank 0: the first step's, or every_s without one); a clock
        read, no device synchronisation."""
        return self.enabled and (self.first_line_due or _clock() - self.last_line >= self.every_s)

    def interim(self, metrics: TaskMetrics, lr: float, timer: StepTimer, clock: "RunClock",
                work_left: tuple[int, int], world_size: int, device: torch.device) -> None:
        """A step line from what rank 0 has trained since the last log_every line (`metrics`: its window's
        local figures, read without a collective), whose window (metrics and times) stays open: the next
        regular line and the trackers' step series are as without this one."""
        times = timer.peek()
        eta_s = clock.eta_s(*work_left, pending=(times, timer.steps))
        # img/s: rank 0's images times the ranks; the figures of rank 0's share of the batches alone.
        self.report(metrics, lr, metrics.count * world_size / times.seconds, times, peak_memory_gib(device),
                    eta_s, note="  (rank 0's batches)" if world_size > 1 else "")


class RunClock:
    """The run's ETA: the mean time of the steps trained in this process, times the steps left,
    plus the validations left at the duration of the last one."""

    def __init__(self):
        self.train_s = 0.0
        self.steps = 0
        self.validation_s = 0.0

    def add_window(self, times: StepTimes, steps: int) -> None:
        self.train_s += times.seconds
        self.steps += steps

    def add_validation(self, seconds: float) -> None:
        self.validation_s = seconds

    def eta_s(self, steps_left: int, validations_left: int, pending: tuple[StepTimes, int] | None = None) -> float:
        """`pending`: an open window (its times and steps) to count as well, e.g. before the first report."""
        train_s, steps = self.train_s, self.steps
        if pending is not None:
            train_s, steps = train_s + pending[0].seconds, steps + pending[1]
        return train_s / max(steps, 1) * steps_left + self.validation_s * validations_left
