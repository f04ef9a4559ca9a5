"""One image as a run's validation batches hold it: the transform that emca.load_model returns.

The torchvision loader's validation preprocessing (emca.data.transforms: shorter side, centre crop,
per-channel normalisation), applied to one PIL image or image file, decoded as the loader decodes it.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from PIL import Image

from emca.data.torch_loader import load_rgb, to_rgb
from emca.data.transforms import BatchNormalizer, Preprocessing, val_image


class EvalTransform:
    """A run's validation preprocessing: a PIL image (or an image file's path) to the normalised
    float32 (3, S, S) tensor that the torchvision loader's validation batches hold for it.

    A path is decoded as the loader decodes it (emca.data.torch_loader.load_rgb: EXIF orientation,
    16-bit greyscale, RGB); a PIL image gets the same conversions. `prep` is the resolved recipe.
    """

    def __init__(self, dataset_cfg: Mapping[str, Any]):
        from omegaconf import OmegaConf

        self.prep = Preprocessing.from_config(OmegaConf.create(dict(dataset_cfg)))
        self.normalize = BatchNormalizer(self.prep, torch.device("cpu"), channels_last=False)

    def __call__(self, image: Any) -> torch.Tensor:
        pixels = val_image(_loaded(image), self.prep)
        return self.normalize(pixels[None])[0]

    def __repr__(self) -> str:
        prep = self.prep
        return (f"EvalTransform(shorter side {prep.val_resize}, centre crop {prep.val_image_size}, "
                f"mean {list(prep.mean)}, std {list(prep.std)} on the 0-255 scale)")


def _loaded(image: Any):
    """The RGB PIL image the torchvision loader makes of a path, or of an image already opened."""
    if isinstance(image, (str, os.PathLike)):
        return load_rgb(str(image))
    if not isinstance(image, Image.Image):
        raise TypeError(f"the transform takes a PIL image or an image file's path, got {type(image).__name__}")
    return to_rgb(image)
