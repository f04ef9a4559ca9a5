"""OS and resource limits met while a run starts or trains (memory, the process limit, open files,
shared memory, a full or read-only disk), named in one line with the settings that decide how much
of them is used, instead of a C++ assertion's text; saved checkpoints are never touched on the way out."""

from __future__ import annotations

import contextlib
import errno
import gc
import sys
import traceback
from typing import Iterator, Optional

import torch
from omegaconf import DictConfig

from emca.engine.errors import RunAborted, continue_command
from emca.engine.run_folder import RunFolder
from emca.options import shown


@contextlib.contextmanager
def named_limits(cfg: DictConfig, folder: RunFolder) -> Iterator[None]:
    """An OS or resource limit met while building or training (memory, the process limit, open
    files, shared memory, a full or read-only disk), in one line naming the resource and the
    setting, instead of a C++ assertion's text; saved checkpoints are never touched on the way out."""
    try:
        yield
    except (MemoryError, RuntimeError, OSError) as error:
        line = limit_reached(error, cfg)
        if line is None:
            raise
        _release_quietly(error)
        store = folder.store
        if store.last.is_file():
            kept = f"{store.last} is kept: continue with {continue_command(store.run_dir)}"
        elif folder.adopted:  # train.log and .hydra/ are written: only trainer.resume=auto may use the folder
            kept = f"no checkpoint had been written: start again with {continue_command(store.run_dir)}"
        else:
            kept = "nothing was written"
        raise RunAborted(f"{line}; {kept}") from None


def _release_quietly(error: BaseException) -> None:
    """Free what the error's frames hold now, without the noise of their finalizers: a DataLoader
    iterator that failed to start its workers has no _workers_status, and its __del__ would print an
    AttributeError traceback after our one line (a PyTorch shortcoming)."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda _unraisable: None
    try:
        traceback.clear_frames(error.__traceback__)
        error.__traceback__ = None
        gc.collect()
    finally:
        sys.unraisablehook = hook


def limit_reached(error: BaseException, cfg: DictConfig) -> Optional[str]:
    """The resource an error says ran out, and the settings that decide how much of it is used;
    None for any other error. (DataLoader workers' errors arrive as a RuntimeError with their text.)"""
    text, dataset = str(error), cfg.dataset
    number = getattr(error, "errno", None)
    workers = f"dataset.workers={shown(dataset.workers)}"
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)) or any(
            words in text for words in ("can't allocate memory", "out of memory", "Cannot allocate memory")):
        return (f"out of memory on {cfg.trainer.device} with dataset.image_size={dataset.image_size}, "
                f"dataset.batch_size={dataset.batch_size} and {workers}: lower them (a new run), or free memory")
    if "is killed by signal" in text:
        return (f"a loader worker process was killed ({text.split('is killed by signal:')[-1].strip()}), most likely "
                f"by the out-of-memory killer: lower {workers}, dataset.batch_size or dataset.image_size")
    if number == errno.EAGAIN or "can't start new thread" in text:
        return (f"cannot start another process or thread: the process limit (ulimit -u, or the container's pids "
                f"limit) is reached with {workers}; lower dataset.workers or raise the limit")
    if number == errno.EMFILE or "Too many open files" in text:
        return (f"the open-file limit (ulimit -n) is reached with {workers}; raise ulimit -n or lower "
                "dataset.workers")
    if "shm" in text and ("No space left" in text or "bus error" in text.lower()):
        return (f"shared memory (/dev/shm) is full with {workers}: raise the container's shared memory "
                "(docker --shm-size) or lower dataset.workers")
    path = getattr(error, "filename", None) or "a file"
    if number in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left for {path} ({error.strerror}): free disk space there"
    if number in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{path}: {error.strerror}: make it writable (a read-only mount, or its permissions)"
    return None
