"""The DALI loader: fn-API pipelines behind DALI's PyTorch iterator.

With a CUDA device, JPEGs are decoded by the `mixed` (nvJPEG) decoder and augmented on the rank's
GPU; without one, the whole pipeline runs on CPU threads (device_id=None). Both devices decode with
the one set of options in DECODER. With a CUDA device the images and labels leave the pipeline on the
GPU, also with loader.dali_use_gpu=false (CPU decoding and augmentation): DALI copies them there from
the pinned buffers it gives every CPU output that a GPU node consumes (its executor's
FindPinnedBuffers), ahead of use in its own worker, so no batch crosses from pageable memory and the
training thread never waits on a copy. The PyTorch iterator hands them over without a copy through
DLPack (DALIGenericIterator under DALI's default dynamic executor: torch.from_dlpack), which gives
TensorGPU.__dlpack__ torch's current stream, into which DALI inserts a wait for its own work: their
use is ordered after DALI's writes.

Reproducibility: every epoch gets a fresh pipeline reading this rank's files in the order that
sampling.train_shard gives for (seed, epoch), with the pipeline seed derived from
(seed, epoch, rank). Epoch e therefore looks the same whether or not epochs 0..e-1 ran before it.
A pipeline build costs well under a second, negligible next to an epoch; with dataset.auto_augment,
defining the policy's conditional graph adds 1.5-3 s (measured on 2 CPU cores).

A resumed epoch starts at its step k (start_at) without reading the k batches' files: DALI 2.4's random
operators draw from counter-based Philox generators whose state for sample slot i of a pipeline's
b-th batch is a function of (operator seed, b, i) alone (OperatorWithRng in the installed
include/dali/operators/random/rng_base.h: the master counter advances by the batch size each run,
every slot's generator skips ahead from it; RandomCropAttr in image/crop/random_crop_attr.h reseeds the
decoder's crop-window generators from it each batch), never of the images; inside a policy's
branches the counters advance by the samples that took the branch, chosen by such generators too. So
the reader gets a small stand-in JPEG in place of each of the first k*batch_size files and the loader
drops those k batches: every later sample meets the generator state of the uninterrupted run. The
stand-in batches still pass the graph (a 64x64 decode, resize, augmentation), a small fraction of
decoding the files.
Over tar shards nothing is skipped (the shuffle buffer's draws depend on every sample read before).

Tar shards (dataset.format=shards, ShardSource) keep those guarantees with fn.readers.webdataset,
which reads each shard sequentially: a fresh pipeline per epoch, the shard order from (seed, epoch),
the shuffle buffer seeded from (seed, epoch, rank), the same number of steps on every rank and each
validation image once. What differs from the folders and from loader=torchvision over the same
shards (which reads the samplers' order at the index offsets): the order within an epoch, which is
a shard permutation plus a local shuffle instead of one permutation of all samples, and the ranks'
validation slices (DALI's split, N*r//k onwards, instead of sampling.val_shard's); the total is the
same. The images, labels, augmentation graph and decoders are those of the folders.
"""
from __future__ import annotations

import functools
import itertools
import math
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.auto_aug import augmentations as a
from nvidia.dali.auto_aug import auto_augment, rand_augment, trivial_augment
from nvidia.dali.auto_aug.core import Policy, augmentation
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
from PIL import Image

from emca.data.config import LoaderConfig
from emca.data.errors import DatasetError
from emca.data.folder import ImageList, open_image
from emca.data.policies import (
    AUTOAUGMENT_BINS,
    AUTOAUGMENT_IMAGENET,
    ERASE_ATTEMPTS,
    ERASE_RATIO,
    ERASE_SCALE,
    RANDAUGMENT_BINS,
    erase_fill,
)
from emca.data.sampling import derive_seed, shard_order
from emca.data.shards import LABEL_EXT, ShardList
from emca.data.transforms import Preprocessing

READER = "Reader"
# The decoders' options, the same for the `cpu` and `mixed` devices. nvJPEG upsamples subsampled chroma
# as libjpeg-turbo and PIL do only with jpeg_fancy_upsampling (off in DALI by default); its CPU decoders
# always do and ignore the flag (imgcodec/image_decoder.h).
DECODER = dict(output_type=types.RGB, jpeg_fancy_upsampling=True)
# The side of the stand-in JPEG read in place of a skipped batch's files.
STAND_IN_SIZE = 64


