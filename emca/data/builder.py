"""build_loaders: from the `dataset` and `loader` configs to the train/val loaders of one rank."""
from __future__ import annotations

import os
from dataclasses import dataclass, is_dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from emca.data.config import AUTO_WORKERS_MAX, DatasetConfig, LoaderConfig
from emca.data.datasets import check_dataset_name, dataset_root
from emca.data.errors import DatasetError
from emca.data.folder import ImageList, check_root, list_split, screen_images
from emca.data.sampling import per_rank_batch_size, train_batches_per_epoch, train_shard, val_shard
from emca.data.shards import INFO, load_split, read_info
from emca.data.synthetic import SyntheticLoader
from emca.data.transforms import Preprocessing

LOADERS = ("dali", "torchvision", "synthetic")
BAD_IMAGE_POLICIES = ("error", "skip")
FORMATS = ("folder", "shards")


@dataclass
class DataBundle:
    train: Any  # None when built with train=False (evaluation)
    val: Any
    num_classes: int
    classes: list[str]
    num_train: int  # global counts (all ranks), after skipping corrupt images
    num_val: int
    workers: int = 0  # loader workers (DALI: threads) per rank, dataset.workers=null resolved; none when synthetic


def _typed(cfg, schema):
    """A DictConfig, dict or dataclass as a validated `schema` dataclass instance."""
    try:
        if is_dataclass(cfg) and not isinstance(cfg, type):
            cfg = OmegaConf.structured(cfg)
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        first_line = str(error).strip().splitlines()[0]
        raise DatasetError(f"invalid {schema.__name__}: {first_line}") from None


def cache_dir() -> Path:
    return Path(os.environ.get("EMCA_CACHE", Path.home() / ".cache" / "emca"))


