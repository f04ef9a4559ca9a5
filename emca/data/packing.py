"""Packing an ImageFolder tree into WebDataset shards (scripts/pack_shards.py): plan, write, resume.

The images are listed and screened as the folder loaders do (emca.data.folder; corrupt ones stop
the packing or are left out, by on_bad_image), then shuffled once per split with the seed and cut
into shards of shard_size samples, so that every shard holds a mix of classes. The plan depends
only on the source's listing (paths, sizes, mtimes), the seed, the shard size and on_bad_image.

Writing is atomic and resumable: each shard goes to a temporary name and is renamed, its index
after it, and info.json comes last, so a killed packing leaves no shard that looks complete and no
info.json. A rerun with the same plan (recorded in OUT/.pack-plan when packing starts) keeps the
shards whose index, size and member headers are those planned, and writes the rest.

info.json: {"format", "version", "classes": [names], "source": {"root", "dataset", "fingerprint"},
"pack": {"shard_size", "seed", "on_bad_image"}, "plan": digest, "splits": {split: {"samples",
"skipped", "extensions", "class_counts", "shards": [{"tar", "index", "samples", "bytes"}]}}}, the
paths relative to OUT.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from emca.common.files import atomic_write
from emca.common.locks import InUse, lock_exclusively, name_holder
from emca.data.builder import BAD_IMAGE_POLICIES, cache_dir
from emca.data.datasets import dataset_root
from emca.data.errors import DatasetError
from emca.data.folder import ImageList, check_root, list_split, screen_images
from emca.data.shards import (
    BLOCK,
    FORMAT,
    INFO,
    LABEL_EXT,
    SPLITS,
    VERSION,
    index_text,
    member_header,
    sample_key,
    shard_layout,
    shard_name,
    write_tar,
)

log = logging.getLogger(__name__)

PLAN = ".pack-plan"
LOCK = ".pack-lock"  # held by the packing that writes OUT (emca.common.locks.lock_exclusively)
_OURS = re.compile(r"shard-\d{6}\.(tar|idx)|\.shard-\d{6}\.(tar|idx)\.\w+\.tmp")


@dataclass(frozen=True)
class Shard:
    """One planned shard: its members (name, size) in order, each image's source file and label."""

    tar: Path
    index: Path
    members: list[tuple[str, int]]
    paths: list[str]
    labels: list[str]  # as stored: ASCII digits


def pack(source: Path, out: Path, *, shard_size: int = 1000, seed: int = 0, on_bad_image: str = "error",
         dataset: str = "imagefolder", workers: int = 4) -> dict:
    """Pack the ImageFolder tree `source` (train/ and val/) into shards under `out`; returns info.json's content.

    `out` is owned by one packing at a time (a lock file, OUT/.pack-lock, while it runs): a second
    one is refused in one line naming the first. A packing that raises leaves no info.json.
    """
    if shard_size < 1:
        raise DatasetError(f"--shard-size {shard_size} must be at least 1")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise DatasetError(f"--on-bad-image {on_bad_image!r} must be 'error' or 'skip'")
    root, out = dataset_root(dataset, str(source)), Path(out)
    check_root(root, dataset)
    if out.resolve() == root.resolve():
        raise DatasetError(f"the output folder {out} is the source tree; pass another folder as OUT")
    with _owned(out):
        return _pack(root, out, shard_size, seed, on_bad_image, dataset, workers)


@contextlib.contextmanager
def _owned(out: Path) -> Iterator[None]:
    """Hold OUT's lock while packing; what the lock added (the file, a new OUT) goes again on the way
    out, so a refused or failed packing into a new folder leaves nothing behind."""
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, _ = lock_exclusively(out / LOCK)
    except InUse as busy:
        raise DatasetError(f"{out} is being packed by {busy.holder}; wait for that packing to end (or stop it, "
                           "then rerun this command: it keeps the shards already complete)") from None
    try:
        name_holder(fd)
        yield
    finally:
        (out / LOCK).unlink(missing_ok=True)  # while still holding it: no one can take the name meanwhile
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only succeeds on a folder left empty


def _pack(root: Path, out: Path, shard_size: int, seed: int, on_bad_image: str, dataset: str, workers: int) -> dict:
    train = list_split(root / "train")
    listed = {"train": train, "val": list_split(root / "val", train.classes)}
    sizes, fingerprint = _fingerprint(root, [path for images in listed.values() for path in images.paths])
    # Screened before anything is written: a bad image under on_bad_image=error leaves OUT as it was.
    screened = {split: _screen(images, root / split, on_bad_image, workers) for split, images in listed.items()}
    params = {"shard_size": shard_size, "seed": seed, "on_bad_image": on_bad_image}
    plan = hashlib.sha256(json.dumps([FORMAT, VERSION, fingerprint, params]).encode()).hexdigest()
    trusted = _start(out, plan)
    info = {"format": FORMAT, "version": VERSION, "classes": train.classes,
            "source": {"root": str(root.resolve()), "dataset": dataset, "fingerprint": fingerprint},
            "pack": params, "plan": plan, "splits": {}}
    planned = []
    for number, split in enumerate(SPLITS):
        images = screened[split]
        order = np.random.default_rng([seed, number]).permutation(len(images))
        shards = _plan_split(out, split, images, order, sizes, shard_size)
        written = sum(_pack_shard(shard, trusted, workers) for shard in shards)
        _remove_stale(out / split, {path.name for shard in shards for path in (shard.tar, shard.index)})
        log.info("%s: %d images in %d shards (%d written, %d already complete)", split, len(images), len(shards),
                 written, len(shards) - written)
        info["splits"][split] = _split_info(out, images, shards)
        planned += shards
    _check_written(out, planned)
    atomic_write(out / INFO, lambda file: file.write(json.dumps(info, indent=1).encode() + b"\n"))
    return info


