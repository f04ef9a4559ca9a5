"""Files that hold the old or the new content whatever moment the process dies at.

Single files (results.json, eval.json, the run's config records, pack_shards.py's info.json) use
atomic_write: a temporary file beside the target, fsynced and renamed over it.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import IO, Callable


def fsync_dir(directory: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write `path` through a temporary file in its folder: it holds the old or the new content.

    Stale temporary files of killed writers are not swept here: besides the run that owns a folder,
    eval.py writes into it too (eval.json), and that process's temporary file may still be in flight.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_name = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    # os.open rather than mkstemp: the file gets the usual umask permissions, not 0600.
    fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
