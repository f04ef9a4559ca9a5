"""A run folder belongs to one run: only the process that owns it writes its training artefacts
(eval.py adds its own eval.json beside them, outside the checkpoints' generations).

The owner (rank 0) holds an exclusive POSIX record lock (lockf: emca.common.locks) on
`<run folder>/.lock` for the whole run: the kernel drops it when the process ends, however it ends,
so a lock left by a killed run is stale and simply taken over; unlike flock it is not inherited by
forked DataLoader workers (an orphaned worker cannot keep a requeued run out) and works over NFS
through its lock manager (the file stays, naming the last owner). Before anything is written, the folder's
contents decide whether the command may use it: a folder that holds any artefact of a run
(checkpoints, results.json, the recorded config, the log, event files) is refused unless the
command continues that run. A refusal leaves the folder byte for byte as it was: a lock file this
process created is removed again with the folder's timestamps restored, and a folder left empty is
removed. Hydra's own writes into the folder are switched off in configs/train.yaml
(no `.hydra/`, no log file); the trainer records the config and opens train.log here once the run
is accepted (`adopt`), with the lines logged before then.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import logging.handlers
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from emca.common.checkpoint_file import CHECKPOINT_DIR, LAST, check_checkpoint_path
from emca.common.files import atomic_write
from emca.common.locks import InUse, lock_exclusively, name_holder
from emca.engine.checkpoint import GENERATIONS, CheckpointStore, resumable
from emca.engine.errors import continue_command
from emca.engine.results import RESULTS

log = logging.getLogger(__name__)

LOCK = ".lock"
LOG_FILE = "train.log"
CONFIG_DIR = ".hydra"
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's default job log format
ARTEFACTS = (CONFIG_DIR, LOG_FILE, RESULTS, GENERATIONS, CHECKPOINT_DIR)
EVENTS_GLOB = "events.out.tfevents.*"


class RunFolderError(ValueError):
    """The folder cannot be used by this command; one line naming the way out."""


class RunCompleted(Exception):
    """The run this command continues has already finished: nothing to do, nothing changed."""


def peek(path: Path) -> dict:
    """A checkpoint's small entries, tensors left on disk (memory-mapped)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


