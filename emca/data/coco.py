"""COCO-format detection data (task=detection): torchvision's CocoDetection, read by the project's rules.

    data = build_detection_loaders(cfg.dataset, cfg.loader, rank=rank, world_size=world_size, seed=seed, masks=False)
    for epoch in range(epochs):
        data.train.set_epoch(epoch)
        for images, targets in data.train: ...

Layout (COCO's): <root>/<split>/ holds a split's images and <root>/annotations/instances_<split>.json
their annotations; dataset.train_split and dataset.val_split name the splits (COCO 2017: train2017,
val2017; scripts/tiny_imagenet_to_coco.py writes train and val).

- Checked once, when the loaders are built: each annotation file is read a single time (COCO
  train2017's is 450 MB) and checked entry by entry, and every image it lists is looked up on disk (a
  stat, no decode), so that a broken dataset stops the run in one line naming the file and the fix
  before any model exists. A file that is listed but does not decode stops the run when it is reached.
- Labels are the category ids themselves, 0 being the background: num_classes is the largest id + 1
  (91 for COCO, as torchvision's references and detectors count it), and a detection's label is the
  category_id that COCOeval compares.
- Training targets leave out crowd annotations and boxes without area, and training leaves out the
  images left with no box, as torchvision's references do (coco_utils.py,
  _coco_remove_images_without_annotations). Zero-size boxes are a defect of COCO itself (train2017 has
  two non-crowd boxes of height 0, annotations 918 and 2206849), so they are left out with a warning
  rather than refused; negative sizes and boxes beyond their image are refused. A box may overhang
  its image by up to EDGE_TOLERANCE (COCO's boxes are float bounds of polygons) and is clamped to it.
- Validation keeps every image of its file and each image's annotations as given: COCOeval reads the
  same file and needs its every image (an image without annotations has empty targets).
- Images are float32 RGB tensors in 0..1 at their own size: the detectors resize and normalise
  (GeneralizedRCNNTransform). Boxes are absolute xyxy (tv_tensors.BoundingBoxes, so the flip moves
  them), masks tv_tensors.Mask; batches are lists, as torchvision's detection references collate them.
- Exact resume: an epoch's order comes from emca.data.sampling (train_shard, val_shard) and each
  sample's flip from (seed, epoch, sample index) alone, through the classification loader's
  ShardSampler, so batches depend neither on the worker count nor on the batches skipped at resume.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, VisionDataset, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2 as T

from emca.data.builder import loader_workers
from emca.data.errors import DatasetError
from emca.data.folder import describe_failure, open_image
from emca.data.sampling import per_rank_batch_size, train_batches_per_epoch, train_shard, val_shard
from emca.data.torch_loader import IndexedLoader
from emca.options import is_int

log = logging.getLogger(__name__)

# How far (in pixels) a non-crowd box may reach past its image's edges: COCO's boxes are the float
# bounds of polygons, which may overhang by a fraction of a pixel. Training clamps the overhang away.
EDGE_TOLERANCE = 1.0
LAYOUT = "a COCO folder (<root>/<split>/ images, <root>/annotations/instances_<split>.json)"
ANNOTATION_FIELDS = "an integer id, image_id and category_id and a bbox [x, y, width, height] of 4 numbers"


@dataclass
class DetectionData:
    train: DetectionLoader | None  # len(): training steps per epoch; None when built with train=False
    val: DetectionLoader  # this rank's share of every val image, each once across ranks
    num_classes: int  # the largest category id + 1: labels are the category ids, 0 the background
    categories: list[dict]  # the annotation file's categories [{"id", "name", ...}]
    num_train: int  # images trained on: those with at least one usable box (0 with train=False)
    num_val: int
    val_annotations: Path  # the val annotation file, which the COCO evaluator reads
    workers: int  # DataLoader workers per process


@dataclass
class CocoSplit:
    """One split's annotation file, read and checked: its image entries by id, each image's
    annotations (all of them, crowds included), and its categories."""

    json_path: Path
    folder: Path
    images: dict[int, dict]
    annotations: dict[int, list[dict]]
    categories: list[dict]


def build_detection_loaders(dataset_cfg, loader_cfg, *, rank: int, world_size: int, seed: int, masks: bool,
                            device: torch.device | str = "cpu", train: bool = True) -> DetectionData:
    """This rank's train and val loaders of a COCO-format dataset; raises DatasetError (one line) on any
    problem the files have. dataset.batch_size is the global batch. `masks`: targets carry instance
    masks (Mask R-CNN). `device`: where the batches go, only to decide loader.pin_memory (which takes
    effect on CUDA); the batches themselves stay on the CPU. `train=False`: the val split alone is read
    (eval.py: a user may hold only the validation images), `train` is None and num_train 0, and the
    categories are the val file's."""
    if not 0 <= rank < world_size:
        raise DatasetError(f"rank {rank} is outside world_size {world_size}")
    global_batch = dataset_cfg.batch_size
    root = _coco_root(dataset_cfg.root)
    train_split = read_split(root, dataset_cfg.train_split, "train_split", masks) if train else None
    val_split = read_split(root, dataset_cfg.val_split, "val_split", masks)
    if train_split is not None:
        _check_same_categories(train_split, val_split)
    categories = (train_split or val_split).categories
    workers = loader_workers(dataset_cfg.workers)
    make = partial(DetectionLoader, seed=seed, batch_size=per_rank_batch_size(global_batch, world_size),
                   workers=workers, pin_memory=loader_cfg.pin_memory and torch.device(device).type == "cuda",
                   persistent_workers=loader_cfg.persistent_workers, prefetch_factor=loader_cfg.prefetch_factor)
    train_loader, num_train = (None, 0) if train_split is None else _train_loader(
        train_split, make, masks=masks, hflip=bool(dataset_cfg.hflip), global_batch=global_batch, seed=seed,
        rank=rank, world_size=world_size)
    num_val = len(val_split.images)
    val = make(DetectionSamples(CocoImages(val_split, val_split.annotations), masks=masks, hflip=False, train=False),
               lambda epoch: val_shard(num_val, rank=rank, world_size=world_size), train=False)
    return DetectionData(
        train=train_loader, val=val, num_classes=max(category["id"] for category in categories) + 1,
        categories=categories, num_train=num_train, num_val=num_val, val_annotations=val_split.json_path,
        workers=workers,
    )


