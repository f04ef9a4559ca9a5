"""Checkpoints that survive a kill at any moment, and refuse to load into another architecture.

A checkpoint is written to a temporary file in the same folder, fsynced, renamed over the old one
with os.replace (atomic on POSIX) and the folder entry fsynced: whatever moment the process dies
at, the path holds either the previous complete checkpoint or the new complete one.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any, Callable, IO

import torch
from torch import nn

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for this run; the message is one line."""


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
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
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    atomic_write(path, lambda file: torch.save(state, file))


def architecture_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint must match: the model's own description (backbone, attention, coverage,
    classes) and a digest of every state_dict key and shape."""
    signature = "\n".join(f"{key}:{tuple(value.shape)}" for key, value in model.state_dict().items())
    return {
        "architecture": model.architecture(),
        "state_dict_sha256": hashlib.sha256(signature.encode()).hexdigest(),
    }


def describe_architecture(fingerprint: dict[str, Any]) -> str:
    arch = fingerprint["architecture"]
    coverage = arch.get("coverage")
    coverage_text = "no coverage" if coverage is None else f"coverage stages={coverage['stages']} blocks={coverage['blocks']}"
    return f"{arch['backbone']} / attention {arch['attention']} / {coverage_text} / {arch['num_classes']} classes"


def load_checkpoint(path: Path, expected_fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint, refusing one of a different architecture."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which and why, in one line
        raise CheckpointError(f"checkpoint {path} cannot be read: {' '.join(str(error).split())[:300]}") from error
    check_fingerprint(state, path, expected_fingerprint)
    return state


def check_fingerprint(state: Any, path: Path, expected_fingerprint: dict[str, Any]) -> None:
    """Refuse (CheckpointError, one line) checkpoint contents of another architecture."""
    found = state.get("fingerprint") if isinstance(state, dict) else None
    if found is None:
        raise CheckpointError(f"{path} is not an EMCA-Train checkpoint (no architecture fingerprint)")
    if found != expected_fingerprint:
        if found["architecture"] != expected_fingerprint["architecture"]:
            detail = f"it holds {describe_architecture(found)}, this run builds {describe_architecture(expected_fingerprint)}"
        else:
            detail = f"its parameter names or shapes differ from this run's {describe_architecture(expected_fingerprint)}"
        raise CheckpointError(f"refusing checkpoint {path}: {detail}")
