"""One checkpoint file: its names in a run folder, reading it, and the architecture it must match.

The format is what train.py's checkpoints hold (a dict of plain types and tensors, loadable with
torch.load(weights_only=True)); emca.engine.checkpoint writes them, in generations. The models
(their timm loaders, model.init_from, the architecture line), the engine (resume) and the analysis
(eval.py, the tables) read them through load_checkpoint, so this sits below all of them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT_DIR = "checkpoints"  # the symlink in a run folder that users and tools read through
LAST = "last.pt"
BEST = "best.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for this run; the message is one line."""


def architecture_fingerprint(model: nn.Module, architecture: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint must match: the model's description (backbone, attention, coverage, classes:
    `architecture`, by default the model's own architecture()) and a digest of every state_dict key and shape."""
    signature = "\n".join(f"{key}:{tuple(value.shape)}" for key, value in model.state_dict().items())
    return {
        "architecture": model.architecture() if architecture is None else architecture,
        "state_dict_sha256": hashlib.sha256(signature.encode()).hexdigest(),
    }


def describe_architecture(fingerprint: dict[str, Any]) -> str:
    arch = fingerprint["architecture"]
    coverage = arch.get("coverage")
    coverage_text = (
        "no coverage" if coverage is None else f"coverage stages={coverage['stages']} blocks={coverage['blocks']}"
    )
    detector = f"{arch['detector']} on " if arch.get("detector") else ""
    return (f"{detector}{arch['backbone']} / attention {arch['attention']} / {coverage_text} / "
            f"{arch['num_classes']} classes")


def check_checkpoint_path(path: Path, option: str | None = None) -> str:
    """Refuse (one line) a path that is no file; else how errors name it ("trainer.resume=PATH")."""
    named = f"{option}={path}" if option else f"checkpoint {path}"
    if path.is_dir():
        inside = next((file for file in (path / LAST, path / CHECKPOINT_DIR / LAST) if file.is_file()), None)
        raise CheckpointError(
            f"{named} is a folder, not a checkpoint file; give the file, e.g. {inside or path / CHECKPOINT_DIR / LAST}"
        )
    if not path.is_file():
        raise CheckpointError(f"{named} does not exist")
    return named


def load_checkpoint(
    path: Path, expected_fingerprint: dict[str, Any] | None = None, option: str | None = None
) -> dict[str, Any]:
    """Read a checkpoint written by CheckpointStore.save, refusing one of a different architecture.

    Without expected_fingerprint the architecture is not checked (eval.py first builds the model
    the checkpoint describes). `option` names the option the path came from in the errors.
    """
    path = Path(path)
    named = check_checkpoint_path(path, option)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as error:
        raise CheckpointError(f"{named} cannot be read: permission denied") from error
    except Exception as error:  # torch's messages for a damaged file advise weights_only=False, which cannot help
        # Distinct files, unless written before best.pt was slim: then the best last epoch made it a hard link.
        other = path.with_name({LAST: BEST, BEST: LAST}.get(path.name, path.name))
        hint = f"; {other} may be intact" if other.is_file() and not os.path.samefile(other, path) else ""
        raise CheckpointError(
            f"{named} cannot be read: it is damaged (truncated or not a PyTorch checkpoint){hint}"
        ) from error
    if expected_fingerprint is not None:
        check_fingerprint(state, path, expected_fingerprint)
    return state


def check_fingerprint(state: Any, path: Path, expected_fingerprint: dict[str, Any]) -> None:
    """Refuse (CheckpointError, one line) checkpoint contents of another architecture."""
    found = state.get("fingerprint") if isinstance(state, dict) else None
    if found is None:
        raise CheckpointError(f"{path} is not an EMCA-Train checkpoint (no architecture fingerprint)")
    if found != expected_fingerprint:
        if found["architecture"] != expected_fingerprint["architecture"]:
            detail = (f"it holds {describe_architecture(found)}, "
                      f"this run builds {describe_architecture(expected_fingerprint)}")
        else:
            detail = (
                f"its parameter names or shapes differ from this run's {describe_architecture(expected_fingerprint)}"
            )
        raise CheckpointError(f"refusing checkpoint {path}: {detail}")
