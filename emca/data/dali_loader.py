"""The DALI loader: fn-API pipelines behind DALI's PyTorch iterator.

With a CUDA device, JPEGs are decoded by the `mixed` (nvJPEG) decoder and augmented on the rank's
GPU; without one, the whole pipeline runs on CPU threads (device_id=None).

Reproducibility: every epoch gets a fresh pipeline reading this rank's files in the order that
sampling.train_shard gives for (seed, epoch), with the pipeline seed derived from
(seed, epoch, rank). Epoch e therefore looks the same whether or not epochs 0..e-1 ran before it.
A pipeline build costs well under a second, negligible next to an epoch.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from .errors import DatasetError
from .folder import ImageList, find_undecodable
from .sampling import derive_seed
from .transforms import Preprocessing

READER = "Reader"


@pipeline_def
def train_pipeline(files, labels, prep: Preprocessing, gpu: bool, channels_last: bool):
    encoded, label = fn.readers.file(files=files, labels=labels, random_shuffle=False, name=READER)
    decoder, device = ("mixed", "gpu") if gpu else ("cpu", "cpu")
    size = prep.image_size
    if prep.train_crop == "random_resized":
        # Decoding only the sampled window (ROI decode) is much cheaper than decode-then-crop.
        images = fn.decoders.image_random_crop(
            encoded, device=decoder, output_type=types.RGB,
            random_area=list(prep.crop_scale), random_aspect_ratio=list(prep.crop_ratio), num_attempts=10,
        )
        images = fn.resize(images, device=device, resize_x=size, resize_y=size)
        window = {}
    else:
        images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
        images = fn.resize(images, device=device, resize_x=size, resize_y=size)
        pad = prep.crop_padding
        # A centred crop larger than the image zero-pads it evenly; the final crop then starts at one
        # of the 2*pad+1 integer offsets, exactly like pad-then-RandomCrop.
        images = fn.crop(images, device=device, crop=[size + 2 * pad] * 2, out_of_bounds_policy="pad", fill_values=0)
        offsets = [k / (2 * pad) for k in range(2 * pad + 1)] if pad else [0.5]
        window = dict(
            crop=[size, size],
            crop_pos_x=fn.random.uniform(values=offsets),
            crop_pos_y=fn.random.uniform(values=offsets),
        )
    mirror = fn.random.coin_flip(probability=0.5) if prep.hflip else 0
    images = _normalize(images, prep, device, channels_last, mirror=mirror, **window)
    return images, label


@pipeline_def
def val_pipeline(files, labels, prep: Preprocessing, gpu: bool, channels_last: bool):
    encoded, label = fn.readers.file(files=files, labels=labels, random_shuffle=False, pad_last_batch=True, name=READER)
    decoder, device = ("mixed", "gpu") if gpu else ("cpu", "cpu")
    images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
    images = fn.resize(images, device=device, resize_shorter=prep.val_resize)
    images = _normalize(images, prep, device, channels_last, crop=[prep.image_size] * 2)
    return images, label


def _normalize(images, prep: Preprocessing, device: str, channels_last: bool, **crop_and_mirror):
    return fn.crop_mirror_normalize(
        images, device=device, dtype=types.FLOAT, output_layout="HWC" if channels_last else "CHW",
        mean=list(prep.mean), std=list(prep.std), **crop_and_mirror,
    )


class DaliLoader:
    """Batches of normalised float32 NCHW images and int64 labels on `device`."""

    def __init__(self, images: ImageList, prep: Preprocessing, shard: Callable[[int], np.ndarray], *,
                 train: bool, batch_size: int, workers: int, seed: int, rank: int, device: torch.device,
                 channels_last: bool, prefetch_queue_depth: int, use_gpu: bool):
        self.images, self.prep, self.shard, self.train = images, prep, shard, train
        self.batch_size, self.threads = batch_size, max(1, workers)
        self.seed, self.rank, self.epoch = seed, rank, 0
        self.device, self.channels_last = device, channels_last
        self.prefetch_queue_depth = prefetch_queue_depth
        self.gpu = use_gpu and device.type == "cuda" and torch.cuda.is_available()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        samples = len(self.shard(self.epoch))
        return samples // self.batch_size if self.train else math.ceil(samples / self.batch_size)

    def _pipeline(self, indices: np.ndarray):
        build = train_pipeline if self.train else val_pipeline
        return build(
            files=[self.images.paths[i] for i in indices],
            labels=self.images.labels[indices].tolist(),
            prep=self.prep,
            gpu=self.gpu,
            channels_last=self.channels_last,
            batch_size=self.batch_size,
            num_threads=self.threads,
            device_id=(self.device.index if self.device.index is not None else torch.cuda.current_device())
            if self.gpu
            else None,
            seed=derive_seed(self.seed, self.epoch, self.rank),
            prefetch_queue_depth=self.prefetch_queue_depth,
        )

    def __iter__(self):
        indices = self.shard(self.epoch)
        if len(indices) == 0:  # more ranks than validation images
            return
        policy = LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL
        done = 0
        try:
            batches = DALIGenericIterator(
                [self._pipeline(indices)], ["images", "labels"], reader_name=READER, last_batch_policy=policy
            )
            for (batch,) in batches:
                yield (
                    self._to_torch(batch["images"]),
                    batch["labels"].view(-1).to(self.device, torch.int64, non_blocking=True),
                )
                done += 1
        except RuntimeError as error:
            raise self._decode_error(indices, done, error) from None

    def _decode_error(self, indices: np.ndarray, done: int, error: RuntimeError) -> DatasetError:
        """DALI's decode errors do not name the file: look for it among the batches in flight."""
        in_flight = indices[done * self.batch_size:(done + self.prefetch_queue_depth + 2) * self.batch_size]
        culprit = find_undecodable([self.images.paths[i] for i in in_flight])
        if culprit is not None:
            return DatasetError(culprit[1].describe(culprit[0]))
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return DatasetError(
            f"DALI pipeline failed and no undecodable file was found near batch {done}: {' '.join(lines[-4:])}"
        )

    def _to_torch(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            # NHWC memory seen as NCHW: exactly torch.channels_last strides, no copy.
            images = images.permute(0, 3, 1, 2)
        return images.to(self.device, non_blocking=True)
