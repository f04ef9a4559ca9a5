"""The stop signals, and the mask that keeps a group's stop signal from killing loader workers.

SIGTERM (torchrun, Kubernetes, SLURM at the time limit), SIGUSR1 (SLURM's `--signal=USR1@<seconds>`
warning) and SIGINT (Ctrl-C) ask a run to stop (emca.engine.preemption saves and stops). SLURM and
a terminal's Ctrl-C signal the whole process group, DataLoader workers included: a worker killed by
the signal would take the epoch down with it. Workers therefore start with the stop signals blocked
(the mask is inherited through fork and exec, `stop_signals_blocked`), and each one moves to a
process group of its own before unblocking them (`detach_worker`): the group's signal no longer
reaches it, while the loader's own shutdown (SIGTERM to the worker) still ends it. The data layer
starts the workers, the engine handles the signals: both read this.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def detach_worker(_worker_id: int = 0) -> None:
    """A DataLoader worker_init_fn: leave the trainer's process group, drop a stop signal meant for
    that group, and take SIGTERM's default action back (the parent's handler came with fork)."""
    os.setpgid(0, 0)
    for signum in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    pending = signal.sigpending() & set(STOP_SIGNALS)
    while pending and signal.sigtimedwait(pending, 0) is not None:  # sent to the group before the move
        pending = signal.sigpending() & set(STOP_SIGNALS)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block the stop signals while child processes are started, so that they inherit the block.

    A signal that reaches this process meanwhile stays pending and is delivered on leaving.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
