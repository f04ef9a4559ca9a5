"""Training progress on rank 0: a tqdm bar on a terminal, plain log lines otherwise (batch jobs,
pipes), so that log files hold readable lines instead of carriage-return animations."""

from __future__ import annotations

import contextlib
import datetime
import logging
import sys
import time

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from emca.engine.metrics import Metrics

log = logging.getLogger(__name__)


class EpochProgress(contextlib.AbstractContextManager):
    def __init__(self, epoch: int, epochs: int, steps: int, first_step: int, enabled: bool):
        self.prefix = f"epoch {epoch}/{epochs}"
        self.steps = steps
        self.step = first_step
        self.enabled = enabled
        self.started = time.perf_counter()
        self.first_step = first_step
        self.bar = None
        self._redirect = contextlib.nullcontext()
        if enabled and sys.stdout.isatty():
            self.bar = tqdm(total=steps, initial=first_step, desc=self.prefix, dynamic_ncols=True, leave=False)
            # Log lines written while the bar is shown would tear it; route them through tqdm.
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

    def report(self, metrics: Metrics, lr: float, images_per_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{metrics.loss:.4f}", top1=f"{metrics.top1:.2f}", img_s=f"{images_per_s:.0f}", refresh=False
            )
            return
        done = self.step - self.first_step
        seconds_per_step = (time.perf_counter() - self.started) / max(done, 1)
        eta = datetime.timedelta(seconds=round(seconds_per_step * (self.steps - self.step)))
        log.info(
            f"{self.prefix} step {self.step}/{self.steps}  loss {metrics.loss:.4f}  top1 {metrics.top1:.2f}%  "
            f"lr {lr:.4g}  {images_per_s:.0f} img/s  eta {eta}"
        )
