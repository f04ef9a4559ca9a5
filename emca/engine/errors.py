"""How a run ends when it does not complete (a problem the user can fix, or a stop signal), and the
command that continues it."""

from __future__ import annotations

from hydra.errors import CompactHydraException


class RunAborted(CompactHydraException):
    """A problem the user can fix (bad config, dataset, checkpoint, diverged loss), in one line.

    A CompactHydraException, so that a failed job of a multirun is reported by Hydra as this one
    line rather than as a traceback.
    """


class Preempted(Exception):
    """SIGTERM / SIGUSR1 / SIGINT arrived; last.pt holds the run's position."""

    def __init__(self, signal_name: str, exit_status: int):
        super().__init__(signal_name)
        self.exit_status = exit_status  # 0, or 130 after SIGINT


def continue_command(run_dir) -> str:
    """The overrides that continue the run in `run_dir`, as every message that advises it writes them:
    train.py then applies the run's recorded overrides (emca/cli.py), so they work as written."""
    return f"hydra.run.dir={run_dir} trainer.resume=auto"
