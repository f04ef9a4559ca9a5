"""One tracker behind a queue and a thread of its own, so that training never waits on it.

A tracker is an observer: a store that is locked, full, read-only or unreachable must not stop the
run, nor delay its checkpoints. The trainer hands each call to the channel and goes on; the
channel's thread makes the calls in order. A call that raises, or one that has not returned after
`timeout_s` (noticed at the next call handed over, or while the run waits for the queue at its
end), disables the tracker for the rest of the run, in one warning line; the run goes on. The
thread is a daemon: a call that never returns cannot keep the process alive.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable, Optional

log = logging.getLogger("emca.engine.trackers")

# A tracker this far behind is not keeping up (each item is one step's or one epoch's scalars).
MAX_PENDING = 10_000
_CLOSE = "close"


def one_line(error: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message (MLflow's
    messages go on with the SQL statement and its parameters)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = " ".join(text.split())
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class Channel:
    """`start()` builds the tracker on the channel's thread; `call(name, *args)` queues its method."""

    def __init__(self, name: str, start: Callable[[], Any], timeout_s: float, after_failure: str = ""):
        self.name, self.timeout_s, self.after_failure = name, timeout_s, after_failure
        self.tracker: Any = None
        self.failure: Optional[str] = None  # why it was disabled
        self._calls: collections.deque = collections.deque()
        self._changed = threading.Condition()
        self._busy_since: Optional[float] = None  # monotonic start of the call in progress
        self._busy_with = "start"
        self._done = False
        self._thread = threading.Thread(target=self._work, args=(start,), name=f"tracker {name}", daemon=True)
        self._busy_since = time.monotonic()
        self._thread.start()

    def call(self, method: str, *args: Any) -> None:
        with self._changed:
            if self.failure is not None or self._done:
                return
            if self._overdue():
                return
            if len(self._calls) >= MAX_PENDING:
                self._disable(f"fell {MAX_PENDING} records behind the run")
                return
            self._calls.append((method, args))
            self._changed.notify()

    def close(self, deadline: float) -> None:
        """Queue the tracker's own close and wait for the queue until `deadline` (monotonic)."""
        with self._changed:
            if self.failure is None and not self._done:
                self._calls.append((_CLOSE, ()))
                self._changed.notify()
            while self.failure is None and not self._done:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._disable(f"{self._busy_with} was still running when the run ended, {len(self._calls)} "
                                  f"records not sent (waited up to logger.timeout_s={self.timeout_s:g} s)")
                    break
                self._changed.wait(timeout=left)

    def _overdue(self) -> bool:
        """Disable a tracker whose call has not returned within timeout_s (the lock is held)."""
        if self._busy_since is None or time.monotonic() - self._busy_since <= self.timeout_s:
            return False
        self._disable(f"{self._busy_with} did not return within logger.timeout_s={self.timeout_s:g} s")
        return True

    def _disable(self, reason: str) -> None:
        self.failure = reason
        self._calls.clear()
        self._changed.notify_all()
        log.warning(f"{self.name}: {reason}; disabled for the rest of this run, training goes on "
                    f"(checkpoints are not affected){self.after_failure}")

    def _work(self, start: Callable[[], Any]) -> None:
        if not self._run("start", self._start, start):
            return
        while True:
            with self._changed:
                while not self._calls and self.failure is None:
                    self._changed.wait()
                if self.failure is not None:
                    return
                method, args = self._calls.popleft()
                self._busy_since, self._busy_with = time.monotonic(), method
            if not self._run(method, getattr(self.tracker, method), *args):
                return
            if method == _CLOSE:
                with self._changed:
                    self._done = True
                    self._changed.notify_all()
                return

    def _start(self, start: Callable[[], Any]) -> None:
        self.tracker = start()

    def _run(self, what: str, action: Callable[..., Any], *args: Any) -> bool:
        """Run one call; False (the tracker disabled) if it raised or overran meanwhile."""
        try:
            action(*args)
        except Exception as error:  # whatever the tracker's library raises: it is an observer
            with self._changed:
                if self.failure is None:
                    self._disable(f"{what} failed ({one_line(error)})")
            return False
        with self._changed:
            self._busy_since = None
            self._changed.notify_all()
            return self.failure is None