def _check_written(out: Path, shards: list[Shard]) -> None:
    """Before info.json declares the packing complete: every planned shard is on disk with its
    index and size (nothing another writer, or a person, removed or replaced meanwhile)."""
    for shard in shards:
        _, size = shard_layout(shard.members)
        try:
            whole = shard.index.read_text() == index_text(shard.members) and shard.tar.stat().st_size == size
        except (OSError, UnicodeDecodeError):
            whole = False
        if not whole:
            raise DatasetError(f"{shard.tar} changed or went missing while {out} was being packed; rerun the same "
                               "command (it keeps the shards that are complete)")


def _screen(images: ImageList, split_dir: Path, on_bad_image: str, workers: int) -> ImageList:
    screened = screen_images(images, split_dir, on_bad_image=on_bad_image, cache_dir=cache_dir(), threads=workers)
    if not len(screened):
        raise DatasetError(f"no image of {split_dir} passed the screening; fix or replace its images")
    return screened


def _fingerprint(root: Path, paths: list[str]) -> tuple[dict[str, int], str]:
    """Each file's size, and a digest of the sorted (relative path, size, mtime) of all of them."""
    sizes, digest = {}, hashlib.sha256()
    for path in sorted(paths):
        try:
            info = os.stat(path)
            size, mtime = info.st_size, info.st_mtime_ns
        except OSError:  # the screening names the problem, or leaves the file out
            size = mtime = -1
        sizes[path] = size
        digest.update(os.fsencode(f"{os.path.relpath(path, root)}\0{size}\0{mtime}\n"))
    return sizes, digest.hexdigest()


def _start(out: Path, plan: str) -> bool:
    """Record the plan in `out`; True if it is the plan of the shards already there (a resume)."""
    marker = out / PLAN
    try:
        if marker.read_text() == plan:
            return True
    except OSError:
        pass
    # Another plan's info.json must not describe the shards about to be replaced.
    (out / INFO).unlink(missing_ok=True)
    atomic_write(marker, lambda file: file.write(plan.encode()))
    return False


def _plan_split(out: Path, split: str, images: ImageList, order: np.ndarray, sizes: dict[str, int],
                shard_size: int) -> list[Shard]:
    shards = []
    for number, first in enumerate(range(0, len(order), shard_size)):
        members, paths, labels = [], [], []
        for position in range(first, min(first + shard_size, len(order))):
            path = images.paths[order[position]]
            key, ext = sample_key(position), Path(path).suffix.lower().lstrip(".")
            label = str(int(images.labels[order[position]]))
            members += [(f"{key}.{ext}", sizes[path]), (f"{key}.{LABEL_EXT}", len(label))]
            paths.append(path)
            labels.append(label)
        stem = out / split / shard_name(number)
        shards.append(Shard(stem.with_suffix(".tar"), stem.with_suffix(".idx"), members, paths, labels))
    return shards


def _pack_shard(shard: Shard, trusted: bool, workers: int) -> bool:
    """Write `shard` unless a complete one of the same plan is there; True if it was written."""
    if trusted and _is_complete(shard):
        return False
    shard.index.unlink(missing_ok=True)  # the pair counts as complete only once the index is back
    with ThreadPoolExecutor(max(1, workers)) as pool:
        images = list(pool.map(Path.read_bytes, map(Path, shard.paths)))
    members = []
    for path, data, label, (name, size), (label_name, _) in zip(
        shard.paths, images, shard.labels, shard.members[::2], shard.members[1::2], strict=True
    ):
        if len(data) != size:
            raise DatasetError(f"{path} changed while packing ({size} bytes, now {len(data)}); pack again")
        members += [(name, data), (label_name, label.encode())]
    atomic_write(shard.tar, lambda file: write_tar(file, members))
    atomic_write(shard.index, lambda file: file.write(index_text(shard.members).encode()))
    return True


def _is_complete(shard: Shard) -> bool:
    """Whether the shard on disk is the planned one: its index, size and every member header."""
    offsets, size = shard_layout(shard.members)
    try:
        if shard.index.read_text() != index_text(shard.members) or shard.tar.stat().st_size != size:
            return False
        with open(shard.tar, "rb") as file:
            for (name, member_size), offset in zip(shard.members, offsets, strict=True):
                file.seek(offset - BLOCK)
                if file.read(BLOCK) != member_header(name, member_size):
                    return False
    except (OSError, UnicodeDecodeError):
        return False
    return True


def _remove_stale(split_dir: Path, keep: set[str]) -> None:
    """Remove the shards of an earlier, larger packing and the temporary files of a killed one."""
    for entry in os.scandir(split_dir):
        if _OURS.fullmatch(entry.name) and entry.name not in keep:
            os.unlink(entry.path)


def _split_info(out: Path, images: ImageList, shards: list[Shard]) -> dict:
    counts = np.bincount(images.labels, minlength=len(images.classes))
    return {
        "samples": len(images),
        "skipped": images.skipped,
        "extensions": sorted({name.split(".", 1)[1] for shard in shards for name, _ in shard.members[::2]}),
        "class_counts": counts.tolist(),
        "shards": [
            {"tar": shard.tar.relative_to(out).as_posix(), "index": shard.index.relative_to(out).as_posix(),
             "samples": len(shard.paths), "bytes": shard_layout(shard.members)[1]}
            for shard in shards
        ],
    }
