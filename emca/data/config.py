"""Structured config schemas for the `dataset` and `loader` Hydra groups.

The trainer registers these as base schemas; the YAML files in configs/dataset and configs/loader
fill them in. Mean/std are on the 0-255 pixel scale (as DALI's crop_mirror_normalize expects for
uint8 input); both loaders normalise uint8 pixels with exactly these numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from emca.data.errors import DatasetError
from emca.options import require_int

# ImageNet's RGB statistics (0.485, 0.456, 0.406 / 0.229, 0.224, 0.225) x 255, written rounded as the
# v0.2 dataset files wrote them (0.224 * 255 is 57.120000000000005 in floats): a v0.2 run's recorded
# values must compare equal when it resumes (emca.engine.compatibility).
IMAGENET_MEAN = [123.675, 116.28, 103.53]
IMAGENET_STD = [58.395, 57.12, 57.375]

# dataset.workers=null's most loader workers per rank (as eval.py's speed.workers=null).
AUTO_WORKERS_MAX = 8


@dataclass
class DatasetConfig:
    # 'digits' | 'tiny_imagenet' | 'imagenet' | 'imagefolder'
    name: str = "imagefolder"
    # Folder holding train/ and val/ class folders (for digits: where they are generated); with
    # format=shards the folder scripts/pack_shards.py wrote (the one with info.json).
    root: str = "???"
    # 'folder': an ImageFolder tree | 'shards': WebDataset tar shards packed by scripts/pack_shards.py |
    # 'coco': COCO-format detection (task=detection): <root>/<split>/ and <root>/annotations/instances_<split>.json.
    format: str = "folder"
    # format=coco: the splits' folder names (COCO 2017's).
    train_split: str = "train2017"
    val_split: str = "val2017"
    # null: read from the train folder; a configured value must agree with the folder.
    num_classes: Optional[int] = None
    image_size: int = 224
    # Shorter side before the validation centre crop; null: round(val_image_size / 0.875).
    val_resize: Optional[int] = None
    # GLOBAL batch size, split evenly over ranks.
    batch_size: int = 256
    # Decoding threads (DALI) / worker processes (torchvision) per rank; null: one per CPU core this
    # process may run on, shared among the node's ranks, at most AUTO_WORKERS_MAX (builder.loader_workers).
    workers: Optional[int] = None
    # 'error': stop and name the file; 'skip': leave corrupt images out and warn with a count.
    on_bad_image: str = "error"
    # The dataset's schedule length; the trainer's default number of epochs.
    epochs: int = 100
    # 'random_resized' (ImageNet-style) | 'pad_random' (zero-pad crop_padding px, random crop).
    train_crop: str = "random_resized"
    crop_scale: Any = field(default_factory=lambda: [0.08, 1.0])
    # 3/4 to 4/3, with 4/3 written to 7 decimals as the v0.2 dataset files wrote it, so that a v0.2
    # run's recorded value compares equal when it resumes.
    crop_ratio: Any = field(default_factory=lambda: [0.75, 1.3333333])
    # pad_random only (random_resized reads no padding); no padding unless a dataset asks for it
    # (tiny_imagenet: 4 px, our choice, docs/paper.md#decisions).
    crop_padding: int = 0
    hflip: bool = True
    # Validation centre-crop size; null: image_size (train at 160 and test at 224 as RSB: 160 and 224).
    val_image_size: Optional[int] = None
    # Training augmentation policy after crop and flip: null | randaugment | trivialaugment | autoaugment
    # (the ImageNet policy), the same policy in both loaders.
    auto_augment: Optional[str] = None
    # randaugment only: operations per image and their magnitude (0-30 scale, torchvision's 31 bins).
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    # Probability of erasing one random rectangle of a training image (to the mean pixel); 0: off.
    random_erasing: float = 0.0
    # Per-channel RGB mean/std on the 0-255 scale.
    mean: Any = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: Any = field(default_factory=lambda: list(IMAGENET_STD))

    def __post_init__(self) -> None:
        # Runs when build_loaders types the config (OmegaConf.to_object). Only the fields no reader
        # checks: batch_size (sampling), image_size, crops, mean/std (transforms) and the names
        # (builder, datasets) have their own one-line checks where they are used.
        require_int("dataset.num_classes", self.num_classes, 1, DatasetError, nullable=True)
        require_int("dataset.workers", self.workers, 0, DatasetError, nullable=True)
        require_int("dataset.epochs", self.epochs, 1, DatasetError)


# dataset.auto_augment -> the start-up log's name for it.
POLICY_NAMES = {"randaugment": "RandAugment", "trivialaugment": "TrivialAugmentWide",
                "autoaugment": "AutoAugment (ImageNet policy)"}


def describe_augmentation(dataset) -> list[str]:
    """The training augmentation beyond crop and flip, for the start-up log's "with ..." line:
    e.g. ["RandAugment 2 ops at magnitude 18/30", "random erasing p=0.25"]; [] when there is none."""
    from emca.data.policies import RANDAUGMENT_BINS  # torchvision's, imported only when a run describes itself

    policy = dataset.auto_augment
    parts = []
    if policy == "randaugment":
        parts.append(f"RandAugment {dataset.randaugment_ops} ops at magnitude {dataset.randaugment_magnitude}/"
                     f"{RANDAUGMENT_BINS - 1}")
    elif policy is not None:
        parts.append(POLICY_NAMES.get(policy, policy))
    if dataset.random_erasing:
        parts.append(f"random erasing p={dataset.random_erasing}")
    return parts


@dataclass
class LoaderConfig:
    # 'dali' | 'torchvision' | 'synthetic'
    name: str = "dali"
    # DALI: batches decoded ahead of the one being consumed.
    prefetch_queue_depth: int = 2
    # DALI: use the GPU (mixed decoder + GPU augmentation) when CUDA is available; false decodes and
    # augments on CPU threads, and the batches still reach the GPU from DALI's pinned buffers.
    dali_use_gpu: bool = True
    # DALI readers (image files and shards), for data on a network file system (NFS, Lustre, GPFS):
    # there a memory-mapped file turns every page touched into a round trip to the server, so plain
    # reads (dali_dont_use_mmap) are faster; reading each opened file ahead (dali_read_ahead: a slower
    # first access, faster ones after, which pays for large files such as tar shards) and more batches
    # read ahead by the reader's own thread (dali_reader_prefetch) hide the latency. Local disk: defaults.
    dali_dont_use_mmap: bool = False
    dali_read_ahead: bool = False
    dali_reader_prefetch: int = 1
    # DALI with dataset.format=shards: training samples are shuffled in a buffer of this many (the
    # webdataset reader's initial_fill), on top of a new shard order each epoch. Larger: better mixed,
    # more memory (encoded images) and a longer fill before the first batch.
    dali_shuffle_buffer: int = 1024
    # torchvision: batches each worker prepares ahead.
    prefetch_factor: int = 2
    # torchvision: page-locked host batches (only takes effect when the device is CUDA).
    pin_memory: bool = True
    # torchvision: keep worker processes between epochs (only when workers > 0).
    persistent_workers: bool = True
    # synthetic: batches per training / validation epoch.
    steps_per_epoch: int = 100
    val_steps: int = 10

    def __post_init__(self) -> None:
        # Checked for every loader, also the options only another loader reads: none of these
        # values is possible for any loader.
        for option in ("prefetch_queue_depth", "dali_reader_prefetch", "dali_shuffle_buffer", "prefetch_factor",
                       "steps_per_epoch", "val_steps"):
            require_int(f"loader.{option}", getattr(self, option), 1, DatasetError)
