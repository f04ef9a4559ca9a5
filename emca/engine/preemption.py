"""Stop signals: SIGTERM (torchrun, Kubernetes, SLURM at the time limit), SIGUSR1 (SLURM's
`--signal=USR1@<seconds>` warning) and SIGINT (Ctrl-C) ask the run to stop.

The handler only raises a flag; the training loop finishes its current step (or abandons the
validation pass), saves last.pt and stops: exit status 0, or 130 after SIGINT, the shell's code for
an interrupted command. `hydra.run.dir=<run folder> trainer.resume=auto` continues the run. A
repeated signal changes nothing: a stop can reach a rank twice (a terminal's Ctrl-C, then the
launcher's forward of it; torchrun starts each rank in a session of its own and forwards the signal
it gets), so a second Ctrl-C cannot mean "abort". A handler that was
installed before ours (e.g. submitit's requeue handler) is called after the save.

Before training starts (listing and screening a dataset can take minutes) there is nothing to
save: a signal then stops the run at once, raising StoppedBeforeTraining from the handler.

The signals themselves, and the mask that keeps them from DataLoader workers, are emca.common.signals'
(the data layer starts the workers).
"""

from __future__ import annotations

import contextlib
import signal
from typing import Optional

from emca.common.signals import STOP_SIGNALS

SIGINT_EXIT_STATUS = 128 + signal.SIGINT  # 130, what a shell reports for Ctrl-C


class StoppedBeforeTraining(BaseException):
    """A stop signal arrived before StopRequest.arm(): nothing had been trained, nothing is saved.

    A BaseException, like KeyboardInterrupt: no `except Exception` on the way may swallow it.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_status = exit_status(signum)


def exit_status(signum: Optional[int]) -> int:
    return SIGINT_EXIT_STATUS if signum == signal.SIGINT else 0


class StopRequest(contextlib.AbstractContextManager):
    def __init__(self) -> None:
        self.signal: Optional[int] = None
        self.armed = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            # After a stop the process is on its way out: a repeat (torchrun's forward) must not kill it.
            signal.signal(signum, signal.SIG_IGN if self.requested else handler)
        self._previous.clear()

    def arm(self) -> None:
        """Training starts: from now on a signal is only recorded, for the loop to save and stop."""
        self.armed = True

    def _record(self, signum: int, _frame) -> None:
        if self.signal is not None:
            return  # a repeat changes nothing
        self.signal = signum
        if not self.armed:
            raise StoppedBeforeTraining(signum)

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        # Under DDP a rank may stop because another one received the signal.
        return signal.Signals(self.signal).name if self.signal is not None else "stop request (from another rank)"

    @property
    def exit_status(self) -> int:
        return exit_status(self.signal)

    def hand_over(self) -> None:
        """Pass the signal on to the handler that was there before ours, if it was a function."""
        previous = self._previous.get(self.signal) if self.signal is not None else None
        if callable(previous) and previous is not signal.default_int_handler:
            previous(self.signal, None)