class RunFolder(contextlib.AbstractContextManager):
    """`with RunFolder(path, is_main) as folder:` the lock (rank 0 only) and the refusal clean-up."""

    def __init__(self, path: Path, is_main: bool = True):
        self.path = Path(path)
        self.is_main = is_main
        self.store = CheckpointStore(self.path)
        self.adopted = False
        self._lock_fd: Optional[int] = None
        self._times_before_lock: Optional[tuple[int, int]] = None  # the folder's (atime, mtime) if the lock file is new
        self._log_file: Optional[logging.Handler] = None
        self._early_lines = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1)

    def __enter__(self) -> "RunFolder":
        if self.is_main:
            logging.getLogger().addHandler(self._early_lines)
        return self

    def __exit__(self, exc_type, error, _traceback) -> None:
        logging.getLogger().removeHandler(self._early_lines)
        self._early_lines.close()
        if self._log_file is not None:
            if isinstance(error, Exception):  # the run's own log keeps why it ended (the console gets it from train.py)
                self._log_file.handle(logging.makeLogRecord(
                    {"name": "train", "levelno": logging.ERROR, "levelname": "ERROR", "msg": "%s", "args": (error,)}))
            logging.getLogger().removeHandler(self._log_file)
            self._log_file.close()
        if self._lock_fd is None:
            return
        if not self.adopted and self._times_before_lock is not None:
            (self.path / LOCK).unlink(missing_ok=True)  # while still holding it: no one can take the name meanwhile
            with contextlib.suppress(OSError):  # only a folder's owner may set its times
                os.utime(self.path, ns=self._times_before_lock)
        os.close(self._lock_fd)
        if not self.adopted:
            with contextlib.suppress(OSError):
                self.path.rmdir()  # only succeeds on a folder left empty: a refused run leaves no trace

    def claim(self, resume: Optional[str], epochs: int) -> Optional[Path]:
        """Lock the folder and decide what `trainer.resume` continues from (rank 0; see resume_source)."""
        self._lock()
        return self.resume_source(resume, epochs)

    def _lock(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)  # Hydra made it already; a direct call may not have
            folder = os.stat(self.path)
            fd, existed = lock_exclusively(self.path / LOCK)
        except InUse as busy:
            raise RunFolderError(
                f"run folder {self.path} is in use by {busy.holder}; wait for that run to end or choose another "
                "hydra.run.dir"
            ) from None
        except OSError as error:
            raise RunFolderError(self._unwritable(error)) from None
        self._lock_fd = fd
        self._times_before_lock = None if existed else (folder.st_atime_ns, folder.st_mtime_ns)

    def _unwritable(self, error: OSError) -> str:
        """The refusal of a folder that cannot be written (a read-only mount, permissions, a full disk)."""
        problem = f"cannot write the run folder {self.path} ({error.strerror})"
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            # resume=auto continues a run, restarts one that has no checkpoint yet, and starts an empty folder.
            return f"{problem}; free space there, then run with {continue_command(self.path)}"
        if self.path.is_dir() and self.artefacts():  # a run to continue: another folder would start afresh
            return (f"{problem}; make it writable, or copy it (cp -a {self.path} NEW) and continue there with "
                    f"{continue_command('NEW')}")
        return f"{problem}; fix its permissions or choose a writable hydra.run.dir"

    # ------------------------------------------------------------------ what the folder holds
    def artefacts(self) -> list[str]:
        names = [name for name in ARTEFACTS if os.path.lexists(self.path / name)]
        return names + sorted(p.name for p in self.path.glob(EVENTS_GLOB))

    def resume_source(self, resume: Optional[str], epochs: int) -> Optional[Path]:
        """The checkpoint `trainer.resume` continues from (None: a fresh start), or a one-line refusal.

        Raises RunCompleted when the command continues a run that has already finished.
        """
        held, last = self.artefacts(), self.store.last
        if resume not in (None, "auto"):
            source = Path(resume).expanduser()
            check_checkpoint_path(source, "trainer.resume")
            _refuse_slim(source)
            if held and not self._continues(source, last):
                raise RunFolderError(
                    f"run folder {self.path} holds another run ({', '.join(held)}); to start from {source} choose a "
                    "new "
                    f"hydra.run.dir, or continue the folder's own run with trainer.resume=auto"
                )
        elif last.is_file() and resume == "auto":
            source = last
        elif held and resume is None:
            raise RunFolderError(
                f"run folder {self.path} already holds a run ({', '.join(held)}): pass trainer.resume=auto to continue "
                f"that run, or choose another hydra.run.dir"
            )
        elif resume == "auto" and self._has_checkpoints():
            raise RunFolderError(self._unreadable_last())
        elif held and (os.path.lexists(self.path / RESULTS) or self.store.best.is_file()):
            raise RunFolderError(
                f"run folder {self.path} holds results or best.pt but no {last}: it cannot be continued; choose "
                "another hydra.run.dir"
            )
        else:
            return None  # an empty folder, or (resume=auto) a run that died before its first checkpoint
        if (self.path / RESULTS).is_file() and self._finished(source, epochs):
            raise RunCompleted(
                f"run {self.path} has already completed {epochs} epochs ({self.path / RESULTS}); nothing to do"
            )
        return source

    def _has_checkpoints(self) -> bool:
        """Whether the run saved a checkpoint once: the link, or a generation folder behind it."""
        store = self.store
        return os.path.lexists(store.link) or (store.generations.is_dir() and any(store.generations.iterdir()))

    def _unreadable_last(self) -> str:
        """Why trainer.resume=auto finds no last.pt in a folder that has checkpoints, and the ways on:
        never a silent fresh start over the run's history."""
        store, last = self.store, self.store.last
        dangling = store.link.is_symlink() and not store.link.exists()
        why = "it points to a missing folder" if dangling else "it is missing"
        saved = sorted(store.generations.glob(f"*/{LAST}")) if store.generations.is_dir() else []
        if saved:
            generation = saved[-1].parent
            way = (f"continue from the newest one left, {saved[-1]}: ln -sfn {generation.relative_to(self.path)} "
                   f"{store.link}, then rerun with {continue_command(self.path)}")
        else:
            way = f"no checkpoint is left under {store.generations}: restore {last} from a backup"
        return f"run folder {self.path} has checkpoints but no {last} ({why}); {way}, or start a new run in another " \
               "hydra.run.dir"

    @staticmethod
    def _continues(source: Path, last: Path) -> bool:
        """Whether `source` is this folder's last checkpoint (the file itself, or a copy of its run)."""
        if not last.is_file() or not source.is_file():
            return False
        if os.path.samefile(source, last):
            return True
        with contextlib.suppress(Exception):  # an unreadable file is reported by the loader, not here
            run_id = peek(last).get("run_id")
            return run_id is not None and peek(source).get("run_id") == run_id
        return False

    @staticmethod
    def _finished(source: Path, epochs: int) -> bool:
        with contextlib.suppress(Exception):
            progress = peek(source)["progress"]
            return progress["epoch"] >= epochs and not progress["step_in_epoch"]
        return False

    # ------------------------------------------------------------------ taking the folder
    def adopt(self, records: Optional[dict[str, str]] = None) -> None:
        """The run is accepted: prove the folder writable, record the config, open train.log."""
        if not self.is_main:
            return
        try:
            self.store.prepare()
        except OSError as error:
            with contextlib.suppress(OSError):
                self.store.generations.rmdir()  # what prepare may have created: the refusal leaves no trace
            raise RunFolderError(self._unwritable(error)) from None
        self.adopted = True
        name_holder(self._lock_fd)  # named in the refusal of a second run
        try:
            for name, text in (records or {}).items():
                atomic_write(self.path / CONFIG_DIR / name, lambda file, text=text: file.write(text.encode()))
        except OSError as error:  # a full disk: the records written before stay whole (atomic_write)
            raise RunFolderError(self._unwritable(error)) from None
        self._log_file = RunLog(self.path / LOG_FILE, mode="a")
        self._log_file.setFormatter(logging.Formatter(LOG_FORMAT))
        self._early_lines.setTarget(self._log_file)
        self._early_lines.flush()
        root = logging.getLogger()
        root.removeHandler(self._early_lines)
        root.addHandler(self._log_file)


