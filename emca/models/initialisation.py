"""model.init_from: start a run from weights one already has, our checkpoint or a torchvision ResNet's.

A models-level job (weights into a model), used by the engine for model.init_from and by
detection_backbone(weights=...).

Distinct from trainer.resume, which continues a run (optimizer, schedule, position, random state):
init_from only sets the initial weights of a new run. Every tensor whose name is in both the file
and the model is loaded and must have the model's shape; the model's other tensors (an attention
module the file's model did not have, say) keep their initialisation. EMCAResNet names its plain
ResNet parts as torchvision does, so a torchvision ResNet's state_dict loads into every backbone
of the same depth.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from emca.common.checkpoint_file import CheckpointError, load_checkpoint


@dataclass
class Initialisation:
    path: str
    loaded: list[str]  # model tensors taken from the file
    kept: list[str]  # model tensors not in the file (or excluded): their initialisation stays
    unused: list[str]  # file tensors the model has no place for

    def summary(self) -> str:
        kept = f" ({', '.join(_groups(self.kept))})" if self.kept else ""
        return (f"model.init_from={self.path}: {len(self.loaded)} tensors loaded, {len(self.kept)} kept their "
                f"initialisation{kept}, {len(self.unused)} in the file unused")

    def record(self) -> dict[str, Any]:
        return {"path": self.path, "loaded": len(self.loaded), "kept": len(self.kept), "unused": len(self.unused)}


def _groups(names: Sequence[str], shown: int = 4) -> list[str]:
    """The modules the names belong to, a few of them: 'layer1.0.attn', ..."""
    modules = list(dict.fromkeys(name.rsplit(".", 1)[0] for name in names))
    return modules[:shown] + ([f"{len(modules) - shown} more modules"] if len(modules) > shown else [])


def file_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a train.py checkpoint ('model'), a {'state_dict': ...} file, or a bare state_dict."""
    state = load_checkpoint(path, option="model.init_from")
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and "fingerprint" in state:
        state = state["model"]
    elif isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"model.init_from={path} holds no state_dict (a mapping of names to tensors); give a "
                              "train.py checkpoint or a torchvision model's state_dict file")
    # DDP and torch.compile prefixes, as other tools save them.
    return {name.removeprefix("module.").removeprefix("_orig_mod."): value for name, value in state.items()}


def initialise_from(model: nn.Module, path: str, exclude: Sequence[str] = ()) -> Initialisation:
    """Load the file's matching tensors into `model`; a shape mismatch is one line (CheckpointError)."""
    weights = file_state_dict(Path(path))
    own = model.state_dict()
    excluded = tuple(prefix.rstrip(".") + "." for prefix in exclude)
    loaded, kept = [], []
    for name, tensor in own.items():
        if name not in weights or name.startswith(excluded):
            kept.append(name)
            continue
        if weights[name].shape != tensor.shape:
            module = name.rsplit(".", 1)[0]
            raise CheckpointError(
                f"model.init_from={path}: {name} has shape {list(weights[name].shape)} there but "
                f"{list(tensor.shape)} in this model; add model.init_exclude=[{module}] to keep the model's own"
            )
        loaded.append(name)
    if not loaded:
        raise CheckpointError(f"model.init_from={path} has no tensor this model has (names such as "
                              f"{next(iter(weights))}); is it a ResNet state_dict?")
    with torch.no_grad():
        for name in loaded:
            own[name].copy_(weights[name])
    unused = [name for name in weights if name not in own]
    return Initialisation(str(path), loaded, kept, unused)
