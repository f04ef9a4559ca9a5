"""The paper's three speeds (docs/paper.md#speeds), in images per second.

FPS                whole pipeline (read, decode, resize, normalise, forward), batch 1, one loader worker
FPS-dagger         the model alone on a synthetic batch of 256 already on the device
FPS-double-dagger  the whole validation pass at batch 256 with 8 loader workers

Each measurement first runs `warmup` untimed batches (allocator, cuDNN autotuning, worker start-up),
then reads the wall clock between two device synchronisations (torch.cuda.synchronize on CUDA): one
after the warm-up, one after the last timed batch. Pipeline passes copy the predictions to the host
after every batch, as an application would.

All three run under the cuDNN settings the checkpoint's run trained with (cudnn_as_trained).

A loader worker prepares batches while the model runs, so FPS is not one image at a time: the batch-1
loader's queues are at their least (SINGLE_IMAGE_QUEUES), which leaves one image read and decoded
ahead of the model (batches_ahead says how many for each loader; none with loader=torchvision and no
worker), and eval.json says so beside each figure.

FPS is timed on a fixed number of images after the warm-up (`max_images`; the paper fixes no count),
so that its cost does not grow with the validation set: batch 1 over a whole set was most of
eval.py's time on a small machine.

A validation pass shorter than the warm-up is measured anyway, never refused: the warm-up is cut so
that at least one batch is timed. Each Throughput records the warm-up asked for, the warm-up run and
the batches timed; `few_batches` flags a figure from fewer than MIN_TIMED_BATCHES timed batches or
after a shortened warm-up (a rough figure: start-up costs weigh on it).
"""

from __future__ import annotations

import contextlib
import platform
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Optional, Sized

import torch
from torch import nn

from emca.data.config import LoaderConfig
from emca.engine.precision import autocast

# eval.json's account of the clock, the same for the three speeds.
CLOCK = ("wall clock between two device synchronisations (torch.cuda.synchronize on CUDA), one after the "
         "untimed warm-up and one after the last timed batch; pipeline passes copy each batch's predictions "
         "to the host")
# The batch-1 loader's queues at LoaderConfig's least (1): DALI's pipeline and its file reader, and each
# DataLoader worker's batches in flight. What is still read and decoded ahead: batches_ahead.
SINGLE_IMAGE_QUEUES = {"prefetch_queue_depth": 1, "dali_reader_prefetch": 1, "prefetch_factor": 1}


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


@contextlib.contextmanager
def cudnn_as_trained(deterministic: bool) -> Iterator[dict[str, bool]]:
    """cuDNN's kernel choice as the run's training made it from trainer.deterministic
    (emca.engine.reproducibility.configure_determinism: autotuned unless deterministic); yields the
    flags set and restores the process's own afterwards.

    torch.use_deterministic_algorithms, which training also sets, is left as it is: for cuDNN it asks
    what cudnn.deterministic does, and the rest of it (fresh tensors filled with NaN, cuBLAS's fixed
    workspace, read once at cuBLAS's first use) chooses no kernel of a forward pass."""
    cudnn = torch.backends.cudnn
    saved = cudnn.benchmark, cudnn.deterministic
    cudnn.benchmark, cudnn.deterministic = not deterministic, deterministic
    try:
        yield {"benchmark": not deterministic, "deterministic": deterministic}
    finally:
        cudnn.benchmark, cudnn.deterministic = saved


def batches_ahead(loader_cfg: dict[str, Any], workers: int) -> int:
    """The most batches the loader reads and decodes while the model works on the one it handed over.

    DALI's PyTorch iterator schedules the pipeline's next run before it returns a batch
    (DALIGenericIterator.__next__ calls _schedule_runs), with up to prefetch_queue_depth runs in
    flight, so at depth 1 too the next batch is decoded during the forward (DALI 2.4 runs a pipeline in
    the calling thread, not beside the model, only with exec_async=False, which DaliLoader does not
    pass). torch's DataLoader keeps prefetch_factor batches per worker in flight (its
    _MultiProcessingDataLoaderIter puts an index each time a batch leaves) and without workers loads a
    batch in this process when asked. Synthetic batches are made once: nothing is read."""
    name = loader_cfg["name"]
    if name == "dali":
        return loader_cfg.get("prefetch_queue_depth", LoaderConfig.prefetch_queue_depth)
    if name == "torchvision":
        return workers * loader_cfg.get("prefetch_factor", LoaderConfig.prefetch_factor)
    return 0


def describe_loading(loader_cfg: dict[str, Any], workers: int) -> str:
    """How a pipeline speed's batches reached the model, in words (eval.json's `timing`)."""
    name, ahead = loader_cfg["name"], batches_ahead(loader_cfg, workers)
    if name == "dali":
        # DaliLoader runs max(1, workers) CPU threads.
        who, queue = f"loader=dali, {max(1, workers)} CPU thread(s)", f"loader.prefetch_queue_depth={ahead}"
    elif name == "torchvision" and workers:
        who, queue = (f"loader=torchvision, {workers} worker process(es)",
                      f"{workers} x loader.prefetch_factor={ahead // workers}")
    elif name == "torchvision":
        return "loader=torchvision without worker processes: each batch read and decoded when the model asks for it"
    else:
        return f"loader={name}: batches made once on the device, nothing read or decoded"
    return f"{who}, up to {ahead} batch(es) read and decoded ahead while the model runs ({queue})"


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
    last_batch: int = 0,
) -> Throughput:
    """Images per second of loading + inference over one pass of the loader (after up to `warmup`
    batches, fewer where the pass is short, so that one batch at least is timed), up to max_images
    images (None: to the end of the pass). No batch beyond the last timed one is read. `last_batch`:
    the size of the pass's last batch where it is smaller than the others (0: none)."""
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
    if last_batch and warmup_run:
        # With cudnn.benchmark cuDNN autotunes each input shape it has not seen: the smaller last batch's
        # shape is seen here, untimed, not in the timed pass.
        _forward(model, images[:last_batch], amp_dtype).argmax(dim=1).cpu()
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