class RunLog(logging.FileHandler):
    """train.log. A write that fails (a full disk, a folder made read-only) stops the file, with one
    line on stderr, instead of Python's "--- Logging error ---" traceback for every line after it and
    an OSError from close(); the console keeps every line, and the run goes on."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        if self.failed:
            return
        self.failed = True
        error = sys.exc_info()[1]
        reason = getattr(error, "strerror", None) or error
        sys.stderr.write(f"{self.baseFilename} can no longer be written ({reason}); its lines go to the console only\n")

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # the tail that failed to flush: the file is closed all the same
            pass


def _refuse_slim(source: Path) -> None:
    """best.pt and the history entries hold no optimizer state: name the last.pt beside them instead."""
    try:
        state = peek(source)
    except Exception:  # an unreadable file is reported by the loader, in its own line
        return
    if isinstance(state, dict) and "fingerprint" in state and not resumable(state):
        beside = next((path for path in (source.parent / LAST, source.parent.parent / LAST) if path.is_file()), None)
        fix = f"trainer.resume={beside}" if beside else f"trainer.resume=<run folder>/{CHECKPOINT_DIR}/{LAST}"
        raise RunFolderError(f"trainer.resume={source} holds weights only (best.pt and the history keep no optimizer "
                             f"state); resume with {fix}, or start a new run from them with model.init_from={source}")
