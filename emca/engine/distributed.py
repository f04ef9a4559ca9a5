"""One process per device, launched by torchrun (single or multi node) or as a plain process.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; with WORLD_SIZE > 1 the
process group is created from them: NCCL when training on CUDA, gloo on CPU.
"""

from __future__ import annotations

import atexit
import datetime
import functools
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist


def env_rank() -> int:
    """The global rank torchrun gave this process (0 for a plain process); readable before any
    process group exists, e.g. while Hydra composes the config."""
    return int(os.environ.get("RANK", "0"))


def scratch_run_dir() -> str:
    """Where a non-zero rank lets Hydra put its own job folder.

    Hydra creates a job folder in every process, each from its own clock; the run folder is rank
    0's, announced over the process group, and this scratch folder is removed once it is known.
    """
    return os.path.join(tempfile.gettempdir(), f"emca-rank{env_rank()}-{os.getpid()}")


def silence_non_main_logging() -> None:
    """Only rank 0 writes train.log and reports progress; other ranks keep their warnings and
    errors on the console."""
    if env_rank() == 0:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(logging.WARNING)


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    # CPU-side group for tiny host-level agreements (e.g. the stop flag) that should not
    # synchronise the GPU stream; the default group itself when that is already gloo.
    host_group: Optional[Any] = None

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.is_distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce(self, tensor: torch.Tensor, op: "dist.ReduceOp") -> torch.Tensor:
        if self.is_distributed:
            dist.all_reduce(tensor, op=op)
        return tensor

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on at least one (host side, no GPU sync)."""
        if not self.is_distributed:
            return flag
        value = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.host_group)
        return bool(value.item())

    def broadcast_from_main(self, obj: Any) -> Any:
        """Rank 0's value of `obj` (any picklable object) on every rank."""
        if not self.is_distributed:
            return obj
        holder = [obj if self.is_main else None]
        dist.broadcast_object_list(holder, src=0, group=self.host_group)
        return holder[0]

    def all_gather_object(self, obj: Any) -> list:
        """Every rank's `obj` (any picklable object), in rank order, on every rank."""
        if not self.is_distributed:
            return [obj]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self.host_group)
        return gathered

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics drift apart per rank
        under DDP), so that validation and the saved checkpoint see the same model."""
        if self.is_distributed:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)


# How a failed collective reads (beside torch.distributed.DistError: DistBackendError, DistNetworkError).
# gloo's timeouts and lost connections are plain RuntimeErrors; gloo says "Application timeout caused
# pair closure" when the timeout hits a pair mid-transfer (seen in DDP's buffer broadcast at the start of
# a forward). NCCL's (torch 2.14, torch/csrc/distributed/c10d): a collective past its timeout is a
# DistBackendError "[Rank r] Watchdog caught collective operation timeout: WorkNCCL(...) ran for N
# milliseconds before timing out." (WorkNCCL::checkTimeout), every later collective on the aborted
# communicator one of "NCCL communicator was aborted on rank r." (NCCLComm::getNcclComm), a lost peer
# "NCCL error in: ... ncclRemoteError ..." (C10D_NCCL_CHECK); the torchcomms backend (TORCH_DIST_USE_NCCL2=1)
# raises plain RuntimeErrors "NCCL operation timed out", "NCCL communicator was aborted after a previous
# error" and "NCCL Async Error".
COLLECTIVE_FAILURES = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer",
                       "Application timeout caused pair closure", "Watchdog caught collective operation timeout",
                       "NCCL communicator was aborted", "NCCL error", "NCCL operation timed out", "NCCL Async Error")


def is_collective_failure(error: BaseException) -> bool:
    """Whether `error` is a collective that timed out or lost a rank (not a bug of ours)."""
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and any(text in str(error) for text in COLLECTIVE_FAILURES))


# How an NCCL collective that outlives trainer.dist_timeout_s ends (torch 2.14, ProcessGroupNCCL.cpp):
# the watchdog thread finds it (WorkNCCL::checkTimeout), waits 4 x TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC
# (60 s) for the flight-recorder dump, then acts by TORCH_NCCL_ASYNC_ERROR_HANDLING, read when the process
# group is built: 3 (SkipCleanUp, the default) and 1 (TearDown, what torchrun sets for its workers)
# rethrow the timeout on the watchdog thread, which ends the process (std::terminate) before any handler
# of ours runs; 2 (CleanUpOnly) aborts the communicators and lets the process live: GPU work waiting on the
# dead collective ends, and the next collective the rank starts raises DistBackendError ("NCCL
# communicator was aborted on rank r.") in the training thread, where _collective_failures
# (emca.engine.trainer) gives its one line; the process then exits and destroys the group well before the
# heartbeat monitor's own end (TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC, 8 minutes after the dump). Not
# TORCH_NCCL_BLOCKING_WAIT=1: it starts no watchdog, so a timeout is raised only where the CPU waits on a
# collective (Work.wait), which DDP's gradient buckets never do, and each such wait (DDP's buffer
# broadcast in every forward) would hold the host until the GPU is done. Nothing computed after a failed
# collective is saved: Trainer._save waits for the GPU (its finiteness check), then starts collectives
# (broadcast_buffers) before rank 0 writes, and those raise on an aborted communicator.
NCCL_ERROR_HANDLING, NCCL_CLEAN_UP_ONLY = "TORCH_NCCL_ASYNC_ERROR_HANDLING", "2"


def resolve_device(requested: str, local_rank: int = 0, option: str = "trainer.device") -> torch.device:
    """auto | cpu | cuda -> this rank's device; `option` names the setting in error messages."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option}=cuda but no CUDA device is available (use {option}=cpu or auto)")
        return torch.device("cuda", local_rank)
    if requested == "cpu":
        return torch.device("cpu")
    raise ValueError(f"{option}={requested!r}: expected auto, cpu or cuda")