def reader_options(loader: LoaderConfig) -> dict:
    """The loader.dali_* reader options, as both readers (fn.readers.file, fn.readers.webdataset) take them."""
    return dict(dont_use_mmap=loader.dali_dont_use_mmap, read_ahead=loader.dali_read_ahead,
                prefetch_queue_depth=loader.dali_reader_prefetch)


@functools.cache
def _stand_in_folder() -> tempfile.TemporaryDirectory:
    """A private folder (removed at exit) holding stand-in.jpg, a grey STAND_IN_SIZE JPEG."""
    folder = tempfile.TemporaryDirectory(prefix="emca-dali-")
    Image.new("RGB", (STAND_IN_SIZE, STAND_IN_SIZE), (128, 128, 128)).save(Path(folder.name) / "stand-in.jpg")
    return folder


class FileSource:
    """This rank's image files in the order sampling gives for each epoch, read by fn.readers.file."""

    skips_files = True

    def __init__(self, images: ImageList, shard: Callable[[int], np.ndarray], train: bool):
        self.images, self.shard, self.train = images, shard, train

    def samples(self, epoch: int) -> int:
        return len(self.shard(epoch))

    def reader(self, epoch: int, options: dict, skip: int) -> Callable:
        """What builds the reader inside the pipeline definition: () -> (encoded, label) nodes; the first
        `skip` files replaced by the stand-in JPEG."""
        indices = self.shard(epoch)
        files, labels = [self.images.paths[i] for i in indices], self.images.labels[indices].tolist()
        if skip:
            files[:skip] = [str(Path(_stand_in_folder().name) / "stand-in.jpg")] * skip
        # Validation pads its last batch with repeats that the iterator (reader_name) leaves out.
        return lambda: fn.readers.file(files=files, labels=labels, random_shuffle=False,
                                       pad_last_batch=not self.train, name=READER, **options)

    def in_flight(self, epoch: int, first: int, stop: int) -> np.ndarray:
        """The samples that can be in batches first..stop-1 (positions in this rank's epoch)."""
        return self.shard(epoch)[first:stop]


class ShardSource:
    """This rank's part of a split packed in tar shards (a ShardList), read by fn.readers.webdataset
    through the shards' index files, each shard from start to end.

    The reader cuts the sequence of shards it is given into world_size contiguous parts of samples
    (shard_id=rank; sizes N*r//k .. N*(r+1)//k, as DALI's readers split). Training visits the shards in
    sampling.shard_order's (seed, epoch) permutation, so a rank reads different whole shards each epoch,
    and shuffles their samples in a buffer of `shuffle_buffer` (the reader's initial_fill) seeded by the
    pipeline seed, derived from (seed, epoch, rank). Every rank has at least the samples of the whole
    global batches (`shard`'s length, as for every loader) and stops there, so all ranks run the same
    number of steps. Validation reads the shards in order without shuffling: every sample once.
    """

    # What the shuffle buffer draws depends on every sample read before: a resumed epoch reads them all.
    skips_files = False

    def __init__(self, samples: ShardList, shard: Callable[[int], np.ndarray], *, train: bool, seed: int,
                 rank: int, world_size: int, shuffle_buffer: int):
        self.images, self.shard, self.train = samples, shard, train
        self.seed, self.rank, self.world_size, self.shuffle_buffer = seed, rank, world_size, shuffle_buffer

    def samples(self, epoch: int) -> int:
        if self.train:
            return len(self.shard(epoch))
        first, stop = self._part()
        return stop - first

    def _part(self) -> tuple[int, int]:
        """This rank's positions in the reader's sequence of samples (DALI's split into num_shards)."""
        n, k, r = len(self.images), self.world_size, self.rank
        return n * r // k, n * (r + 1) // k

    def _tars(self, epoch: int) -> np.ndarray:
        count = len(self.images.tars)
        return shard_order(count, seed=self.seed, epoch=epoch) if self.train else np.arange(count)

    def reader(self, epoch: int, options: dict, skip: int) -> Callable:
        """What builds the reader inside the pipeline definition: () -> (encoded, label) nodes (`skip`
        is always 0: skips_files)."""
        tars, images = self._tars(epoch), self.images

        def read():
            encoded, text = fn.readers.webdataset(
                paths=[images.tars[t] for t in tars], index_paths=[images.indexes[t] for t in tars],
                ext=[";".join(images.extensions), LABEL_EXT], missing_component_behavior="error",
                num_shards=self.world_size, shard_id=self.rank, random_shuffle=self.train,
                initial_fill=self.shuffle_buffer, pad_last_batch=not self.train, name=READER, **options,
            )
            return encoded, _label(text, images.label_map)

        return read

    def in_flight(self, epoch: int, first: int, stop: int) -> np.ndarray:
        """The samples that can be in batches first..stop-1, newest read first: with the shuffle buffer,
        those read up to `shuffle_buffer` ahead, and (rarely) ones that stayed in it for long."""
        read = np.concatenate([np.flatnonzero(self.images.shard == t) for t in self._tars(epoch)])
        start = self._part()[0]
        if self.train:
            first, stop = max(0, first - _LINGER * self.shuffle_buffer), stop + self.shuffle_buffer
        return read[start + first:start + min(stop, self._part()[1] - start)][::-1]


