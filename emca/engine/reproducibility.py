"""Seeds, deterministic kernels and the random-number state a checkpoint carries."""

from __future__ import annotations

import os
import random
from typing import Any, Optional

import numpy as np
import torch

from emca.data.sampling import derive_seed
from emca.engine.distributed import DistributedContext
from emca.options import is_int, require

# A plain process on the CPU: the default of set_rng_state for a single process's state.
PLAIN_PROCESS = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def seed_everything(seed: int) -> None:
    # numpy's legacy seeding takes 0 .. 2**32 - 1; refuse the rest before any generator is touched.
    require(is_int(seed) and 0 <= seed < 2**32, "trainer.seed", seed, "an integer in [0, 2**32)")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def configure_determinism(deterministic: bool) -> None:
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; it must be set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def rng_state(device: torch.device = PLAIN_PROCESS.device) -> dict[str, Any]:
    """This process's generators: Python's, numpy's, torch's CPU one and `device`'s own CUDA
    generator (None on CPU), in plain types and tensors (loadable with weights_only=True)."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": numpy_state["state"]["key"].tolist(),
            "pos": numpy_state["state"]["pos"],
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def checkpoint_rng(ctx: DistributedContext, state: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint's "rng" holds: every rank's own rng_state, in rank order (a collective: every
    rank calls it; each rank draws from generators of its own, and a rank holds one device only)."""
    return {"ranks": ctx.all_gather_object(state)}


def set_rng_state(saved: dict[str, Any], ctx: DistributedContext = PLAIN_PROCESS, seed: int = 0,
                  step: int = 0) -> Optional[str]:
    """Restore this rank's generators from a checkpoint's "rng" (checkpoint_rng's, or one process's
    rng_state); returns the line to log, the same on every rank, when the run had another number of
    processes. A rank the checkpoint does not record seeds its generators from (seed, rank, step).

    Checkpoints written before the states were kept per rank (v0.2's among them) hold rank 0's generators
    alone, "cuda" the states of every device rank 0 saw: each rank restores them as before, and of "cuda"
    the entry of its own device only, if there is one.
    """
    ranks = saved.get("ranks")
    if ranks is None:
        _restore(saved, ctx.device)
        return None
    if ctx.rank < len(ranks):
        _restore(ranks[ctx.rank], ctx.device)
    else:
        own_seed = derive_seed(seed, ctx.rank, step)
        random.seed(own_seed)
        np.random.seed(own_seed)
        torch.manual_seed(own_seed)
    return _world_size_note(len(ranks), ctx.world_size, step)


def _restore(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(_as_tuples(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {"key": np.asarray(numpy_state["key"], dtype=np.uint32), "pos": numpy_state["pos"]},
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if isinstance(cuda, (list, tuple)):  # the older format: one state per device rank 0 saw
        cuda = cuda[device.index] if device.type == "cuda" and device.index < len(cuda) else None
    # Only this rank's own device: another node may have fewer devices than the one that saved. Without
    # a saved state (a run continued from CPU on CUDA) the device keeps trainer.seed's generator.
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def _world_size_note(recorded: int, world_size: int, step: int) -> Optional[str]:
    """A resume with another number of processes, as the log states it (None: the same number)."""
    if recorded == world_size:
        return None
    # dataset.batch_size is the global batch, split over the processes (emca.data.sampling), so the
    # schedule is the run's; what each process computes on its share is not.
    states = (f"the recorded random states of ranks {_span(world_size, recorded)} go unused" if recorded > world_size
              else f"ranks {_span(recorded, world_size)}, which it does not record, seed their random generators "
                   f"from (trainer.seed, rank, step {step})")
    return (f"the checkpoint was saved by {recorded} processes, this run has {world_size}: the global batch "
            f"(dataset.batch_size) and the schedule are the run's, but BatchNorm statistics, DALI's augmentation "
            f"and random draws are per process, so the rest of the run is close to, not bit-identical with, "
            f"what {recorded} processes would train; {states}")


def _span(first: int, stop: int) -> str:
    return str(first) if stop - first == 1 else f"{first}-{stop - 1}"


def _as_tuples(value: Any) -> Any:
    # random.setstate wants the nested tuples back, whatever the serialiser made of them.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
