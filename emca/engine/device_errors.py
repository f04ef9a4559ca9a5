"""Device failures named as what they are: a run that runs out of GPU memory stops with one line that
says what ran out (the device, PyTorch's share of its memory), where, at which batch, and what makes
the run fit. It is never reported as a data problem: the DALI loader lets CUDA errors through and
gives DALI's own out-of-device-memory as torch.OutOfMemoryError (emca/data/dali_loader.py)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

from emca.engine.errors import continue_command

if TYPE_CHECKING:
    from emca.engine.trainer import Trainer

GIB = 2**30


def out_of_memory(error: torch.OutOfMemoryError, trainer: Trainer) -> str:
    """The one line of `trainer`'s run that ran out of device memory (in training or validation)."""
    ctx, cfg = trainer.ctx, trainer.cfg
    global_batch = cfg.dataset.batch_size
    per_process = global_batch // ctx.world_size
    who = f"rank {ctx.rank}: " if ctx.is_distributed else ""
    return (f"{who}out of memory on {describe_device(ctx.device)} {_position(trainer)} ({_request(error)}) "
            f"with {per_process} images per process (dataset.batch_size={global_batch} over {ctx.world_size} "
            f"process(es)); to fit: {_fixes(cfg, per_process)}; {_what_next(trainer)}")


def describe_device(device: torch.device) -> str:
    """The device and PyTorch's share of its memory, e.g. "cuda:0 (NVIDIA H100 80GB HBM3: PyTorch holds
    75.1 GiB allocated, 77.9 GiB reserved of 79.1 GiB)"; DALI's pool is not PyTorch's."""
    if device.type != "cuda":
        return str(device)
    properties = torch.cuda.get_device_properties(device)
    allocated, reserved = torch.cuda.memory_allocated(device) / GIB, torch.cuda.memory_reserved(device) / GIB
    return (f"{device} ({properties.name}: PyTorch holds {allocated:.1f} GiB allocated, {reserved:.1f} GiB reserved "
            f"of {properties.total_memory / GIB:.1f} GiB)")


def _position(trainer: Trainer) -> str:
    progress = trainer.progress
    epoch = progress.epoch + 1
    if progress.step_in_epoch >= trainer.steps_per_epoch:  # every step trained: validating
        return f"in epoch {epoch}'s validation"
    return f"at epoch {epoch} step {progress.step_in_epoch + 1}"  # step_in_epoch: the steps finished


def _request(error: torch.OutOfMemoryError) -> str:
    """What the failed allocation asked for (PyTorch's "Tried to allocate 2.00 GiB"), else the message."""
    text = " ".join(str(error).split())
    asked = re.search(r"Tried to allocate [\d.]+ \w+", text)
    return asked.group(0).lower() if asked else text[:160]


def _fixes(cfg, per_process: int) -> str:
    fixes = ["a lower dataset.batch_size"]
    accumulate = cfg.trainer.accumulate
    if per_process % (2 * accumulate) == 0:  # micro-batches must divide the per-process batch (step.py)
        fixes.append(f"trainer.accumulate={2 * accumulate} (the same global batch in micro-batches of "
                     f"{per_process // (2 * accumulate)})")
    amp = getattr(cfg.trainer.amp, "value", cfg.trainer.amp)
    if amp == "off":
        fixes.append("trainer.amp=bf16")
    return ", or ".join(fixes)


def _what_next(trainer: Trainer) -> str:
    kept, command = trainer.store.last, continue_command(trainer.run_dir)
    if not kept.exists():  # resume=auto restarts a folder without a checkpoint, the command line's options first
        return f"nothing was saved yet: rerun with {command} and one of them"
    # A continued run keeps its batch and precision (emca.engine.compatibility): the fixes make a new run.
    return (f"{kept} is kept: continue it as it was with {command} where the device has more memory free, or "
            f"start a new run from its weights with model.init_from={kept} and one of them")