# A sample stays in a shuffle buffer of F samples for more than 8 F draws with probability e^-8.
_LINGER = 8
# Places of a .cls label parsed in the graph: float32 holds its integers exactly below 2^24.
_LABEL_DIGITS = 7


def _label(text, label_map: np.ndarray):
    """A .cls member (ASCII decimal digits) as an int64 label, through label_map (the packed class
    index -> the index into the loader's classes)."""
    digits = fn.pad(fn.cast(text, dtype=types.FLOAT) - 48, shape=[_LABEL_DIGITS], fill_value=0)
    place = types.Constant(np.arange(_LABEL_DIGITS, dtype=np.float32))
    powers = dmath.pow(10.0, fn.cast(text.shape(), dtype=types.FLOAT) - 1 - place)
    value = fn.cast(dmath.floor(fn.reductions.sum(digits * powers) + 0.5), dtype=types.INT32)
    return fn.lookup_table(value, keys=list(range(len(label_map))), values=label_map.tolist(), dtype=types.INT64,
                           default_value=-1)


def _first_undecodable(images, indices: np.ndarray) -> Optional[str]:
    """The one-line problem of the first of `indices` that PIL cannot read and fully decode, if any."""
    for index in indices:
        try:
            file, _ = images.open(int(index))
            with open_image(file) as image:
                image.load()
        except DatasetError as error:  # a shard member that does not match its index
            return str(error)
        except Exception as error:
            return images.describe(int(index), error)
    return None


def _on(cuda: bool, images, label):
    """The pipeline's outputs, moved to the GPU inside it when the batches go to a CUDA device."""
    return (images.gpu(), label.gpu()) if cuda else (images, label)


@pipeline_def
def train_pipeline(read: Callable, prep: Preprocessing, gpu: bool, cuda: bool, channels_last: bool):
    encoded, label = read()
    decoder, device = ("mixed", "gpu") if gpu else ("cpu", "cpu")
    images, window = _train_crop(encoded, prep, decoder, device)
    mirror = fn.random.coin_flip(probability=0.5) if prep.hflip else 0
    if prep.auto_augment is None and not prep.random_erasing:
        return _on(cuda, _normalize(images, prep, device, channels_last, mirror=mirror, **window), label)
    # The policy and erasing work on the final uint8 crop, after the flip (torchvision's order: crop,
    # flip, policy, erase, normalise), so the last crop and the flip leave crop_mirror_normalize.
    if window:
        images = fn.crop(images, device=device, **window)
    if prep.hflip:
        images = fn.flip(images, device=device, horizontal=mirror)
    if prep.auto_augment is not None:
        images = _policy(images, prep)
    if prep.random_erasing:
        images = _erase(images, prep)
    return _on(cuda, _normalize(images, prep, device, channels_last), label)


def _train_crop(encoded, prep: Preprocessing, decoder: str, device: str):
    """(decoded images, the crop_mirror_normalize window that finishes the crop: empty when done)."""
    size = prep.image_size
    if prep.train_crop == "random_resized":
        # Decoding only the sampled window (ROI decode) is much cheaper than decode-then-crop.
        images = fn.decoders.image_random_crop(
            encoded, device=decoder, random_area=list(prep.crop_scale), random_aspect_ratio=list(prep.crop_ratio),
            num_attempts=10, **DECODER,
        )
        return fn.resize(images, device=device, resize_x=size, resize_y=size), {}
    images = fn.decoders.image(encoded, device=decoder, **DECODER)
    images = fn.resize(images, device=device, resize_x=size, resize_y=size)
    pad = prep.crop_padding
    # A centred crop larger than the image zero-pads it evenly; the final crop then starts at one
    # of the 2*pad+1 integer offsets, exactly like pad-then-RandomCrop.
    images = fn.crop(images, device=device, crop=[size + 2 * pad] * 2, out_of_bounds_policy="pad", fill_values=0)
    offsets = [k / (2 * pad) for k in range(2 * pad + 1)] if pad else [0.5]
    return images, dict(
        crop=[size, size],
        crop_pos_x=fn.random.uniform(values=offsets),
        crop_pos_y=fn.random.uniform(values=offsets),
    )