def setup_distributed(requested_device: str, device_option: str = "trainer.device",
                      timeout_s: Optional[float] = None) -> DistributedContext:
    """Join the process group torchrun describes (once per process: multirun jobs reuse it).

    `timeout_s`: how long a collective waits for the other ranks before it fails (None: PyTorch's
    default); a stopped or hung rank then becomes an error on every other rank, not a hang.
    """
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(
            f"trainer.dist_timeout_s={timeout_s} must be > 0 (seconds a collective waits for the other ranks)"
        )
    rank = env_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(requested_device, local_rank, device_option)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size == 1:
        return DistributedContext(rank=0, local_rank=local_rank, world_size=1, device=device)

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            os.environ[NCCL_ERROR_HANDLING] = NCCL_CLEAN_UP_ONLY
        # The timeout reaches NCCL's process group too (torch's _create_nccl_process_group sets its
        # options' _timeout from it); without it NCCL would wait its own default, 10 minutes.
        timeout = datetime.timedelta(seconds=timeout_s) if timeout_s is not None else None
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None, timeout=timeout)
        atexit.register(dist.destroy_process_group)
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device,
                              host_group=_host_group(timeout_s))


@functools.cache
def _host_group(timeout_s: Optional[float]) -> Optional[Any]:
    if dist.get_backend() == "gloo":
        return None
    return dist.new_group(
        backend="gloo", timeout=datetime.timedelta(seconds=timeout_s) if timeout_s is not None else None
    )


def shared_run_dir(ctx: DistributedContext, own_run_dir: str) -> str:
    """Rank 0's Hydra output folder, on every rank; a non-zero rank's scratch folder is removed."""
    run_dir = ctx.broadcast_from_main(own_run_dir)
    if not ctx.is_main and os.path.abspath(own_run_dir) == scratch_run_dir():
        shutil.rmtree(own_run_dir, ignore_errors=True)
    return run_dir