def available_cpus() -> int:
    """The CPU cores this process may run on (its affinity mask: a SLURM or container limit counts)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def loader_workers(workers: Optional[int]) -> int:
    """dataset.workers as a count: a number as given; null (the default) one per core this process
    may run on, its share when torchrun starts several ranks on the node (LOCAL_WORLD_SIZE), at most
    AUTO_WORKERS_MAX. More workers than cores only contend for them (PyTorch warns); the batches do
    not depend on the count (every sample's augmentation is seeded by its index and epoch)."""
    if workers is not None:
        return workers
    ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(AUTO_WORKERS_MAX, available_cpus() // ranks_here))


def _load_split(split_dir: Path, classes, dataset: DatasetConfig) -> ImageList:
    images = list_split(split_dir, classes)
    return screen_images(
        images, split_dir, on_bad_image=dataset.on_bad_image, cache_dir=cache_dir(), threads=max(1, dataset.workers)
    )


def _check_class_count(dataset: DatasetConfig, classes, found: str) -> None:
    """dataset.num_classes against the classes found; `found` says where, with {} for their number."""
    if dataset.num_classes is not None and dataset.num_classes != len(classes):
        raise DatasetError(
            f"dataset.num_classes={dataset.num_classes} but {found.format(len(classes))}; "
            f"set dataset.num_classes={len(classes)} (or null to read it from the folder)"
        )


def _load_folders(dataset: DatasetConfig, train: bool, classes: Optional[Sequence[str]]):
    """(root, train images or None, val images) of an ImageFolder tree, listed and screened."""
    root = dataset_root(dataset.name, dataset.root)
    check_root(root, dataset.name, splits=("train", "val") if train else ("val",))
    if train:
        train_images = _load_split(root / "train", classes, dataset)
        # Before val/ is screened image by image.
        _check_class_count(dataset, train_images.classes, f"{root / 'train'} has {{}} class folders")
        return root, train_images, _load_split(root / "val", train_images.classes, dataset)
    # val/'s folders must be among the given classes (a trained model's); that check, with its own
    # message, comes first.
    val_images = _load_split(root / "val", classes, dataset)
    found = f"{root / 'val'} has {{}} class folders" if classes is None else "the given class list has {} names"
    _check_class_count(dataset, val_images.classes, found)
    return root, None, val_images


def _load_shards(dataset: DatasetConfig, train: bool, classes: Optional[Sequence[str]]):
    """(root, train samples or None, val samples) of a packed shard folder, from its info.json and indexes."""
    check_dataset_name(dataset.name)
    root = Path(dataset.root).expanduser()
    info = read_info(root)
    found = f"{root / INFO} lists {{}} classes" if classes is None else "the given class list has {} names"
    _check_class_count(dataset, classes or info["classes"], found)
    train_samples = load_split(root, "train", info, classes) if train else None
    return root, train_samples, load_split(root, "val", info, classes)


def build_loaders(dataset_cfg, loader_cfg, *, rank: int = 0, world_size: int = 1,
                  device: torch.device | str = "cpu", channels_last: bool = False, seed: int = 0,
                  train: bool = True, classes: Optional[Sequence[str]] = None) -> DataBundle:
    """Train and val loaders for this rank; raises DatasetError (one line) on any data problem.

    Both loaders follow the same protocol: `set_epoch(epoch)` before iterating, `len()` is the
    number of batches of this rank's epoch, iteration gives (float32 NCHW images, int64 labels) on
    `device`; `start_at(step)` after set_epoch skips as many of the epoch's first `step` batches as
    it can without loading them and returns that number: iteration starts at that batch (the caller
    drops what remains before `step`).
    dataset.batch_size is the global batch; each rank gets batch_size // world_size.

    train=False builds the validation loader alone (evaluation), without listing or screening a
    train/ folder, which need not exist. `classes` are the names the labels index (a trained
    model's outputs); by default train/'s class folders, or val/'s when train=False.
    """
    dataset: DatasetConfig = _typed(dataset_cfg, DatasetConfig)
    loader: LoaderConfig = _typed(loader_cfg, LoaderConfig)
    dataset.workers = loader_workers(dataset.workers)  # this typed copy only: the run's config keeps null
    device = torch.device(device)
    if loader.name not in LOADERS:
        raise DatasetError(f"unknown loader.name={loader.name!r}; choose one of {', '.join(LOADERS)}")
    if dataset.on_bad_image not in BAD_IMAGE_POLICIES:
        raise DatasetError(f"dataset.on_bad_image={dataset.on_bad_image!r} must be 'error' or 'skip'")
    if not 0 <= rank < world_size:
        raise DatasetError(f"rank {rank} is outside world_size {world_size}")
    prep = Preprocessing.from_config(dataset)
    batch = per_rank_batch_size(dataset.batch_size, world_size)

    if loader.name == "synthetic":
        bundle = _synthetic_bundle(dataset, loader, prep, batch, world_size, device, channels_last, seed + rank)
        if not train:
            bundle.train, bundle.num_train = None, 0
        return bundle

    if dataset.format not in FORMATS:
        raise DatasetError(f"unknown dataset.format={dataset.format!r}; choose one of {', '.join(FORMATS)}")
    load = _load_shards if dataset.format == "shards" else _load_folders
    root, train_images, val_images = load(dataset, train, classes)
    classes = val_images.classes
    if train_images is not None and train_batches_per_epoch(len(train_images), dataset.batch_size) == 0:
        raise DatasetError(
            f"{root / 'train'} has {len(train_images)} images, fewer than one global batch; lower "
            f"dataset.batch_size={dataset.batch_size}"
        )

    shards = dict(
        train=lambda epoch: train_shard(
            len(train_images), dataset.batch_size, seed=seed, epoch=epoch, rank=rank, world_size=world_size
        ),
        val=lambda epoch: val_shard(len(val_images), rank=rank, world_size=world_size),
    )
    common = dict(batch_size=batch, workers=dataset.workers, seed=seed, device=device, channels_last=channels_last)
    make = _loader_factory(dataset, loader, common, rank, world_size)
    return DataBundle(
        train=make(train_images, prep, shards["train"], train=True) if train_images is not None else None,
        val=make(val_images, prep, shards["val"], train=False),
        num_classes=len(classes), classes=classes, num_train=len(train_images or ()), num_val=len(val_images),
        workers=dataset.workers,
    )


def _loader_factory(dataset: DatasetConfig, loader: LoaderConfig, common: dict, rank: int, world_size: int):
    """make(images, preprocessing, shard_of_epoch, train=...) -> the loader of loader.name over those images."""
    if loader.name == "torchvision":
        from emca.data.torch_loader import TorchvisionLoader

        return partial(TorchvisionLoader, pin_memory=loader.pin_memory, persistent_workers=loader.persistent_workers,
                       prefetch_factor=loader.prefetch_factor, **common)
    try:
        from emca.data.dali_loader import DaliLoader, reader_options
    except ImportError as error:
        raise DatasetError(
            f"loader=dali needs NVIDIA DALI ({error}); pip install nvidia-dali-cuda130, or use loader=torchvision"
        ) from None
    dali = dict(rank=rank, prefetch_queue_depth=loader.prefetch_queue_depth, use_gpu=loader.dali_use_gpu,
                reader=reader_options(loader), **common)
    if dataset.format == "shards":
        return partial(DaliLoader.from_shards, world_size=world_size, shuffle_buffer=loader.dali_shuffle_buffer,
                       **dali)
    return partial(DaliLoader.from_files, **dali)


def _synthetic_bundle(dataset, loader, prep, batch, world_size, device, channels_last, seed) -> DataBundle:
    num_classes = dataset.num_classes or 1000
    make = partial(SyntheticLoader, batch_size=batch, image_size=prep.image_size, num_classes=num_classes,
                   device=device, channels_last=channels_last, seed=seed)
    return DataBundle(
        train=make(steps=loader.steps_per_epoch), val=make(steps=loader.val_steps),
        num_classes=num_classes, classes=[str(i) for i in range(num_classes)],
        num_train=loader.steps_per_epoch * batch * world_size, num_val=loader.val_steps * batch * world_size,
    )
