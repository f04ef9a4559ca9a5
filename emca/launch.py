"""torchrun with a clean stop: `python -m emca.launch [torchrun's arguments] train.py ...`.

torchrun forwards a stop signal (SIGTERM, SIGINT) to its ranks and waits for them, so every rank saves
last.pt and stops (emca.engine.preemption); but torchrun then raises its own SignalException: a
traceback and status 1 for a stop that went as asked. This is the same launcher (torch.distributed.run,
the same arguments), ending instead with one line and train.py's own status: 0 after SIGTERM or
SIGUSR1, 130 after SIGINT, once every rank of this node exited 0 or 130; 1 if one did not (killed
after --shutdown-timeout, say). It also forwards SIGUSR1 (SLURM's warning), which torchrun's default
--signals-to-handle lacks: its default action would end the launcher and leave the ranks running.
A repeated signal (a second Ctrl-C) does not cut short the wait for the ranks' save. Every other
failure, a crashed rank's ChildFailedError included, is torchrun's own report and status.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Optional, Sequence

from torch.distributed import run
from torch.distributed.elastic.agent.server import api as agent_api
from torch.distributed.elastic.multiprocessing import api as processes

from emca.common.signals import STOP_SIGNALS
from emca.engine.preemption import SIGINT_EXIT_STATUS, exit_status

received: list[int] = []  # the first signal; a repeat is ignored
exit_codes: dict[int, Optional[int]] = {}  # local rank -> exit status, once the agent has closed its ranks
_raise_signal_exception = processes._terminate_process_handler
_close = processes.PContext.close


def _first_signal_only(signum: int, frame) -> None:
    if not received:
        received.append(signum)
        _raise_signal_exception(signum, frame)


def _close_and_record(self, *args, **kwargs) -> None:
    _close(self, *args, **kwargs)
    exit_codes.clear()
    exit_codes.update({rank: h.proc.returncode for rank, h in getattr(self, "subprocess_handlers", {}).items()})


def _not_the_signal_paths_routine(record: logging.LogRecord) -> bool:
    return not (received and record.getMessage().startswith(("Received ", "Sending process ")))


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("PET_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    processes._terminate_process_handler = _first_signal_only  # what the agent installs for these signals
    processes.PContext.close = _close_and_record
    for logger in (agent_api.logger, processes.logger):
        logger.addFilter(_not_the_signal_paths_routine)
    for signum in STOP_SIGNALS:  # also while the ranks are not started yet (rendezvous)
        signal.signal(signum, _first_signal_only)
    try:
        run.main(None if argv is None else list(argv))
    except processes.SignalException as stopped:
        return _report(stopped.sigval)
    return 0


def _report(signum: int) -> int:
    """One line and the exit status, once the agent forwarded `signum` to its ranks and waited for them."""
    name, codes = signal.Signals(signum).name, [exit_codes[rank] for rank in sorted(exit_codes)]
    status = exit_status(signum) if signum in STOP_SIGNALS else 128 + signum
    forwarded = f"{name} forwarded to this node's {len(codes)} ranks"
    statuses = "exit status " + ", ".join(map(str, codes))
    if not codes:
        line = f"{name} before the ranks started: nothing to save"
    elif all(code in (0, SIGINT_EXIT_STATUS) for code in codes):
        line = f"{forwarded}, which stopped cleanly ({statuses}); their log above says what was saved, how to continue"
    else:
        line, status = f"{forwarded}; not all of them stopped cleanly ({statuses})", 1
    print(f"emca.launch: {line}", file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
