"""A trained model out of its checkpoint: emca.load_model(PATH) -> (model, transform).

The checkpoint carries the run's resolved configuration: the model is built from it (no attention,
coverage or option to restate), its weights are loaded after emca.common.checkpoint_file.check_fingerprint,
and the transform is the run's validation preprocessing, as the torchvision loader applies it
(emca.data.transforms: shorter side, centre crop, per-channel normalisation). eval.py, Grad-CAM and
load_model share read_checkpoint / restore_model; each names itself in the errors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Union

import torch
from torch import nn

from ..common.checkpoint_file import CheckpointError, architecture_fingerprint, check_fingerprint, load_checkpoint
from ..common.renamed_options import upgrade_config
from .config import check_model_options


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
    from . import build_model  # emca.models imports this module

    train_cfg = state["config"]
    num_classes = state["fingerprint"]["architecture"]["num_classes"]
    try:
        check_model_options(train_cfg["backbone"], train_cfg["attention"])
        model = build_model(train_cfg["backbone"], train_cfg["attention"], train_cfg["coverage"], num_classes)
    except (KeyError, ValueError) as problem:
        raise error(f"{path}: its configuration does not describe a model this code can build ({problem})"
                    ) from problem
    check_fingerprint(state, path, architecture_fingerprint(model))
    if ema and state.get("ema") is None:
        raise error(f"{path} holds no EMA weights (its run had trainer.ema.decay=null); {without_ema}")
    model.load_state_dict(state["ema"] if ema else state["model"])
    return model


class EvalTransform:
    """A run's validation preprocessing: a PIL image (or an image file's path) to the normalised
    float32 (3, S, S) tensor that the torchvision loader's validation batches hold for it.

    A path is decoded as the loader decodes it (emca.data.torch_loader.load_rgb: EXIF orientation,
    16-bit greyscale, RGB); a PIL image gets the same conversions. `prep` is the resolved recipe.
    """

    def __init__(self, dataset_cfg: Mapping[str, Any]):
        from omegaconf import OmegaConf

        from ..data.transforms import BatchNormalizer, Preprocessing

        self.prep = Preprocessing.from_config(OmegaConf.create(dict(dataset_cfg)))
        self.normalize = BatchNormalizer(self.prep, torch.device("cpu"), channels_last=False)

    def __call__(self, image: Any) -> torch.Tensor:
        from ..data.transforms import val_image

        pixels = val_image(_loaded(image), self.prep)
        return self.normalize(pixels[None])[0]

    def __repr__(self) -> str:
        prep = self.prep
        return (f"EvalTransform(shorter side {prep.val_resize}, centre crop {prep.val_image_size}, "
                f"mean {list(prep.mean)}, std {list(prep.std)} on the 0-255 scale)")


def _loaded(image: Any):
    """The RGB PIL image the torchvision loader makes of a path, or of an image already opened."""
    from PIL import Image

    from ..data.torch_loader import load_rgb, to_rgb

    if isinstance(image, (str, os.PathLike)):
        return load_rgb(str(image))
    if not isinstance(image, Image.Image):
        raise TypeError(f"the transform takes a PIL image or an image file's path, got {type(image).__name__}")
    return to_rgb(image)


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