# DALI's own sharpness and equalize (auto_aug.augmentations) call the fn.experimental aliases, which
# DALI 2.4 deprecates with a warning it forces on at every pipeline definition: each epoch.
@augmentation(param_device="auto")
def _sharpness(data, kernel):
    return fn.filter(data, kernel)


@augmentation
def _equalize(data, _):
    return fn.equalize(data)


def _augmentation_space(size: int, bins: int, wide: bool) -> dict:
    """torchvision's operations and magnitudes (transforms.v2 RandAugment's and AutoAugment's
    _AUGMENTATION_SPACE, or with `wide` TrivialAugmentWide's) as nvidia.dali.auto_aug augmentations,
    keyed by torchvision's names.

    The magnitudes are torchvision's own float32 torch.linspace values (numpy's differ in the last
    bit, enough to move a truncated translation by a pixel). DALI's suites differ from these in small
    ways (solarize thresholds 256..0, TrivialAugment's enhance range from 0.01, fractional shifts).
    """
    def linspace(start: float, end: float) -> np.ndarray:
        return torch.linspace(start, end, bins).numpy()

    shear, rotate, enhance, posterize_bits = (0.99, 135.0, 0.99, 6) if wide else (0.3, 30.0, 0.9, 4)
    # Whole pixels, truncated as torchvision does (RandAugment's and AutoAugment's scale with the image).
    offsets = np.trunc(linspace(0.0, 32.0 if wide else 150.0 / 331.0 * size))
    bits = (8 - torch.arange(bins) / ((bins - 1) / posterize_bits)).round().int().numpy()
    # torchvision inverts pixels >= 255 * magnitude, compared in float32; DALI keeps those below it.
    thresholds = (255 * linspace(1.0, 0.0).astype(np.float64)).astype(np.float32)
    return {
        "Identity": a.identity,
        # DALI's shear by +s is torchvision's by -s: negated, every bin and sign gives torchvision's image.
        "ShearX": a.shear_x.augmentation(linspace(0.0, shear), True, lambda magnitude: [-magnitude, 0]),
        "ShearY": a.shear_y.augmentation(linspace(0.0, shear), True, lambda magnitude: [0, -magnitude]),
        "TranslateX": a.translate_x_no_shape.augmentation(offsets, True),
        "TranslateY": a.translate_y_no_shape.augmentation(offsets, True),
        "Rotate": a.rotate.augmentation(linspace(0.0, rotate), True),
        "Brightness": a.brightness.augmentation(linspace(0.0, enhance), True, a.shift_enhance_range),
        "Color": a.color.augmentation(linspace(0.0, enhance), True, a.shift_enhance_range),
        "Contrast": a.contrast.augmentation(linspace(0.0, enhance), True, a.shift_enhance_range),
        "Sharpness": _sharpness.augmentation(linspace(0.0, enhance), True, a.sharpness_kernel, name="sharpness"),
        "Posterize": a.posterize.augmentation(bits, False, a.poster_mask_uint8),
        "Solarize": a.solarize.augmentation(thresholds, False),
        "AutoContrast": a.auto_contrast,
        "Equalize": _equalize.augmentation(name="equalize"),
        "Invert": a.invert,
    }


def _policy(images, prep: Preprocessing):
    """dataset.auto_augment on uint8 HWC images (the pipeline needs enable_conditionals)."""
    # torchvision's defaults for the geometric operations: nearest-neighbour sampling, black fill.
    warp = dict(fill_value=0, interp_type=types.INTERP_NN)
    if prep.auto_augment == "autoaugment":
        space = _augmentation_space(prep.image_size, AUTOAUGMENT_BINS, wide=False)
        table = [[(space[op], p, magnitude) for op, p, magnitude in stages] for stages in AUTOAUGMENT_IMAGENET]
        return auto_augment.apply_auto_augment(Policy("torchvision_imagenet", AUTOAUGMENT_BINS, table), images, **warp)
    wide = prep.auto_augment == "trivialaugment"
    space = _augmentation_space(prep.image_size, RANDAUGMENT_BINS, wide)
    suite = [augmentation for name, augmentation in space.items() if name != "Invert"]
    if wide:
        return trivial_augment.apply_trivial_augment(suite, images, num_magnitude_bins=RANDAUGMENT_BINS, **warp)
    return rand_augment.apply_rand_augment(suite, images, prep.randaugment_ops, prep.randaugment_magnitude,
                                           num_magnitude_bins=RANDAUGMENT_BINS, **warp)


