"""Convert the raw Tiny ImageNet-200 download into the ImageFolder layout the loaders read.

    python scripts/prepare_tiny_imagenet.py RAW OUT [--force]

RAW is the unpacked `tiny-imagenet-200` folder (wnids.txt, train/<wnid>/images/*.JPEG,
val/images/*.JPEG, val/val_annotations.txt), or the folder containing it. OUT receives
train/<wnid>/*.JPEG and val/<wnid>/*.JPEG as symlinks to the raw files (absolute targets; no image
is copied). The official test split has no labels and is left out. OUT must be empty or missing;
--force replaces an earlier OUT/train and OUT/val and leaves anything else in OUT alone.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path


class PrepareError(Exception):
    pass


def find_raw(raw: Path) -> Path:
    for candidate in (raw, raw / "tiny-imagenet-200"):
        if (candidate / "wnids.txt").is_file():
            return candidate.resolve()
    if not raw.is_dir():
        raise PrepareError(f"{raw} is not a folder; pass the unpacked tiny-imagenet-200 folder")
    raise PrepareError(
        f"{raw} has no wnids.txt; pass the unpacked tiny-imagenet-200 folder (with wnids.txt, train/, val/)"
    )


def read_wnids(raw: Path) -> list[str]:
    wnids = [line.strip() for line in (raw / "wnids.txt").read_text().splitlines() if line.strip()]
    if not wnids:
        raise PrepareError(f"{raw / 'wnids.txt'} lists no classes")
    return wnids


def read_val_annotations(raw: Path, wnids: list[str]) -> list[tuple[str, str]]:
    """(file name, wnid) for every validation image, from val/val_annotations.txt."""
    path = raw / "val" / "val_annotations.txt"
    if not path.is_file():
        raise PrepareError(f"{path} is missing; RAW must be the unpacked tiny-imagenet-200 folder")
    known = set(wnids)
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in known:
            raise PrepareError(f"{path}:{number}: expected '<file>\\t<wnid from wnids.txt>...', got {line!r}")
        pairs.append((fields[0], fields[1]))
    return pairs


def link(target: Path, link_path: Path) -> None:
    if not target.is_file():
        raise PrepareError(f"{target} is missing from the raw download")
    os.symlink(target, link_path)


def prepare(raw: Path, out: Path, force: bool = False) -> dict[str, int]:
    raw = find_raw(raw)
    wnids = read_wnids(raw)
    val_pairs = read_val_annotations(raw, wnids)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise PrepareError(
                f"{out} is not empty; choose an empty OUT or pass --force to replace its train/ and val/"
            )
        for split in ("train", "val"):
            shutil.rmtree(out / split, ignore_errors=True)

    counts = {"classes": len(wnids), "train": 0, "val": 0}
    for wnid in wnids:
        images = raw / "train" / wnid / "images"
        if not images.is_dir():
            raise PrepareError(f"{images} is missing; wnids.txt lists {wnid} but the raw train/ folder lacks it")
        folder = out / "train" / wnid
        folder.mkdir(parents=True)
        for name in sorted(os.listdir(images)):
            link(images / name, folder / name)
            counts["train"] += 1
    for wnid in wnids:
        (out / "val" / wnid).mkdir(parents=True)
    for name, wnid in val_pairs:
        link(raw / "val" / "images" / name, out / "val" / wnid / name)
        counts["val"] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("raw", type=Path, help="unpacked tiny-imagenet-200 folder")
    parser.add_argument("out", type=Path, help="output folder for the ImageFolder layout (symlinks)")
    parser.add_argument("--force", action="store_true", help="replace OUT/train and OUT/val if they exist")
    args = parser.parse_args(argv)
    try:
        counts = prepare(args.raw, args.out, args.force)
    except PrepareError as error:
        print(f"prepare_tiny_imagenet: error: {error}", file=sys.stderr)
        return 1
    print(
        f"{args.out}: {counts['classes']} classes, {counts['train']} train and {counts['val']} val images (symlinks); "
        f"use dataset=tiny_imagenet dataset.root={args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
