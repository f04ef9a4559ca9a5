"""emca.load_model(PATH) -> (model, transform): a trained model out of its checkpoint, or out of a
folder scripts/publish.py wrote, for users.

It combines the models (the network a checkpoint's configuration describes, with its weights:
emca.models.loading) and the data (the run's validation transform: emca.data.eval_transform), so
it sits above both; `import emca` exposes it lazily as emca.load_model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple, Union

from torch import nn

from emca.analysis.publish import CONFIG, WEIGHTS, transform_cfg
from emca.common.checkpoint_file import CheckpointError
from emca.data.eval_transform import EvalTransform
from emca.models.loading import read_checkpoint, restore_model
from emca.models.registry import MODELS


class LoadedModel(NamedTuple):
    """What load_model returns: `model, transform = emca.load_model(PATH)`."""

    model: nn.Module
    transform: EvalTransform


def load_model(path: Union[str, os.PathLike], ema: bool = False) -> LoadedModel:
    """The model a checkpoint of train.py holds, built from the checkpoint's own configuration, with
    its trained weights (ema=True: their moving average, a run with trainer.ema), in eval mode on the
    CPU, and its evaluation transform. Its pretrained_cfg describes the run (classes as label_names,
    input size, crop, mean and std, the file), as timm's data config reads it.

    PATH may also be a folder scripts/publish.py wrote: its model.safetensors in the model its
    config.json describes, with the transform of its run. It holds one set of weights (config.json's
    emca.weights, chosen when publishing); ema=True is refused where they are not the EMA's.

    A missing, damaged or foreign file, a checkpoint of another architecture than its configuration
    builds, or ema=True without EMA weights is a CheckpointError of one line.
    """
    given = Path(path).expanduser()
    if (given / CONFIG).is_file():
        return load_published(given, ema)
    state = read_checkpoint(given)
    model = restore_model(given, state, ema).eval()
    transform = EvalTransform(state["config"]["dataset"])
    model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, **run_cfg(state, transform), "file": str(given)}
    return LoadedModel(model, transform)


def run_cfg(state: dict[str, Any], transform: EvalTransform) -> dict[str, Any]:
    """timm's pretrained_cfg fields that a run's checkpoint determines."""
    cfg = {"num_classes": state["fingerprint"]["architecture"]["num_classes"], **transform_cfg(transform)}
    if state.get("classes"):
        cfg["label_names"] = tuple(state["classes"])
    return cfg


def load_published(folder: Path, ema: bool = False) -> LoadedModel:
    """The model of a folder scripts/publish.py wrote, as timm.create_model(config.json's architecture,
    **its model_args) with model.safetensors' weights, in eval mode on the CPU, and its run's transform."""
    import timm
    from safetensors.torch import load_file

    config = json.loads((folder / CONFIG).read_text())
    run, name = config.get("emca"), config.get("architecture")
    if run is None or name not in MODELS:
        raise CheckpointError(f"{folder / CONFIG} is not of a folder scripts/publish.py wrote (architecture {name!r}): "
                              f"load it with timm.create_model('local-dir:{folder}', pretrained=True)")
    if ema and run["weights"] != "ema":
        raise CheckpointError(f"{folder} holds the {run['weights']} weights of its run (config.json's emca.weights): "
                              "drop ema=True, or publish the run again with ema=true")
    model = timm.create_model(name, **config["model_args"])
    try:
        model.load_state_dict(load_file(folder / WEIGHTS))
    except Exception as error:  # missing, damaged (safetensors' own error type) or of another model
        problem = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{folder / WEIGHTS} does not load into the {name} its config.json describes "
                              f"({problem}); publish the run again") from None
    published = {key: tuple(value) if isinstance(value, list) else value
                 for key, value in config["pretrained_cfg"].items()}
    if config.get("label_names"):
        published["label_names"] = tuple(config["label_names"])
    model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, **published, "file": str(folder / WEIGHTS)}
    return LoadedModel(model.eval(), EvalTransform(run["dataset"]))
