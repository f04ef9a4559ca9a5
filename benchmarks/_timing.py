"""Shared measuring tools of the benchmark scripts: interleaved timing, peak memory, tables.

Timings are taken round-robin over the variants (A B C A B C ...) and summarised by their median,
so that a burst of load on a shared machine hits every variant alike instead of one of them.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

# torch.utils.benchmark imports torch.utils.cpp_extension, which warns "No CUDA runtime is found" on a
# machine that has a CUDA_HOME but no GPU; it concerns building CUDA extensions, which no benchmark does.
# The filter goes on before anything imports that module (a script imports _timing first for this).
logging.getLogger("torch.utils.cpp_extension").addFilter(
    lambda record: not record.getMessage().startswith("No CUDA runtime is found")
)

import torch  # noqa: E402
from torch._C._profiler import _EventType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils import benchmark  # noqa: E402

from emca.engine.distributed import resolve_device  # noqa: E402

MIB = 2**20


def add_run_arguments(parser) -> None:
    """The device, precision, memory-format and clock options every timed script takes."""
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads with --clock wall (the cpu clock runs one thread)"
    )
    parser.add_argument(
        "--clock",
        choices=CLOCKS,
        default=None,
        help="wall time, or process CPU time on one thread (default: cpu on a CPU device, wall on CUDA)",
    )
    parser.add_argument("--allocator", choices=ALLOCATORS, default="keep",
                        help="CPU only. keep: malloc keeps freed memory for the next step, as CUDA's caching allocator "
                             "does (default); system: glibc's own policy, which returns it to the kernel")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (f"cpu: {cpu_model()} ({os.cpu_count()} cores), {torch.get_num_threads()} torch thread(s), "
            f"torch {torch.__version__}")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


CLOCKS = ("wall", "cpu")


def choose_clock(device: torch.device, clock: str | None, threads: int | None) -> str:
    """Default: wall time on CUDA, process CPU time on one thread on a CPU.

    CPU time is only meaningful with one torch thread: idle OpenMP workers spin while they wait,
    and on a loaded machine that spinning, not the work, dominates the CPU time of a second thread.
    """
    clock = clock or ("wall" if device.type == "cuda" else "cpu")
    if clock == "cpu":
        if threads not in (None, 1):
            raise SystemExit("--clock cpu measures one thread: drop --threads or use --clock wall")
        torch.set_num_threads(1)
    elif threads:
        torch.set_num_threads(threads)
    return clock


ALLOCATORS = ("keep", "system")
# mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse instead of handing them back to the kernel.

    By default glibc serves blocks above a moving threshold with mmap and trims the heap on free, so
    a step's activations often land on fresh pages that the kernel must fault in and zero: 0 to
    25,000 faults per R-50 step on our machine (up to 9 % of its time), their number set by what
    the process allocated before, not by the model being timed. That noise swamped the few per cent
    the model comparisons look for. CUDA's caching allocator never returns memory between steps, so
    keeping it is also the closer CPU stand-in for a GPU run. After this, every block comes from the
    heap and the heap never shrinks; it still grows (a fault per new page) until it holds the
    largest step. False where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1)) and bool(mallopt(M_MMAP_MAX, 0))


def page_faults() -> int:
    """Minor page faults of this process so far (pages the kernel had to map on first touch)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def prepare_run(args) -> torch.device:
    """The device, the clock (stored back on args.clock), the CPU allocator policy (args.allocator,
    'system' where it cannot be changed) and cuDNN autotuning, as every timed script wants."""
    try:
        device = resolve_device(args.device, option="--device")
    except ValueError as error:
        raise SystemExit(str(error)) from None
    args.clock = choose_clock(device, args.clock, args.threads)
    if device.type == "cpu" and args.allocator == "keep" and not keep_freed_memory():
        args.allocator = "system"
    torch.backends.cudnn.benchmark = True
    return device


def describe_allocator(device: torch.device, allocator: str, faults_per_call: float, call: str = "step") -> str:
    """The header line on the allocator; faults_per_call: the most of any variant (Timing.faults_per_call),
    `call` what one timed call runs (a step, an epoch)."""
    if device.type == "cuda":
        return "CUDA caching allocator"
    policy = (
        "malloc keeps freed memory (--allocator keep)" if allocator == "keep" else "the C library's own malloc policy"
    )
    return f"{policy}; at most {faults_per_call:.0f} page faults per timed {call} of any variant"