def _erase(images, prep: Preprocessing):
    """torchvision's RandomErasing on uint8 HWC images of image_size: with probability
    random_erasing, one rectangle filled with the rounded mean pixel.

    Its rejection loop as graph arithmetic: all ERASE_ATTEMPTS (area, aspect) draws are made and the
    first whose rectangle fits is taken (none fitting: no erasing, as torchvision). The same
    distribution as torchvision's, drawn from DALI's generators.
    """
    size, attempts = prep.image_size, ERASE_ATTEMPTS
    area = fn.random.uniform(range=list(ERASE_SCALE), shape=[attempts]) * (size * size)
    aspect = dmath.exp(fn.random.uniform(range=[math.log(r) for r in ERASE_RATIO], shape=[attempts]))
    heights = dmath.floor(dmath.sqrt(area * aspect) + 0.5)
    widths = dmath.floor(dmath.sqrt(area / aspect) + 0.5)
    index = types.Constant(np.arange(attempts, dtype=np.float32))
    fits = (heights < size) & (widths < size)
    # The smallest index that fits (`attempts` when none does), then a one-hot choice of it.
    chosen = index == fn.reductions.min(index + attempts * (fits ^ True))
    erase = fn.random.coin_flip(probability=prep.random_erasing)
    height = fn.reductions.sum(heights * chosen) * erase
    width = fn.reductions.sum(widths * chosen) * erase
    # Uniform integer corners in [0, size - extent]; min() guards against u * n rounding up to n.
    top = dmath.min(dmath.floor(fn.random.uniform(range=[0, 1]) * (size - height + 1)), size - height)
    left = dmath.min(dmath.floor(fn.random.uniform(range=[0, 1]) * (size - width + 1)), size - width)
    return fn.erase(images, anchor=fn.stack(top, left), shape=fn.stack(height, width), axis_names="HW",
                    fill_value=list(erase_fill(prep.mean)))


@pipeline_def
def val_pipeline(read: Callable, prep: Preprocessing, gpu: bool, cuda: bool, channels_last: bool):
    encoded, label = read()
    decoder, device = ("mixed", "gpu") if gpu else ("cpu", "cpu")
    images = fn.decoders.image(encoded, device=decoder, **DECODER)
    images = fn.resize(images, device=device, resize_shorter=prep.val_resize)
    return _on(cuda, _normalize(images, prep, device, channels_last, crop=[prep.val_image_size] * 2), label)


def _normalize(images, prep: Preprocessing, device: str, channels_last: bool, **crop_and_mirror):
    return fn.crop_mirror_normalize(
        images, device=device, dtype=types.FLOAT, output_layout="HWC" if channels_last else "CHW",
        mean=list(prep.mean), std=list(prep.std), **crop_and_mirror,
    )


