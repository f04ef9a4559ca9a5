"""Cluster pre-emption: SIGTERM (torchrun, Kubernetes, SLURM at the time limit) and SIGUSR1
(SLURM's `--signal=USR1@<seconds>` warning) ask the run to stop.

The handler only raises a flag; the training loop finishes its current step, saves last.pt and
stops (exit code 0), and `hydra.run.dir=<run folder> trainer.resume=auto` continues the run. A
handler that was installed before ours (e.g. submitit's requeue handler) is called after the save.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest(contextlib.AbstractContextManager):
    def __init__(self) -> None:
        self.signal: Optional[int] = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _record(self, signum: int, _frame) -> None:
        self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        # Under DDP a rank may stop because another one received the signal.
        return signal.Signals(self.signal).name if self.signal is not None else "stop request (from another rank)"

    def hand_over(self) -> None:
        """Pass the signal on to the handler that was there before ours, if it was a function."""
        previous = self._previous.get(self.signal) if self.signal is not None else None
        if callable(previous):
            previous(self.signal, None)
