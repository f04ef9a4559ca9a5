"""Checkpoints that survive a kill at any moment, and refuse to load into another architecture.

A run's checkpoints are replaced together (CheckpointStore): `checkpoints` is a relative symlink
to a generation folder `.checkpoints/NNNNNN/` that holds last.pt, best.pt and, with
trainer.keep_last_n, history/epoch-NNNN.pt. A save fills a new generation, fsyncs it and swaps
the symlink with one rename; files that did not change (best.pt when the epoch did not improve,
the older history entries) are hard links into the previous generation, and a history entry that
falls out of the last N is simply not linked, so adding and pruning happen in that one rename.
Whatever moment the process dies at, `checkpoints/` is one complete generation, so what its
last.pt says about best.pt and the history is true of the files beside it. Only last.pt holds
what trainer.resume needs (RESUME_ONLY: optimizer, scheduler, scaler, random state); best.pt and
the history entries are slim: what evaluation, export, model.init_from and weight averaging read.
Nothing else lives in a generation (eval.py writes beside the run folder's `checkpoints` link).
Reading one file and its architecture check belong to emca.common.checkpoint_file: the models
and the analysis read checkpoints too.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import IO, Any, Optional

import torch

from emca.common.checkpoint_file import BEST, CHECKPOINT_DIR, LAST, CheckpointError
from emca.common.files import fsync_dir
from emca.engine.errors import continue_command
from emca.options import require_int

GENERATIONS = ".checkpoints"  # the generation folders CHECKPOINT_DIR points into
HISTORY = "history"  # the last trainer.keep_last_n epochs, slim: history/epoch-NNNN.pt
# What only trainer.resume reads: last.pt holds it, best.pt and the history leave it out.
RESUME_ONLY = ("optimizer", "scheduler", "scaler", "rng")


class CheckpointStore:
    """A run folder's last.pt and best.pt, replaced together by one rename (see the module docstring).

    Only the run folder's owner (the process holding its lock, emca.engine.run_folder) writes.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.link = self.run_dir / CHECKPOINT_DIR
        self.generations = self.run_dir / GENERATIONS

    @property
    def last(self) -> Path:
        return self.link / LAST

    @property
    def best(self) -> Path:
        return self.link / BEST

    def current(self) -> Optional[Path]:
        """The committed generation folder; a plain `checkpoints/` folder of v0.1 counts as one."""
        if self.link.is_symlink():
            return self.link.resolve() if self.link.exists() else None
        return self.link if self.link.is_dir() else None

    def prepare(self) -> None:
        """Before training: prove the folder writable, adopt a v0.1 folder, drop uncommitted generations."""
        self.generations.mkdir(exist_ok=True)
        probe = self.generations / f".write-probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
        if self.link.is_dir() and not self.link.is_symlink():
            legacy = self.generations / f"{0:06d}"
            os.rename(self.link, legacy)
            self._point_to(legacy)
        elif not self.link.is_symlink() and (self.generations / f"{0:06d}").is_dir():
            self._point_to(self.generations / f"{0:06d}")  # killed between the two steps above
        self._remove_others(self.current())

    def save(self, state: dict[str, Any], improved: bool, epoch: Optional[int] = None, keep_last_n: int = 0) -> None:
        """A new generation: last.pt = state; best.pt = its slim copy if improved, else the previous
        best.pt; history/ = the slim copies of the last `keep_last_n` epochs, this one (`epoch`, the
        epoch the state completes; None for a save within an epoch) and the previous ones' links.

        Raises CheckpointError (one line) when the disk refuses; the previous generation stays.
        """
        current = self.current()
        new = self.generations / f"{self._next_number():06d}"
        try:
            new.mkdir(parents=True)
            fsync_dir(self.generations)
            _write_synced(new / LAST, state)
            if improved:
                _write_synced(new / BEST, slim(state))
            elif current is not None and (current / BEST).is_file():
                _link_or_copy(current / BEST, new / BEST)  # linked, not copied
            if keep_last_n:
                self._fill_history(new, current, state, improved, epoch, keep_last_n)
            fsync_dir(new)
            self._point_to(new)
        except OSError as error:
            if self.current() != new.resolve():  # once the link points to it, it is the committed generation
                shutil.rmtree(new, ignore_errors=True)
            kept = f"{self.last} is kept" if current is not None else "no earlier checkpoint exists"
            raise CheckpointError(
                f"cannot write checkpoint {error.filename or new / LAST}: {error.strerror or error}; {kept} "
                f"(free disk space or fix the folder's permissions, then continue with "
                f"{continue_command(self.run_dir)})"
            ) from None
        self._remove_others(new)

    @staticmethod
    def _fill_history(new: Path, current: Optional[Path], state: dict[str, Any], improved: bool,
                      epoch: Optional[int], keep_last_n: int) -> None:
        """new/history: this epoch's entry (best.pt's file when it improved) and links to the
        newest earlier entries of `current`, keep_last_n in all; older ones are left out."""
        folder = new / HISTORY
        folder.mkdir()
        earlier = _history_entries(current / HISTORY) if current is not None else []
        if epoch is not None:
            # Entries from `epoch` on belong to a timeline abandoned by resuming an older copy of last.pt.
            earlier = [path for path in earlier if _entry_epoch(path) < epoch]
        room = keep_last_n - (epoch is not None)  # beside this epoch's own entry
        for path in earlier[max(0, len(earlier) - room):]:
            _link_or_copy(path, folder / path.name)
        if epoch is not None:
            entry = folder / f"epoch-{epoch:04d}.pt"
            if improved:
                _link_or_copy(new / BEST, entry)  # the same slim content: one file, two names
            else:
                _write_synced(entry, slim(state))
        fsync_dir(folder)

    def _next_number(self) -> int:
        if not self.generations.is_dir():
            return 1
        numbers = [int(entry.name) for entry in self.generations.iterdir() if entry.name.isdigit()]
        return max(numbers, default=0) + 1

    def _point_to(self, generation: Path) -> None:
        tmp_link = self.run_dir / f".{CHECKPOINT_DIR}.{uuid.uuid4().hex}.tmp"
        os.symlink(os.path.relpath(generation, self.run_dir), tmp_link)
        try:
            os.replace(tmp_link, self.link)  # atomic: the old generation or the new one
        except BaseException:
            tmp_link.unlink(missing_ok=True)
            raise
        fsync_dir(self.run_dir)

    def _remove_others(self, keep: Optional[Path]) -> None:
        """Generations other than `keep`: superseded ones and those a kill left uncommitted."""
        if keep is None and self.link.is_symlink():
            return  # a dangling link: leave every generation for a person to look at
        for entry in self.generations.iterdir():
            if entry.is_dir() and entry.name.isdigit() and (keep is None or entry.resolve() != keep.resolve()):
                shutil.rmtree(entry, ignore_errors=True)


