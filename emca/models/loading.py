"""A trained model out of its checkpoint: the network its configuration describes, with its weights.

The checkpoint carries the run's resolved configuration: the model is built from it (no attention,
coverage or option to restate) and its weights are loaded after emca.common.checkpoint_file.check_fingerprint:
restore_model for a classification run, restore_detector for a task=detection run.
eval.py, Grad-CAM, scripts/export.py and emca.load_model (emca/api.py, which adds the run's
transform) share read_checkpoint / restore_model; each names itself in the errors.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from emca.common.checkpoint_file import CheckpointError, architecture_fingerprint, check_fingerprint, load_checkpoint
from emca.common.renamed_options import upgrade_config
from emca.models.config import check_model_options


def read_checkpoint(path: Path, error: type[Exception] = CheckpointError, reader: str = "emca.load_model"
                    ) -> dict[str, Any]:
    """The checkpoint's contents, with one-line errors for unusable files: CheckpointError for a
    missing, folder or damaged file, `error` for one that train.py did not write. The architecture
    is checked once the model its configuration describes is built (restore_model)."""
    state = load_checkpoint(path, option="checkpoint")
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise error(f"{path} holds no training configuration ('config'); {reader} needs a checkpoint written by "
                    "train.py")
    if "fingerprint" not in state:
        raise error(f"{path} has no architecture fingerprint; {reader} needs a checkpoint written by train.py")
    # A v0.2 checkpoint's config may name options since renamed (attention.gc_ratio): read in today's names.
    try:
        return {**state, "config": upgrade_config(state["config"])}
    except ValueError as problem:
        raise error(f"{path}: {problem}") from None


def restore_model(path: Path, state: dict[str, Any], ema: bool = False, error: type[Exception] = CheckpointError,
                  without_ema: str = "use ema=False") -> nn.Module:
    """The run's model with the checkpoint's weights (on the CPU, in training mode): the trained ones,
    or with `ema` their exponential moving average (a run trained with trainer.ema)."""
    from emca.models import build_model  # emca.models imports this module

    train_cfg = state["config"]
    num_classes = state["fingerprint"]["architecture"]["num_classes"]
    with _buildable(path, error):
        check_model_options(train_cfg["backbone"], train_cfg["attention"])
        model = build_model(train_cfg["backbone"], train_cfg["attention"], train_cfg["coverage"], num_classes)
    return _with_weights(model, architecture_fingerprint(model), path, state, ema, error, without_ema)


def restore_detector(path: Path, state: dict[str, Any], ema: bool = False, error: type[Exception] = CheckpointError,
                     without_ema: str = "use ema=False") -> nn.Module:
    """A task=detection run's detector (torchvision's FasterRCNN, MaskRCNN or RetinaNet) with the
    checkpoint's weights, as restore_model: on the CPU, in training mode, the trained or EMA weights."""
    from emca.models.detectors import build_detector, detector_architecture  # imports emca.models

    train_cfg = state["config"]
    num_classes = state["fingerprint"]["architecture"]["num_classes"]
    with _buildable(path, error):
        check_model_options(train_cfg["backbone"], train_cfg["attention"])
        detector = train_cfg["detector"]
        model = build_detector(detector, train_cfg["backbone"], train_cfg["attention"], train_cfg["coverage"],
                               num_classes)
        architecture = detector_architecture(model, detector, num_classes)
    return _with_weights(model, architecture_fingerprint(model, architecture), path, state, ema, error, without_ema)


@contextmanager
def _buildable(path: Path, error: type[Exception]) -> Iterator[None]:
    """A configuration this code cannot build (an option since removed, a missing group) as one line."""
    try:
        yield
    except (KeyError, ValueError) as problem:
        raise error(f"{path}: its configuration does not describe a model this code can build ({problem})"
                    ) from problem


def _with_weights(model: nn.Module, fingerprint: dict[str, Any], path: Path, state: dict[str, Any], ema: bool,
                  error: type[Exception], without_ema: str) -> nn.Module:
    """`model` with the checkpoint's trained or EMA weights, once its fingerprint matches the checkpoint's."""
    check_fingerprint(state, path, fingerprint)
    if ema and state.get("ema") is None:
        raise error(f"{path} holds no EMA weights (its run had trainer.ema.decay=null); {without_ema}")
    model.load_state_dict(state["ema"] if ema else state["model"])
    return model
