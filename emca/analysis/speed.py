"""The paper's three speeds (docs/paper.md#speeds), in images per second.

FPS                whole pipeline (decode, resize, normalise, forward), batch 1, one loader worker
FPS-dagger         the model alone on a synthetic batch of 256 already on the device
FPS-double-dagger  the whole validation pass at batch 256 with 8 loader workers

Each measurement first runs `warmup` untimed batches (allocator, cuDNN autotuning, worker start-up),
then starts the clock after synchronising the device. Pipeline passes copy the predictions to the
host after every batch, as an application would, which also makes "one image at a time" literal:
an image is finished before the next one is read.

FPS is timed on a fixed number of images after the warm-up (`max_images`; the paper fixes no count),
so that its cost does not grow with the validation set: batch 1 over a whole set was most of
eval.py's time on a small machine.

A validation pass shorter than the warm-up is measured anyway, never refused: the warm-up is cut so
that at least one batch is timed. Each Throughput records the warm-up asked for, the warm-up run and
the batches timed; `few_batches` flags a figure from fewer than MIN_TIMED_BATCHES timed batches or
after a shortened warm-up (a rough figure: start-up costs weigh on it).
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sized

import torch
from torch import nn

from emca.engine.precision import autocast


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe_device(device: torch.device) -> str:
    """The device in words, for the record next to the speeds."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"cpu ({cpu}, {torch.get_num_threads()} threads)"


# Fewer timed batches than this and the figure is flagged: one batch's timer noise and the first
# batches' start-up costs are then a visible share of it.
MIN_TIMED_BATCHES = 10


@dataclass(frozen=True)
class Throughput:
    images: int
    seconds: float
    batch_size: int
    warmup_batches: int  # untimed batches run
    timed_batches: int
    warmup_requested: int
    workers: Optional[int] = None  # loader workers (None: synthetic input, no loader)
    # The images asked to be timed (None: the rest of the pass): with `images` it tells a fixed-count
    # figure from a whole-pass one, and one cut short by a small validation set.
    images_requested: Optional[int] = None

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds

    @property
    def few_batches(self) -> bool:
        return self.timed_batches < MIN_TIMED_BATCHES or self.warmup_batches < self.warmup_requested

    def as_dict(self) -> dict[str, Any]:
        return {"images_per_second": self.images_per_second, "few_batches": self.few_batches, **asdict(self)}


def _forward(model: nn.Module, images: torch.Tensor, amp_dtype: Optional[torch.dtype]) -> torch.Tensor:
    with autocast(images.device.type, amp_dtype):
        return model(images)


@torch.no_grad()
def time_pipeline(
    model: nn.Module,
    loader: Sized,
    device: torch.device,
    *,
    batch_size: int,
    workers: int,
    warmup: int,
    max_images: Optional[int] = None,
    amp_dtype: Optional[torch.dtype] = None,
) -> Throughput:
    """Images per second of loading + inference over one pass of the loader (after up to `warmup`
    batches, fewer where the pass is short, so that one batch at least is timed), up to max_images
    images (None: to the end of the pass). No batch beyond the last timed one is read."""
    if len(loader) == 0:
        raise ValueError("the loader yields no batch to time")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images={max_images} must be an integer >= 1 or None (the whole pass)")
    model.eval()
    warmup_run = min(warmup, len(loader) - 1)
    batches = iter(loader)
    for _ in range(warmup_run):
        images, _ = next(batches)
        _forward(model, images, amp_dtype).argmax(dim=1).cpu()
    synchronize(device)
    started = time.perf_counter()
    images_timed = timed_batches = 0
    for images, _ in batches:
        _forward(model, images, amp_dtype).argmax(dim=1).cpu()
        images_timed += images.shape[0]
        timed_batches += 1
        if max_images is not None and images_timed >= max_images:
            break
    synchronize(device)
    seconds = time.perf_counter() - started
    return Throughput(images_timed, seconds, batch_size, warmup_run, timed_batches, warmup, workers, max_images)


@torch.no_grad()
def time_model(
    model: nn.Module,
    device: torch.device,
    *,
    batch_size: int,
    image_size: int,
    warmup: int,
    iterations: int,
    channels_last: bool = False,
    amp_dtype: Optional[torch.dtype] = None,
) -> Throughput:
    """Images per second of the forward pass alone on a random batch resident on the device."""
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=memory_format)
    for _ in range(warmup):
        _forward(model, images, amp_dtype)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(iterations):
        _forward(model, images, amp_dtype)
    synchronize(device)
    seconds = time.perf_counter() - started
    images = batch_size * iterations
    return Throughput(images, seconds, batch_size, warmup, iterations, warmup, images_requested=images)