def _train_loader(split: CocoSplit, make: Callable[..., DetectionLoader], *, masks: bool, hflip: bool,
                  global_batch: int, seed: int, rank: int, world_size: int) -> tuple[DetectionLoader, int]:
    """(this rank's training loader, images trained on) of the train split."""
    images = CocoImages(split, training_targets(split))
    num_train = len(images)
    if train_batches_per_epoch(num_train, global_batch) == 0:
        raise DatasetError(
            f"{split.json_path} has {num_train} images with a usable box, fewer than one global batch; "
            f"lower dataset.batch_size={global_batch}"
        )
    loader = make(DetectionSamples(images, masks=masks, hflip=hflip, train=True),
                  lambda epoch: train_shard(num_train, global_batch, seed=seed, epoch=epoch, rank=rank,
                                            world_size=world_size), train=True)
    return loader, num_train


# --- reading and checking the files ------------------------------------------------------------


def _coco_root(option: Any) -> Path:
    root = Path(str(option)).expanduser()
    if not root.is_dir():
        state = "is not a folder" if root.exists() else "does not exist"
        raise DatasetError(f"dataset root {root} {state}; set dataset.root to {LAYOUT}")
    if (root / "wnids.txt").is_file():
        raise DatasetError(
            f"{root} is the raw Tiny ImageNet download; convert its boxes once with "
            f"`python scripts/tiny_imagenet_to_coco.py {root} OUT` and set dataset.root=OUT"
        )
    return root


def read_split(root: Path, split: str, option: str, masks: bool) -> CocoSplit:
    """The split `split` of the COCO folder `root`, checked; `option` is the dataset option naming it."""
    folder, json_path = root / split, root / "annotations" / f"instances_{split}.json"
    if not folder.is_dir():
        raise DatasetError(
            f"{root} has no {split}/ image folder; set dataset.root to {LAYOUT} or dataset.{option} to the split's name"
        )
    if not json_path.is_file():
        raise DatasetError(
            f"{json_path} is missing; set dataset.root to {LAYOUT} or dataset.{option} to the split's name"
        )
    data = _read_json(json_path)
    categories = _categories(data["categories"], json_path)
    images = _images(data["images"], json_path)
    category_ids = {category["id"] for category in categories}
    annotations: dict[int, list[dict]] = {image_id: [] for image_id in images}
    for number, annotation in enumerate(data["annotations"]):
        problem = _annotation_problem(annotation, images, category_ids, masks)
        if problem is not None:
            name = f"annotation {annotation['id']}" if _has_id(annotation) else f"annotation entry {number}"
            raise DatasetError(f"{name} in {json_path}: {problem}")
        annotations[annotation["image_id"]].append(annotation)
    _check_files(folder, images, json_path)
    return CocoSplit(json_path, folder, images, annotations, categories)


