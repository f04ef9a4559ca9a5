"""The preprocessing recipe, resolved and validated once, and its torchvision/PIL implementation.

`Preprocessing` is what both loaders implement: the DALI pipeline in dali.py and the PIL
functions here read the same fields, so the two paths cannot drift apart in their parameters.
Workers hand over uint8 images; normalisation happens per batch on the target device
(`normalize_batch`), which keeps worker-to-main-process traffic at a quarter of float32.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional

import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from emca.data.config import DatasetConfig
from emca.data.errors import DatasetError
from emca.data.policies import POLICIES, RANDAUGMENT_BINS
from emca.options import is_int, require, require_int

TRAIN_CROPS = ("random_resized", "pad_random")


def _pair(value, field: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise DatasetError(f"dataset.{field} must be a [low, high] pair, got {value!r}") from None
    if not 0 < low <= high:
        raise DatasetError(f"dataset.{field}={[low, high]} must satisfy 0 < low <= high")
    return low, high


def _triple(value, field: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3:
        raise DatasetError(f"dataset.{field} must list 3 per-channel (RGB) values on the 0-255 scale, got {value!r}")
    return values


@dataclass(frozen=True)
class Preprocessing:
    image_size: int
    val_resize: int
    train_crop: str
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    crop_padding: int
    hflip: bool
    mean: tuple[float, float, float]  # 0-255 scale
    std: tuple[float, float, float]
    val_image_size: int  # the validation centre crop (image_size unless configured)
    auto_augment: Optional[str]  # one of policies.POLICIES; None: no policy
    randaugment_ops: int
    randaugment_magnitude: int
    random_erasing: float  # probability; 0: off

    @classmethod
    def from_config(cls, cfg) -> "Preprocessing":
        size = int(cfg.image_size)
        if size <= 0:
            raise DatasetError(f"dataset.image_size={size} must be positive")
        val_size = _option(cfg, "val_image_size")
        require_int("dataset.val_image_size", val_size, 1, DatasetError, nullable=True)
        crop_option, val_size = ("image_size", size) if val_size is None else ("val_image_size", val_size)
        # 0.875 is the classic 224/256 centre-crop ratio.
        val_resize = round(val_size / 0.875) if cfg.val_resize is None else int(cfg.val_resize)
        if val_resize < val_size:
            raise DatasetError(
                f"dataset.val_resize={val_resize} is smaller than dataset.{crop_option}={val_size}; the centre crop "
                f"needs val_resize >= {crop_option}"
            )
        if cfg.train_crop not in TRAIN_CROPS:
            raise DatasetError(f"dataset.train_crop={cfg.train_crop!r} is not one of {', '.join(TRAIN_CROPS)}")
        scale = _pair(cfg.crop_scale, "crop_scale")
        if scale[1] > 1:
            raise DatasetError(
                f"dataset.crop_scale={list(scale)} is a fraction of the image area and must not exceed 1"
            )
        if int(cfg.crop_padding) < 0:
            raise DatasetError(f"dataset.crop_padding={cfg.crop_padding} must be >= 0")
        mean, std = _triple(cfg.mean, "mean"), _triple(cfg.std, "std")
        if max(mean) <= 1 and max(std) <= 1:
            raise DatasetError(
                f"dataset.mean/std look like 0-1 values ({list(mean)}); give them on the 0-255 scale, e.g. 123.675 for "
                "0.485"
            )
        if min(std) <= 0:
            raise DatasetError(f"dataset.std={list(std)} must be positive")
        return cls(size, val_resize, cfg.train_crop, scale, _pair(cfg.crop_ratio, "crop_ratio"),
                   int(cfg.crop_padding), bool(cfg.hflip), mean, std, val_size, **_augmentation(cfg))


def _option(cfg, name: str):
    """cfg.<name>, or the schema's default where cfg lacks it: the dataset settings stored by a run
    before val_image_size and the augmentation options existed, read without the schema (as
    gradcam.load_images reads them)."""
    return getattr(cfg, name, getattr(DatasetConfig, name))


def _augmentation(cfg) -> dict:
    """The policy and erasing fields, validated; a RandAugment of 0 operations is no policy."""
    policy, ops, magnitude, erasing = (
        _option(cfg, name) for name in ("auto_augment", "randaugment_ops", "randaugment_magnitude", "random_erasing")
    )
    require(policy is None or policy in POLICIES, "dataset.auto_augment", policy,
            f"null or one of {', '.join(POLICIES)}", DatasetError)
    require_int("dataset.randaugment_ops", ops, 0, DatasetError)
    require(is_int(magnitude) and 0 <= magnitude < RANDAUGMENT_BINS, "dataset.randaugment_magnitude", magnitude,
            f"an integer from 0 to {RANDAUGMENT_BINS - 1}", DatasetError)
    require(isinstance(erasing, (int, float)) and not isinstance(erasing, bool) and 0 <= erasing <= 1,
            "dataset.random_erasing", erasing, "a probability from 0 to 1", DatasetError)
    if policy == "randaugment" and ops == 0:
        policy = None
    return dict(auto_augment=policy, randaugment_ops=ops, randaugment_magnitude=magnitude,
                random_erasing=float(erasing))


def sample_resized_crop(height: int, width: int, scale, ratio, rng: random.Random) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop; the same algorithm as torchvision's RandomResizedCrop,
    but drawing from `rng` so the result depends only on the sample's seed."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    # Fallback: the largest centre crop within the ratio range (as torchvision does).
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_image(image: Image.Image, prep: Preprocessing, rng: random.Random) -> torch.Tensor:
    """Augmented training crop as a uint8 CHW tensor; randomness only from `rng`."""
    size = prep.image_size
    if prep.train_crop == "random_resized":
        top, left, h, w = sample_resized_crop(image.height, image.width, prep.crop_scale, prep.crop_ratio, rng)
        image = F.resized_crop(image, top, left, h, w, [size, size], InterpolationMode.BILINEAR, antialias=True)
    else:
        if image.size != (size, size):
            image = F.resize(image, [size, size], InterpolationMode.BILINEAR, antialias=True)
        pad = prep.crop_padding
        # A crop window reaching outside the image is zero-filled: zero-padding + random crop in one step.
        image = F.crop(image, rng.randint(-pad, pad), rng.randint(-pad, pad), size, size)
    if prep.hflip and rng.random() < 0.5:
        image = F.horizontal_flip(image)
    return F.pil_to_tensor(image)


def val_geometry(width: int, height: int, prep: Preprocessing) -> tuple[int, int, int, int]:
    """(resized width, resized height, crop left, crop top) of the validation transform.

    Both rounding steps are round-half-up, DALI's convention for resize_shorter and centred crops.
    Stock torchvision truncates the long side and rounds the crop offset half-to-even; that gives
    the same crop give or take one pixel, but using one rule in both loaders makes their
    validation images agree pixel-position for pixel-position.
    """
    short = min(width, height)
    if width <= height:
        new_width, new_height = prep.val_resize, math.floor(height * prep.val_resize / short + 0.5)
    else:
        new_width, new_height = math.floor(width * prep.val_resize / short + 0.5), prep.val_resize
    size = prep.val_image_size
    return new_width, new_height, (new_width - size + 1) // 2, (new_height - size + 1) // 2


def val_image(image: Image.Image, prep: Preprocessing) -> torch.Tensor:
    """Shorter side resized to val_resize, centre crop val_image_size, as a uint8 CHW tensor."""
    width, height, left, top = val_geometry(image.width, image.height, prep)
    if (width, height) != image.size:
        image = F.resize(image, [height, width], InterpolationMode.BILINEAR, antialias=True)
    return F.pil_to_tensor(F.crop(image, top, left, prep.val_image_size, prep.val_image_size))


class BatchNormalizer:
    """uint8 NCHW batch -> float32 normalised batch on the device, optionally channels_last."""

    def __init__(self, prep: Preprocessing, device: torch.device, channels_last: bool):
        self.mean = torch.tensor(prep.mean, device=device).view(1, 3, 1, 1)
        self.std_inv = (1 / torch.tensor(prep.std, device=device)).view(1, 3, 1, 1)
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        return images.float().sub_(self.mean).mul_(self.std_inv)
