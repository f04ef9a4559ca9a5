"""Listing ImageFolder trees (train/<class>/*, val/<class>/*) and screening out corrupt images.

Shared by the DALI and torchvision loaders so both see the same files, labels and class names.

Corrupt-image policy: a cheap structural check at construction time rather than a full decode
(a full decode of ImageNet costs hours of CPU). Every file is opened with PIL, which parses the
header and rejects non-images, and JPEG/PNG files must end with their end marker (EOI / IEND);
together these catch the common failures (garbage, empty or truncated downloads) before DALI could
crash mid-epoch on them. Files that pass are remembered in a small cache keyed by
(path, size, mtime), so later runs only stat the files. A file that passes the check yet fails to
decode still stops the run with a DatasetError naming the file (see the loaders).
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from .errors import DatasetError

log = logging.getLogger(__name__)

# torchvision's ImageFolder extensions; other files (txt, json, .DS_Store) are ignored like it does.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# An end marker is searched in the file's tail, not just its last bytes: some valid JPEGs carry
# padding or trailer data after EOI. Entropy-coded JPEG data cannot contain FFD9 (0xFF is stuffed).
_TAIL_BYTES = 4096
_END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND"}


@dataclass(frozen=True)
class ImageList:
    """The images of one split: absolute paths, integer labels and the class names they index."""

    paths: list[str]
    labels: np.ndarray  # int64, indices into classes
    classes: list[str]
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.paths)


def check_root(root: Path, dataset: str, splits: Sequence[str] = ("train", "val")) -> None:
    """Fail early, in one line, on the layouts that would otherwise break later."""
    wanted = " and ".join(f"{split}/" for split in splits)
    if not root.exists():
        raise DatasetError(f"dataset root {root} does not exist; set dataset.root to a folder with {wanted} class folders")
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} is not a folder; set dataset.root to a folder with {wanted} class folders")
    if (root / "wnids.txt").is_file() or (root / "val" / "val_annotations.txt").is_file():
        raise DatasetError(
            f"{root} is the raw Tiny ImageNet download (wnids.txt, val/val_annotations.txt); convert it once with "
            f"`python scripts/prepare_tiny_imagenet.py {root} OUT` and set dataset.root=OUT"
        )
    for split in splits:
        if not (root / split).is_dir():
            raise DatasetError(
                f"{root} has no {split}/ folder; dataset '{dataset}' expects "
                f"{' and '.join(f'{root}/{name}/<class>/' for name in splits)} image folders"
            )


def find_classes(split_dir: Path) -> list[str]:
    classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DatasetError(f"{split_dir} has no class folders; put images in {split_dir}/<class name>/")
    return classes


def _images_under(class_dir: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames.sort()
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS))
    return found


def list_split(split_dir: Path, classes: Optional[Sequence[str]] = None) -> ImageList:
    """List split_dir/<class>/**/<image>; labels index `classes` (default: this folder's classes).

    Validation passes the train classes (or a trained model's): its class folders must be a subset
    of them, mapped by name.
    """
    own = find_classes(split_dir)
    classes = list(own if classes is None else classes)
    index = {name: i for i, name in enumerate(classes)}
    unknown = [name for name in own if name not in index]
    if unknown:
        raise DatasetError(
            f"{split_dir} has class folders that the training classes lack ({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}); "
            "validation classes must be a subset of the training classes"
        )
    paths, labels = [], []
    for name in own:
        files = _images_under(split_dir / name)
        if not files:
            raise DatasetError(f"class folder {split_dir / name} has no images ({', '.join(IMG_EXTENSIONS)}); add images or remove the folder")
        paths.extend(files)
        labels.extend([index[name]] * len(files))
    return ImageList(paths, np.asarray(labels, dtype=np.int64), classes)


def check_image(path: str) -> Optional[str]:
    """Why `path` is not a usable image, or None when it passes the cheap structural check."""
    try:
        with Image.open(path) as image:
            image_format = image.format
            width, height = image.size
    except Exception as error:  # PIL raises several types for unreadable files
        return f"not a readable image ({type(error).__name__}: {error})"
    if width <= 0 or height <= 0:
        return "image has no pixels"
    marker = _END_MARKERS.get(image_format)
    if marker is not None:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.path.getsize(path) - _TAIL_BYTES))
            if marker not in handle.read():
                return f"truncated {image_format} (no end marker)"
    return None


def find_undecodable(paths: Sequence[str]) -> Optional[tuple[str, str]]:
    """The first of `paths` that PIL cannot fully decode, with the reason; None if all decode.

    Used after a decoder failure that does not name its file (DALI's), on the few files it can be.
    """
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
        except Exception as error:
            return path, f"{type(error).__name__}: {error}"
    return None


def _fingerprints(paths: Sequence[str]) -> np.ndarray:
    """One 64-bit digest of (path, size, mtime) per file: changes whenever the file does."""
    digests = np.empty(len(paths), dtype=np.uint64)
    for i, path in enumerate(paths):
        stat = os.stat(path)
        key = f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
        digests[i] = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return digests


def _cache_file(split_dir: Path, cache_dir: Path) -> Path:
    name = hashlib.sha1(str(split_dir.resolve()).encode()).hexdigest()[:16]
    return cache_dir / "image-checks" / f"{name}.npy"


def _load_known_good(cache_file: Path) -> np.ndarray:
    try:
        return np.load(cache_file)
    except (OSError, ValueError):
        return np.empty(0, dtype=np.uint64)


def _save_known_good(cache_file: Path, fingerprints: np.ndarray) -> None:
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache_file.parent, suffix=".npy", delete=False) as handle:
            np.save(handle, fingerprints)
        os.replace(handle.name, cache_file)  # atomic: concurrent ranks never read half a file
    except OSError as error:  # a read-only cache only costs a re-check next time
        log.warning("could not cache image checks in %s: %s", cache_file.parent, error)


def screen_images(images: ImageList, split_dir: Path, *, on_bad_image: str, cache_dir: Path, threads: int = 1) -> ImageList:
    """Drop (on_bad_image='skip') or refuse (on_bad_image='error') files that fail check_image."""
    fingerprints = _fingerprints(images.paths)
    cache_file = _cache_file(split_dir, cache_dir)
    known_good = _load_known_good(cache_file)
    unchecked = np.flatnonzero(~np.isin(fingerprints, known_good))
    if unchecked.size == 0:
        return images
    with ThreadPoolExecutor(max(1, threads)) as pool:
        problems = list(pool.map(check_image, [images.paths[i] for i in unchecked]))
    bad = {int(i): why for i, why in zip(unchecked, problems) if why is not None}
    good = np.ones(len(images), dtype=bool)
    good[list(bad)] = False
    _save_known_good(cache_file, np.union1d(known_good, fingerprints[good]))
    if not bad:
        return images
    first = min(bad)
    if on_bad_image != "skip":
        others = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DatasetError(
            f"corrupt image {images.paths[first]}: {bad[first]}{others}; remove it or set dataset.on_bad_image=skip"
        )
    log.warning("skipped %d corrupt image(s) in %s, e.g. %s: %s", len(bad), split_dir, images.paths[first], bad[first])
    keep = np.flatnonzero(good)
    return ImageList([images.paths[i] for i in keep], images.labels[keep], images.classes, images.skipped + len(bad))