def describe_history(keep_last_n: int) -> Optional[str]:
    """trainer.keep_last_n for the setup log (None: no history); a negative count is refused (one line)."""
    require_int("trainer.keep_last_n", keep_last_n, 0)
    if not keep_last_n:
        return None
    return (f"the last {keep_last_n} epochs' weights kept in {CHECKPOINT_DIR}/{HISTORY}/epoch-NNNN.pt "
            "(weights, EMA weights if any, config; no optimizer state)")


def slim(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint without what only resume needs: best.pt's and the history's content."""
    return {key: value for key, value in state.items() if key not in RESUME_ONLY}


def resumable(state: Any) -> bool:
    """Whether trainer.resume can continue from these contents (last.pt; not best.pt or the history)."""
    return isinstance(state, dict) and all(key in state for key in RESUME_ONLY)


def _history_entries(folder: Path) -> list[Path]:
    """A history folder's epoch-NNNN.pt files, oldest first (none when it does not exist)."""
    if not folder.is_dir():
        return []
    entries = [path for path in folder.glob("epoch-*.pt") if path.stem.removeprefix("epoch-").isdigit()]
    return sorted(entries, key=_entry_epoch)


def _entry_epoch(path: Path) -> int:
    return int(path.stem.removeprefix("epoch-"))


class _KeepsWriteErrors:
    """The file torch.save writes through: torch's zip writer swallows the OSError of a failed write
    (a full disk) and raises its own assertion text ("[enforce fail at inline_container.cc] unexpected
    pos ..."); this keeps the OSError, whose errno names the cause."""

    def __init__(self, file: IO[bytes]):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


def _write_synced(path: Path, state: dict[str, Any]) -> None:
    with open(path, "wb") as file:
        writer = _KeepsWriteErrors(file)
        try:
            torch.save(state, writer)
        except RuntimeError as error:
            if writer.error is not None:
                raise OSError(writer.error.errno, writer.error.strerror, str(path)) from None
            raise OSError(errno.EIO, "torch.save failed: " + " ".join(str(error).split())[:200]) from error
        file.flush()
        os.fsync(file.fileno())


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no copy of the bytes), or a copy on filesystems without hard links."""
    try:
        os.link(source, target)
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        shutil.copyfile(source, target)
