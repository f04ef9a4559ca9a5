"""Named datasets: where their ImageFolder tree lives, and generating the offline `digits` one.

All datasets end up as root/train/<class>/ and root/val/<class>/ folders; the names only differ in
how the tree comes to exist (digits is generated, tiny_imagenet needs a one-time conversion with
scripts/prepare_tiny_imagenet.py, imagenet and imagefolder are used as they are).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from emca.data.errors import DatasetError
from emca.data.folder import folder_error

DATASETS = ("digits", "tiny_imagenet", "imagenet", "imagefolder")

DIGITS_SIZE = 32  # the 8x8 scans are upscaled so a ResNet stem (stride 4) still sees structure
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
_COMPLETE = ".complete"


def check_dataset_name(name: str) -> None:
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset.name={name!r}; choose one of {', '.join(DATASETS)}")


def dataset_root(name: str, root: str) -> Path:
    """The folder holding train/ and val/ for dataset `name`, generating it first for digits."""
    check_dataset_name(name)
    path = Path(root).expanduser()
    if name == "digits":
        ensure_digits(path)
    return path


def ensure_digits(root: Path) -> None:
    """Write scikit-learn's handwritten digits as PNGs in ImageFolder layout, once.

    The tree is built in a temporary sibling folder and renamed into place: rename is atomic, so
    ranks or runs starting together never see half a dataset, and a loser of the race just
    discards its copy and uses the winner's.
    """
    try:
        if (root / _COMPLETE).is_file():
            return
        occupied = root.exists() and any(root.iterdir())
    except OSError as error:
        raise folder_error(root, error) from None
    if occupied:
        raise DatasetError(
            f"{root} exists but is not a generated digits dataset; remove it or point dataset.root at an empty or "
            "missing folder"
        )
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    except OSError as error:
        raise DatasetError(
            f"cannot create the digits dataset under {root.parent} ({error}); set dataset.root or EMCA_CACHE to a "
            "writable folder"
        ) from None
    try:
        _write_digits(staging)
        (staging / _COMPLETE).touch()
        try:
            os.rename(staging, root)  # replaces a missing or empty root atomically
        except OSError:
            if not (root / _COMPLETE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_digits(out: Path) -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixel values are 0..16 ink levels.
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    indices = np.arange(len(pixels))
    train, val = train_test_split(
        indices, test_size=DIGITS_VAL_FRACTION, stratify=digits.target, random_state=DIGITS_SPLIT_SEED
    )
    for split, chosen in (("train", train), ("val", val)):
        for i in sorted(chosen):
            folder = out / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(pixels[i], mode="L").resize((DIGITS_SIZE, DIGITS_SIZE), Image.BILINEAR)
            image.save(folder / f"{i:04d}.png")