class DaliLoader:
    """Batches of normalised float32 NCHW images and int64 labels on `device`, from a FileSource
    (image folders) or a ShardSource (tar shards); `reader` holds the readers' options (loader.dali_*).
    `gpu`: decoding and augmentation on the GPU (use_gpu and a CUDA device); `cuda`: the batches leave
    the pipeline on the GPU (a CUDA device)."""

    def __init__(self, source, prep: Preprocessing, *, train: bool, batch_size: int, workers: int, seed: int,
                 rank: int, device: torch.device, channels_last: bool, prefetch_queue_depth: int, use_gpu: bool,
                 reader: dict):
        self.source, self.prep, self.train = source, prep, train
        self.batch_size, self.threads = batch_size, max(1, workers)
        self.seed, self.rank, self.epoch, self.start = seed, rank, 0, 0
        self.device, self.channels_last = device, channels_last
        self.prefetch_queue_depth, self.reader = prefetch_queue_depth, reader
        self.cuda = device.type == "cuda"
        self.gpu = use_gpu and self.cuda

    @classmethod
    def from_files(cls, images: ImageList, prep: Preprocessing, shard: Callable[[int], np.ndarray], **options):
        """Over image folders: the files of `images` that shard(epoch) selects, in its order."""
        return cls(FileSource(images, shard, options["train"]), prep, **options)

    @classmethod
    def from_shards(cls, samples: ShardList, prep: Preprocessing, shard: Callable[[int], np.ndarray], *,
                    world_size: int, shuffle_buffer: int, **options):
        """Over tar shards, dealt to ranks by the reader (ShardSource); shard(epoch) gives the count of
        training samples only."""
        source = ShardSource(samples, shard, train=options["train"], seed=options["seed"], rank=options["rank"],
                             world_size=world_size, shuffle_buffer=shuffle_buffer)
        return cls(source, prep, **options)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = epoch, 0

    def start_at(self, step: int) -> int:
        """After set_epoch: skip the epoch's first `step` batches without reading their files where the
        source allows it (image folders: all, iteration begins at batch `step`, the same batch as
        uninterrupted; tar shards: none) and return how many were skipped. len() stays the epoch's."""
        self.start = step if self.source.skips_files else 0
        return self.start

    def __len__(self) -> int:
        samples = self.source.samples(self.epoch)
        return samples // self.batch_size if self.train else math.ceil(samples / self.batch_size)

    def _pipeline(self):
        build = train_pipeline if self.train else val_pipeline
        return build(
            read=self.source.reader(self.epoch, self.reader, self.start * self.batch_size),
            prep=self.prep,
            gpu=self.gpu,
            cuda=self.cuda,
            channels_last=self.channels_last,
            batch_size=self.batch_size,
            num_threads=self.threads,
            device_id=(self.device.index if self.device.index is not None else torch.cuda.current_device())
            if self.cuda
            else None,
            seed=derive_seed(self.seed, self.epoch, self.rank),
            prefetch_queue_depth=self.prefetch_queue_depth,
            # The policies choose operations per sample with `if` on DataNodes.
            enable_conditionals=self.train and self.prep.auto_augment is not None,
        )

    def __iter__(self):
        if self.source.samples(self.epoch) == 0:  # more ranks than validation images
            return
        policy = LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL
        done = self.start
        try:
            batches = DALIGenericIterator(
                [self._pipeline()], ["images", "labels"], reader_name=READER, last_batch_policy=policy
            )
            # len(self), not the reader's count: a ShardSource's reader holds more training samples than
            # the whole global batches every rank can make. The stand-in batches before `start` are dropped.
            for (batch,) in itertools.islice(batches, self.start, len(self)):
                # Already on `device` (_on): the labels' cast runs there, on the current stream.
                yield self._to_torch(batch["images"]), batch["labels"].view(-1).to(torch.int64)
                done += 1
        except RuntimeError as error:
            # Out of device memory and CUDA errors are no data problem: they leave as what they are. DALI
            # hands every operator's failure over as a RuntimeError (PropagateError, dali/pipeline/operator/
            # error_reporting.cc) that keeps the text of dali::CUDABadAlloc ("CUDA allocation failed",
            # "Can't allocate N bytes on device D.") or dali::CUDAError ("CUDA runtime API error ...", "CUDA
            # driver API error ...": dali/core/cuda_error.h); a file that does not decode reads "Failed to
            # decode sample #...". PyTorch's own (copying the batch to the device) come typed.
            lines = [line.strip() for line in str(error).splitlines()]
            failed = [line for line in lines if "CUDA allocation failed" in line or "bytes on device" in line]
            if failed:
                raise torch.OutOfMemoryError(f"DALI: {failed[0]}") from error
            if isinstance(error, (torch.OutOfMemoryError, torch.AcceleratorError)) or any(
                    "CUDA runtime API error" in line or "CUDA driver API error" in line for line in lines):
                raise
            raise self._decode_error(done, error) from None

    def _decode_error(self, done: int, error: RuntimeError) -> DatasetError:
        """DALI's decode errors do not name the file: look for it among the samples in flight."""
        in_flight = (self.prefetch_queue_depth + self.reader["prefetch_queue_depth"] + 2) * self.batch_size
        first = done * self.batch_size
        culprit = _first_undecodable(self.source.images, self.source.in_flight(self.epoch, first, first + in_flight))
        if culprit is not None:
            return DatasetError(culprit)
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return DatasetError(
            f"DALI pipeline failed and no undecodable file was found near batch {done}: {' '.join(lines[-4:])}"
        )

    def _to_torch(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            # NHWC memory seen as NCHW: exactly torch.channels_last strides, no copy.
            images = images.permute(0, 3, 1, 2)
        return images