def _read_json(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            data = json.load(handle)
    except OSError as error:
        raise DatasetError(
            f"cannot read {path}: {error.strerror or error}; check the file and its permissions"
        ) from None
    except ValueError as error:  # json's decoding errors, and undecodable text
        raise DatasetError(f"{path} is not valid JSON ({error}); write or download it again") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DatasetError(
                f"{path} has no '{key}' list; a COCO instances file holds images, annotations and categories lists"
            )
    return data


def _categories(entries: list, path: Path) -> list[dict]:
    if not entries:
        raise DatasetError(f"{path} lists no categories; add the categories its annotations use")
    seen = set()
    for entry in entries:
        if not (isinstance(entry, dict) and is_int(entry.get("id")) and isinstance(entry.get("name"), str)):
            raise DatasetError(f"category {_shown(entry)} in {path} needs an integer id and a name; fix the entry")
        if entry["id"] < 1:
            raise DatasetError(
                f"category {entry['name']!r} in {path} has id {entry['id']}; ids start at 1 (0 is the detectors' "
                "background): renumber the categories and their annotations"
            )
        if entry["id"] in seen:
            raise DatasetError(f"category id {entry['id']} appears twice in {path}; give each category its own id")
        seen.add(entry["id"])
    return entries


def _images(entries: list, path: Path) -> dict[int, dict]:
    if not entries:
        raise DatasetError(f"{path} lists no images; an empty split cannot be used: list the split's images in it")
    images: dict[int, dict] = {}
    for entry in entries:
        ok = isinstance(entry, dict) and is_int(entry.get("id")) and isinstance(entry.get("file_name"), str)
        if not (ok and all(is_int(entry.get(side)) and entry[side] > 0 for side in ("width", "height"))):
            raise DatasetError(
                f"image {_shown(entry)} in {path} needs an integer id, a file_name and positive integer width and "
                "height; fix the entry"
            )
        if entry["id"] in images:
            raise DatasetError(f"image id {entry['id']} appears twice in {path}; give each image its own id")
        images[entry["id"]] = entry
    return images


def _annotation_problem(annotation: Any, images: dict[int, dict], category_ids: set[int], masks: bool) -> str | None:
    """What is wrong with one annotation and how to fix it, or None."""
    fields_ok = isinstance(annotation, dict) and all(is_int(annotation.get(key))
                                                     for key in ("id", "image_id", "category_id"))
    bbox = annotation.get("bbox") if fields_ok else None
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(value) for value in bbox)):
        return f"{_shown(annotation)} needs {ANNOTATION_FIELDS}; fix the entry"
    image = images.get(annotation["image_id"])
    if image is None:
        return f"image_id {annotation['image_id']} is not among the file's images; fix image_id or add the image"
    if annotation["category_id"] not in category_ids:
        listed = ", ".join(map(str, sorted(category_ids)[:5])) + (", ..." if len(category_ids) > 5 else "")
        return (f"category_id {annotation['category_id']} is not among the file's categories ({listed}); "
                "fix category_id or add the category")
    if masks and not (isinstance(annotation.get("segmentation"), (list, dict)) and annotation["segmentation"]):
        return ("no segmentation (polygons or RLE), which instance masks need; add segmentations or train a "
                "detector without masks")
    if annotation.get("iscrowd", 0):
        return None  # never a training box; COCOeval reads crowd regions as given
    x, y, width, height = bbox
    where = f"box {bbox} of image {image['file_name']} ({image['width']}x{image['height']})"
    if width < 0 or height < 0:
        return f"{where} has a negative width or height; COCO's bbox is [x, y, width, height]: fix or remove it"
    if (x < -EDGE_TOLERANCE or y < -EDGE_TOLERANCE or x + width > image["width"] + EDGE_TOLERANCE
            or y + height > image["height"] + EDGE_TOLERANCE):
        return (f"{where} reaches more than {EDGE_TOLERANCE:g} px outside the image; fix the box (COCO's bbox is "
                "[x, y, width, height] in pixels) or the image's width and height")
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _has_id(annotation: Any) -> bool:
    return isinstance(annotation, dict) and is_int(annotation.get("id"))


def _shown(entry: Any) -> str:
    """A json entry for a message, cut short: an entry may hold a long polygon."""
    text = json.dumps(entry)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_files(folder: Path, images: dict[int, dict], json_path: Path) -> None:
    """Every listed image is a file (a stat each: its decoding is left to the loader)."""
    missing = [entry["file_name"] for entry in images.values()
               if not os.path.isfile(os.path.join(folder, entry["file_name"]))]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DatasetError(
            f"{folder / missing[0]}, listed in {json_path}, is missing{more}; put the split's images in {folder} or "
            "set dataset.root to the COCO folder that has them"
        )


def _check_same_categories(train: CocoSplit, val: CocoSplit) -> None:
    def pairs(split: CocoSplit) -> list[tuple[int, str]]:
        return sorted((category["id"], category["name"]) for category in split.categories)

    if pairs(train) != pairs(val):
        raise DatasetError(
            f"the categories of {val.json_path} differ from those of {train.json_path}; both splits need the same "
            "category ids and names"
        )


