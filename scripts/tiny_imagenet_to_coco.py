"""Convert the raw Tiny ImageNet-200 download's bounding boxes into a COCO-format detection dataset.

    python scripts/tiny_imagenet_to_coco.py SRC DST [--limit-per-class N]

SRC is the unpacked `tiny-imagenet-200` folder (wnids.txt, words.txt, train/<wnid>/images/*.JPEG with
train/<wnid>/<wnid>_boxes.txt, val/images/*.JPEG with val/val_annotations.txt), or the folder
containing it. DST receives COCO's layout for dataset=tiny_imagenet_boxes (emca/data/coco.py):

    DST/train/<file>.JPEG, DST/val/<file>.JPEG      symlinks to SRC's images (nothing is copied)
    DST/annotations/instances_train.json, instances_val.json

One box per image (Tiny ImageNet's), category ids 1..K in wnids.txt's order named by words.txt. Each
annotation also carries its box as a rectangle polygon, so that Mask R-CNN's pipeline runs on the set
(its masks are the boxes). --limit-per-class N keeps the first N images of each class in each split,
by sorted file name (a small set for tests). The official test split has no labels and is left out.
DST must be empty or missing; everything is read and checked before anything is written there.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from PIL import Image

# The sibling script that links the raw download into an ImageFolder tree (this folder is on
# sys.path when a script here runs): the same SRC lookup, class list and links serve both.
from prepare_tiny_imagenet import PrepareError, find_raw, link, read_wnids

SPLITS = ("train", "val")
COORDINATES = "x0 y0 x1 y1 (inclusive pixel coordinates, 0 <= x0 <= x1)"


def read_words(raw: Path, wnids: list[str]) -> dict[str, str]:
    """Each wnid's name from words.txt (`wnid<TAB>name, synonym, ...`)."""
    path = raw / "words.txt"
    if not path.is_file():
        raise PrepareError(f"{path} is missing; SRC must be the unpacked tiny-imagenet-200 folder")
    words = dict(line.split("\t", 1) for line in path.read_text().splitlines() if "\t" in line)
    missing = [wnid for wnid in wnids if wnid not in words]
    if missing:
        raise PrepareError(f"{path} does not name {missing[0]} (in wnids.txt); restore words.txt from the download")
    return {wnid: words[wnid].strip() for wnid in wnids}


def read_boxes(path: Path, wnid: str | None, known: set[str]) -> list[tuple[str, str, list[int]]]:
    """(file name, wnid, [x0, y0, x1, y1]) per line of a boxes file: `file x0 y0 x1 y1` (train: the
    class is `wnid`) or `file wnid x0 y0 x1 y1` (val/val_annotations.txt: wnid None)."""
    if not path.is_file():
        raise PrepareError(f"{path} is missing; SRC must be the unpacked tiny-imagenet-200 folder")
    expected = f"'<file> {'' if wnid else '<wnid> '}{COORDINATES}'"
    boxes = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        name, label, coordinates = (fields[0], wnid, fields[1:]) if wnid else (fields[0], fields[1], fields[2:])
        try:
            box = [int(value) for value in coordinates]
        except ValueError:
            box = []
        if len(box) != 4 or label not in known or not 0 <= box[0] <= box[2] or not 0 <= box[1] <= box[3]:
            raise PrepareError(f"{path}:{number}: expected {expected} with a class from wnids.txt, got {line!r}")
        boxes.append((name, label, box))
    return boxes


def split_records(raw: Path, split: str, wnids: list[str], limit: int | None) -> list[tuple[Path, str, list[int]]]:
    """(image path, wnid, box) of a split, by class in wnids.txt's order, then by file name; at most
    `limit` per class."""
    known = set(wnids)
    if split == "train":
        boxes = [box for wnid in wnids for box in read_boxes(raw / "train" / wnid / f"{wnid}_boxes.txt", wnid, known)]
        folder_of = {wnid: raw / "train" / wnid / "images" for wnid in wnids}
    else:
        boxes = read_boxes(raw / "val" / "val_annotations.txt", None, known)
        folder_of = {wnid: raw / "val" / "images" for wnid in wnids}
    order = {wnid: i for i, wnid in enumerate(wnids)}
    records, taken = [], dict.fromkeys(wnids, 0)
    for name, wnid, box in sorted(boxes, key=lambda record: (order[record[1]], record[0])):
        if limit is None or taken[wnid] < limit:
            records.append((folder_of[wnid] / name, wnid, box))
            taken[wnid] += 1
    return records


