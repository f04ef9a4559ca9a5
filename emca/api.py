"""emca.load_model(PATH) -> (model, transform): a trained model out of its checkpoint, for users.

It combines the models (the network a checkpoint's configuration describes, with its weights:
emca.models.loading) and the data (the run's validation transform: emca.data.eval_transform), so
it sits above both; `import emca` exposes it lazily as emca.load_model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple, Union

from torch import nn

from emca.data.eval_transform import EvalTransform
from emca.models.loading import read_checkpoint, restore_model


class LoadedModel(NamedTuple):
    """What load_model returns: `model, transform = emca.load_model(PATH)`."""

    model: nn.Module
    transform: EvalTransform


def load_model(path: Union[str, os.PathLike], ema: bool = False) -> LoadedModel:
    """The model a checkpoint of train.py holds, built from the checkpoint's own configuration, with
    its trained weights (ema=True: their moving average, a run with trainer.ema), in eval mode on the
    CPU, and its evaluation transform. Its pretrained_cfg describes the run (classes as label_names,
    input size, crop, mean and std, the file), as timm's data config reads it.

    A missing, damaged or foreign file, a checkpoint of another architecture than its configuration
    builds, or ema=True without EMA weights is a CheckpointError of one line.
    """
    given = Path(path).expanduser()
    state = read_checkpoint(given)
    model = restore_model(given, state, ema).eval()
    transform = EvalTransform(state["config"]["dataset"])
    model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, **run_cfg(state, transform), "file": str(given)}
    return LoadedModel(model, transform)


def run_cfg(state: dict[str, Any], transform: EvalTransform) -> dict[str, Any]:
    """timm's pretrained_cfg fields that a run's checkpoint determines."""
    prep = transform.prep
    cfg = {
        "num_classes": state["fingerprint"]["architecture"]["num_classes"],
        "input_size": (3, prep.val_image_size, prep.val_image_size),
        "crop_pct": prep.val_image_size / prep.val_resize,
        "interpolation": "bilinear",
        "mean": tuple(value / 255 for value in prep.mean),
        "std": tuple(value / 255 for value in prep.std),
    }
    if state.get("classes"):
        cfg["label_names"] = tuple(state["classes"])
    return cfg