def training_targets(split: CocoSplit) -> dict[int, list[dict]]:
    """The annotations training uses, by image: non-crowd boxes with area inside their image, and only
    the images that have one."""
    targets, zero_size = {}, 0
    for image_id, given in split.annotations.items():
        image = split.images[image_id]
        boxes = [annotation for annotation in given if not annotation.get("iscrowd", 0)]
        usable = [annotation for annotation in boxes if _has_area(annotation["bbox"], image)]
        zero_size += len(boxes) - len(usable)
        if usable:
            targets[image_id] = usable
    if zero_size:
        log.warning("%s: %d non-crowd boxes have no area inside their image (zero width or height); "
                    "training leaves them out", split.json_path, zero_size)
    if not targets:
        raise DatasetError(
            f"{split.json_path} has no image with a non-crowd box of positive size: nothing to train on; "
            "annotate the split's objects or set dataset.train_split to another split"
        )
    return targets


def _has_area(bbox: list, image: dict) -> bool:
    """Whether a box keeps a positive width and height once clamped to its image."""
    x, y, width, height = bbox
    return min(x + width, image["width"]) > max(x, 0) and min(y + height, image["height"]) > max(y, 0)


# --- samples and batches -------------------------------------------------------------------------


class CocoImages(CocoDetection):
    """torchvision's CocoDetection over a checked split, serving the images that `targets` maps to
    their annotations (training's usable ones, or all of them), in image id order as CocoDetection.

    CocoDetection.__init__ is not called: it would parse the annotation file again (pycocotools), and
    the two methods that read its index are replaced by ones that read the split's.
    """

    def __init__(self, split: CocoSplit, targets: dict[int, list[dict]]):
        VisionDataset.__init__(self, str(split.folder))
        self.split, self.targets = split, targets
        self.ids = sorted(targets)

    def _load_image(self, id: int) -> Image.Image:
        entry = self.split.images[id]
        path = os.path.join(self.root, entry["file_name"])
        try:
            with open_image(path) as image:
                rgb = image.convert("RGB")  # greyscale, CMYK, palette -> RGB, as CocoDetection
        except Exception as error:  # PIL raises several types for unreadable files
            raise DatasetError(describe_failure(path, error).describe(path)) from None
        if rgb.size != (entry["width"], entry["height"]):
            raise DatasetError(
                f"image {path} is {rgb.width}x{rgb.height} but {self.split.json_path} gives {entry['width']}x"
                f"{entry['height']}; fix its width and height there (its boxes were checked against them)"
            )
        return rgb

    def _load_target(self, id: int) -> list[dict]:
        return self.targets[id]


class DetectionSamples(Dataset):
    """Indexed by (sample index, epoch seed) as the classification loader's datasets (ShardSampler);
    returns (float32 RGB CHW image in 0..1, target dict of plain tensors)."""

    def __init__(self, images: CocoImages, *, masks: bool, hflip: bool, train: bool):
        keys = {"image_id", "boxes", "labels", *(("masks",) if masks else ())}
        self.samples = wrap_dataset_for_transforms_v2(images, target_keys=keys)
        self.masks, self.hflip = masks, hflip and train
        self.mirror = T.RandomHorizontalFlip(p=1.0)
        to_tensors = [
            T.ToImage(),
            T.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.BoundingBoxes: torch.float32, "others": None},
                      scale=True),
            T.ToPureTensor(),
        ]
        # Validation boxes stay as the file gives them; training's lose their overhang (EDGE_TOLERANCE).
        self.finish = T.Compose([T.ClampBoundingBoxes(), *to_tensors] if train else to_tensors)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, dict]:
        index, epoch_seed = key
        image, target = self.samples[index]
        if "boxes" not in target:  # the wrapper's target for an image without annotations: its id alone
            target = self._empty_target(image, target["image_id"])
        # The classification loader's per-sample stream: the same flip whichever worker, whatever the resume.
        if self.hflip and random.Random((epoch_seed << 32) | index).random() < 0.5:
            image, target = self.mirror(image, target)
        return self.finish(image, target)

    def _empty_target(self, image: Image.Image, image_id: int) -> dict:
        canvas = (image.height, image.width)
        target = {"image_id": image_id, "labels": torch.zeros(0, dtype=torch.int64),
                  "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=canvas)}
        if self.masks:
            target["masks"] = tv_tensors.Mask(torch.zeros(0, *canvas, dtype=torch.uint8))
        return target


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """torchvision's detection collate (images differ in size, targets in length), as lists."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


class DetectionLoader(IndexedLoader):
    """One rank's batches of a split: (list of images, list of targets), on the CPU; each image's flip
    is seeded by its index, so a resumed epoch's start_at skips what it trained without loading it."""

    def __init__(self, samples: DetectionSamples, shard: Callable[[int], np.ndarray], **options: Any):
        super().__init__(samples, shard, collate_fn=collate, **options)

    def __iter__(self):
        return self.batches()
