"""The torchvision loader: PIL decoding + transforms.v2 in DataLoader workers.

Augmentation randomness is seeded per sample from (seed, epoch, sample index), so batches do not
depend on the number of workers or on which worker served a sample. The sampler hands each
worker the (index, epoch seed) pair, which also spares persistent workers any shared epoch state.
"""
from __future__ import annotations

import random
from typing import IO, Any, Callable, Iterator, Optional

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler

from emca.common.signals import detach_worker, stop_signals_blocked
from emca.data.errors import DatasetError
from emca.data.folder import ImageList, open_image
from emca.data.policies import TorchvisionAugment
from emca.data.sampling import derive_seed
from emca.data.shards import ShardList
from emca.data.transforms import BatchNormalizer, Preprocessing, train_image, val_image

# PIL's modes for 16-bit greyscale: PNG and TIFF (I;16, I;16B) and PGM (I, which PIL's reader scales
# to 0-65535 whatever the file's maxval).
_SIXTEEN_BIT_GREY = ("I", "I;16", "I;16B")


def load_rgb(path: str | IO[bytes]) -> Image.Image:
    """The RGB image DALI's decoder makes of `path`, a file name or an open file (tests/test_pixel_formats.py
    compares the two). Raises whatever PIL or the file system raise."""
    with open_image(path) as image:
        image.load()
        return to_rgb(image, in_place=True)


def to_rgb(image: Image.Image, in_place: bool = False) -> Image.Image:
    """A decoded image as the RGB image DALI makes of its file (the caller's image is left alone
    unless `in_place`).

    Alpha is dropped, leaving the colour stored under it (as DALI does); ICC profiles are ignored
    by both.
    """
    if "exif" in image.info:
        # Rotate/flip by the EXIF orientation, as DALI does (JPEG, PNG eXIf, WebP; PIL orients
        # TIFFs itself). Only an EXIF block counts: getexif() alone would also read ImageMagick's
        # legacy PNG text chunk ('Raw profile type exif'), which DALI and browsers ignore.
        oriented = ImageOps.exif_transpose(image, in_place=in_place)
        image = image if in_place else oriented
    if image.mode in _SIXTEEN_BIT_GREY:
        # convert("RGB") would clip 16-bit values at 255; DALI rounds v * 255 / 65535. (point()
        # takes I but not I;16B.)
        image = image.convert("I").point(lambda v: v * (1 / 257) + 0.5).convert("L")
    return image.convert("RGB")  # greyscale, CMYK, palette -> RGB


class ImageListDataset(Dataset):
    """Indexed by (sample index, epoch seed); returns (uint8 CHW image, label).

    `images`: loose files (an ImageList) or packed ones (a ShardList); both give each sample's
    encoded image as something PIL opens, and describe a failure to decode it.
    """

    def __init__(self, images: ImageList | ShardList, prep: Preprocessing, train: bool):
        self.images = images
        self.prep, self.train = prep, train
        self.augment = TorchvisionAugment.from_preprocessing(prep) if train else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch_seed = key
        source, label = self.images.open(index)  # a shard that does not match its index raises here
        try:
            image = load_rgb(source)
        except Exception as error:
            raise DatasetError(self.images.describe(index, error)) from None
        if self.train:
            # Distinct integer seeds give independent Mersenne-Twister streams.
            rng = random.Random((epoch_seed << 32) | index)
            image = train_image(image, self.prep, rng)
            if self.augment is not None:
                image = self.augment(image, rng)
        else:
            image = val_image(image, self.prep)
        return image, label


class ShardSampler(Sampler):
    """Yields this rank's (index, epoch seed) pairs for the current epoch, in order, from its `start`-th
    (set_epoch sets it to 0). A sample's augmentation is seeded by its index, not its position: starting
    later leaves every later sample as it was."""

    def __init__(self, shard: Callable[[int], np.ndarray], seed: int):
        self.shard, self.seed, self.epoch, self.start = shard, seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = epoch, 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch_seed = derive_seed(self.seed, self.epoch)
        return iter([(int(i), epoch_seed) for i in self.shard(self.epoch)[self.start:]])

    def __len__(self) -> int:
        return len(self.shard(self.epoch)) - self.start


class IndexedLoader:
    """One rank's batches of a dataset indexed by (sample index, epoch seed) pairs (ShardSampler): the
    order and each sample's augmentation come from (seed, epoch) alone. The torchvision loader and
    task=detection's loader (emca/data/coco.py) are this, with their own batches."""

    def __init__(self, dataset: Dataset, shard: Callable[[int], np.ndarray], *, train: bool, batch_size: int,
                 workers: int, seed: int, pin_memory: bool, persistent_workers: bool, prefetch_factor: int,
                 collate_fn: Optional[Callable] = None):
        self.sampler = ShardSampler(shard, seed)
        self.loader = DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, drop_last=train, collate_fn=collate_fn,
            num_workers=workers, pin_memory=pin_memory, persistent_workers=persistent_workers and workers > 0,
            prefetch_factor=prefetch_factor if workers > 0 else None, worker_init_fn=detach_worker,
        )

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def start_at(self, step: int) -> int:
        """After set_epoch: the epoch's iteration begins at batch `step`, the same batch as uninterrupted,
        without loading those before it; returns `step` (all skipped here). len() stays the epoch's."""
        self.sampler.start = step * self.loader.batch_size
        return step

    def __len__(self) -> int:
        return len(self.loader) + self.sampler.start // self.loader.batch_size

    def batches(self) -> Iterator[Any]:
        """The DataLoader's batches, its workers started with stop signals blocked (a signal sent to the
        process group must reach the trainer only), a worker's DatasetError as its one line."""
        with stop_signals_blocked():
            batches = iter(self.loader)
        try:
            yield from batches
        except DatasetError as error:
            # A worker's exception comes back wrapped with its traceback; keep the one-line message.
            raise DatasetError(str(error).rsplit("DatasetError: ", 1)[-1]) from None


class TorchvisionLoader(IndexedLoader):
    """Batches of normalised float32 NCHW images and int64 labels on `device`."""

    def __init__(self, images: ImageList | ShardList, prep: Preprocessing, shard: Callable[[int], np.ndarray], *,
                 train: bool, batch_size: int, workers: int, seed: int, device: torch.device,
                 channels_last: bool, pin_memory: bool, persistent_workers: bool, prefetch_factor: int):
        super().__init__(ImageListDataset(images, prep, train), shard, train=train, batch_size=batch_size,
                         workers=workers, seed=seed, pin_memory=pin_memory and device.type == "cuda",
                         persistent_workers=persistent_workers, prefetch_factor=prefetch_factor)
        self.normalize = BatchNormalizer(prep, device, channels_last)
        self.device = device

    def __iter__(self):
        for images, labels in self.batches():
            yield self.normalize(images), labels.to(self.device, non_blocking=True)