def image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise PrepareError(f"{path} is missing from the raw download; its boxes file lists it") from None
    except Exception as error:  # PIL raises several types for unreadable files
        raise PrepareError(f"{path} is not a readable image ({error}); restore it from the download") from None


def coco_json(records: list[tuple[Path, str, list[int]]], wnids: list[str], words: dict[str, str],
              description: str) -> dict:
    """The COCO instances file of one split's records."""
    category = {wnid: i for i, wnid in enumerate(wnids, 1)}
    images, annotations = [], []
    for number, (path, wnid, (x0, y0, x1, y1)) in enumerate(records, 1):
        width, height = image_size(path)
        if x1 >= width or y1 >= height:
            raise PrepareError(f"the box {x0} {y0} {x1} {y1} of {path} reaches beyond its {width}x{height} pixels; "
                               "fix the line in its boxes file")
        images.append({"id": number, "file_name": path.name, "width": width, "height": height})
        # Tiny ImageNet's x1, y1 are the box's last pixel column and row; COCO's box is continuous
        # [x, y, width, height], pixel i spanning [i, i + 1): it ends at x1 + 1, so width = x1 - x0 + 1.
        w, h = x1 - x0 + 1, y1 - y0 + 1
        polygon = [x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]
        annotations.append({"id": number, "image_id": number, "category_id": category[wnid], "bbox": [x0, y0, w, h],
                            "area": w * h, "iscrowd": 0, "segmentation": [polygon]})
    categories = [{"id": category[wnid], "name": words[wnid], "supercategory": "object", "wnid": wnid}
                  for wnid in wnids]
    return {"info": {"description": description}, "images": images, "annotations": annotations,
            "categories": categories}


def convert(src: Path, dst: Path, limit: int | None) -> dict[str, int]:
    """Write DST's links and annotation files; the number of images of each split."""
    raw = find_raw(src)
    wnids = read_wnids(raw)
    words = read_words(raw, wnids)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise PrepareError(f"{dst} is not an empty folder; choose a new or empty DST")
    splits = {}
    for split in SPLITS:
        records = split_records(raw, split, wnids, limit)
        description = f"Tiny ImageNet-200 {split} boxes from {raw} (scripts/tiny_imagenet_to_coco.py)"
        splits[split] = (records, coco_json(records, wnids, words, description))
    (dst / "annotations").mkdir(parents=True)
    for split, (records, content) in splits.items():
        (dst / split).mkdir()
        for path, _, _ in records:
            link(path, dst / split / path.name)
        (dst / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))
    return {split: len(records) for split, (records, _) in splits.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="unpacked tiny-imagenet-200 folder")
    parser.add_argument("dst", type=Path, help="output folder for the COCO layout (symlinks and json)")
    parser.add_argument("--limit-per-class", type=int, metavar="N",
                        help="keep the first N images (by file name) of each class in each split")
    args = parser.parse_args(argv)
    if args.limit_per_class is not None and args.limit_per_class < 1:
        parser.error(f"--limit-per-class must be at least 1, got {args.limit_per_class}")
    try:
        counts = convert(args.src, args.dst, args.limit_per_class)
    except (PrepareError, OSError) as error:
        raise SystemExit(f"tiny_imagenet_to_coco: error: {error}") from None
    print(f"{args.dst}: {counts['train']} train and {counts['val']} val images (symlinks) with COCO boxes; use "
          f"dataset=tiny_imagenet_boxes dataset.root={os.path.abspath(args.dst)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