@dataclass(frozen=True)
class Timing:
    """Seconds per call over the rounds: the median, and the spread (max - min) / median; and the
    process' minor page faults per call during them."""

    samples: tuple[float, ...]
    faults_per_call: float = 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        return (max(self.samples) - min(self.samples)) / self.median

    def ratio_to(self, other: "Timing") -> float:
        """Median of the per-round ratios: each pairs two measurements taken moments apart, so a
        change of load between rounds cancels out."""
        return statistics.median(self.round_ratios(other))

    def round_ratios(self, other: "Timing") -> list[float]:
        return [a / b for a, b in zip(self.samples, other.samples, strict=True)]


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median: the k-th smallest and k-th largest
    value, k the largest rank with P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2. Too few values
    for that confidence (n < 6 at 95 %) give the whole range."""
    ordered = sorted(values)
    n, tail = len(ordered), (1 - confidence) / 2
    k, below = 0, 0.0
    while k < n // 2 and below + math.comb(n, k) / 2**n <= tail:
        below += math.comb(n, k) / 2**n
        k += 1
    return (ordered[k - 1], ordered[n - k]) if k else (ordered[0], ordered[-1])


def ratio_verdict(ratios: Sequence[float], limit: float, strict: bool = False) -> str:
    """'1.043x (95% CI 1.031-1.052): PASS' for a target of ratio <= limit (< limit if strict).

    The verdict follows the median of the per-round ratios, and says 'within noise' when the 95 %
    confidence interval of that median lies on both sides of the limit: more rounds, or a quieter
    machine, could give the other answer, so it must not be read as a clear pass or miss.
    """
    median = statistics.median(ratios)
    low, high = median_interval(ratios)
    holds = (lambda r: r < limit) if strict else (lambda r: r <= limit)
    verdict = "PASS" if holds(median) else "MISS"
    if holds(low) != holds(high):
        verdict += ", within noise"
    return f"{median:.3f}x (95% CI {low:.3f}-{high:.3f}): {verdict}"


def interleaved_timings(
    steps: Mapping[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    steps_per_round: int = 1,
    clock: str = "wall",
) -> dict[str, Timing]:
    """Seconds per call of every step, measured in `rounds` round-robin passes.

    clock='wall': torch.utils.benchmark's timer, which synchronises CUDA around each measurement.
    clock='cpu': the process' CPU time (time.process_time). On a CPU shared with other jobs, wall
    time also counts the time the scheduler gave to them; CPU time counts only this process' work,
    which is what a cost comparison needs. Either way the Timer keeps the process' thread count
    (its own default is one thread).
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    timer_fn = {"cpu": time.process_time}.get(clock, benchmark.utils.timer.timer)
    timers = {
        name: benchmark.Timer(
            stmt="step()", globals={"step": step}, timer=timer_fn, num_threads=torch.get_num_threads()
        )
        for name, step in steps.items()
    }
    # Warm up round-robin too, so the allocator meets the interleaved sequence of step sizes before
    # the timing does.
    for _ in range(warmup):
        for step in steps.values():
            step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    faults = dict.fromkeys(steps, 0)
    for _ in range(rounds):
        for name, timer in timers.items():
            before = page_faults()
            samples[name].append(timer.timeit(steps_per_round).median)
            faults[name] += page_faults() - before
    return {name: Timing(tuple(times), faults[name] / (rounds * steps_per_round)) for name, times in samples.items()}


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def peak_memory(step: Callable[[], object], device: torch.device, resident_bytes: int) -> int:
    """Peak bytes of tensor memory while `step` runs, the memory already resident included.

    CUDA: torch.cuda.max_memory_allocated (the caching allocator's own count of live tensors).
    CPU: there is no such counter, so the profiler records every allocation and free of the CPU
    allocator during the step; the peak of their running sum is what the step adds on top of
    `resident_bytes` (the caller's count of weights, buffers and inputs alive before the step).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    with profiler_chatter_dropped(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # Only frees of blocks allocated during this step count: the profiler also reports frees of
    # blocks it saw allocated in an earlier profile of the process (another variant's gradients,
    # say), and those would lower the peak by memory the step never held.
    events = sorted(
        (event for event in _event_tree(prof.profiler.kineto_results.experimental_event_tree())
         if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu"),
        key=lambda event: event.start_time_ns,
    )
    live = peak = 0
    allocated: set[int] = set()
    for block in (event.extra_fields for event in events):
        if block.alloc_size > 0:
            allocated.add(block.ptr)
        elif block.ptr in allocated:
            allocated.discard(block.ptr)
        else:
            continue
        live += block.alloc_size
        peak = max(peak, live)
    return resident_bytes + peak


# What torch.profiler's C++ side writes to stderr around every profile, none of it about the step:
# Kineto's trace markers (logged at a level above its errors, so no KINETO_LOG_LEVEL hides them alone),
# its failed GPU query on a machine without CUDA (the profile records the CPU only), and c10's note on
# frees of blocks allocated before the profile (which peak_memory leaves out itself).
PROFILER_CHATTER = re.compile(
    r"SyncActivityProfilerHandler\.cpp:\d+\] profiler_(start|stop)$"
    r"|DeviceProperties\.cpp:\d+\] gpuGetDeviceCount failed with code \d+$"
    r"|CPUAllocator\.cpp:\d+\] Memory block of unknown size was allocated before the profiling started"
)


@contextlib.contextmanager
def profiler_chatter_dropped():
    """Run the block with file descriptor 2 sent to a scratch file, then write back every line of it
    but the profiler's chatter (PROFILER_CHATTER): the step's own errors and warnings still reach
    stderr, after the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as scratch:
        os.dup2(scratch.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            scratch.seek(0)
            lines = scratch.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not PROFILER_CHATTER.search(line.rstrip()))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


def _event_tree(events):
    for event in events:
        yield event
        yield from _event_tree(event.children)


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]], text_columns: int = 1) -> str:
    """Plain-text table: the first `text_columns` columns left-aligned, the figures right-aligned."""
    cells = [[str(v) for v in header]] + [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
