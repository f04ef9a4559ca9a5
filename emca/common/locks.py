"""A folder's owner: an exclusive lock file that a killed owner leaves to be taken over.

POSIX record locks (lockf) on a file in the folder: the kernel drops one when its process ends,
however it ends, so a lock left by a killed writer is stale and simply taken over; unlike flock it
is not inherited by forked DataLoader workers and works over NFS through its lock manager. The
holder writes itself into the file, for the refusal of the next one. Used by every writer that owns
a folder: a run (emca.engine.run_folder, `.lock`) and pack_shards.py (emca.data.packing, `.pack-lock`).
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path


def host_and_pid() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


class InUse(Exception):
    """Another process holds the lock; `holder` is what it wrote into the lock file."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def lock_exclusively(path: Path) -> tuple[int, bool]:
    """Open `path` (created if missing) and take its exclusive lockf lock without waiting:
    (the descriptor, whether the file existed before). Raises InUse, or OSError if it cannot be
    created. The kernel drops the lock when the process ends however it ends: a killed holder's
    lock is simply taken over."""
    while True:
        existed = path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EACCES or EAGAIN: another process holds it
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise InUse(holder) from None
        # An owner that is done unlinks its file while holding it: lock only the file the name refers to now.
        if path.exists() and os.fstat(fd).st_ino == os.stat(path).st_ino:
            return fd, existed
        os.close(fd)


def name_holder(fd: int) -> None:
    """Write this process into the lock file it holds, for the refusal of the next one."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, host_and_pid().encode(), 0)
