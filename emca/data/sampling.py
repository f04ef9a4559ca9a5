"""Which samples each rank sees, and the seeds that make an epoch reproducible.

Everything here depends only on (seed, epoch, rank, world_size), never on how many epochs ran
before, so a run resumed at an epoch boundary sees exactly what an uninterrupted run sees. Both the
DALI and the torchvision loaders take their sample order from these functions.
"""
from __future__ import annotations

import numpy as np

from emca.data.errors import DatasetError


def derive_seed(*parts: int) -> int:
    """A 31-bit seed mixed from integer parts (SeedSequence, so (1, 2) and (2, 1) differ).

    31 bits because DALI takes the pipeline seed as a C int.
    """
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint32)[0]
    return int(state) >> 1


def per_rank_batch_size(global_batch: int, world_size: int) -> int:
    if global_batch <= 0 or global_batch % world_size:
        raise DatasetError(
            f"dataset.batch_size={global_batch} is the global batch and must be a positive multiple "
            f"of the number of processes ({world_size}); set dataset.batch_size to a multiple of {world_size}"
        )
    return global_batch // world_size


def train_batches_per_epoch(num_samples: int, global_batch: int) -> int:
    """Full global batches per epoch; the last partial one is dropped."""
    return num_samples // global_batch


def train_shard(
    num_samples: int, global_batch: int, *, seed: int, epoch: int, rank: int, world_size: int
) -> np.ndarray:
    """This rank's sample indices for a training epoch, in the order to visit them.

    One (seed, epoch)-shuffled permutation is shared by all ranks and dealt out round-robin
    (DistributedSampler's layout), truncated to whole global batches so every rank runs the same
    number of steps and the shards are disjoint.
    """
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(num_samples)
    used = train_batches_per_epoch(num_samples, global_batch) * global_batch
    return order[rank:used:world_size]


def shard_order(num_shards: int, *, seed: int, epoch: int) -> np.ndarray:
    """The order in which a training epoch visits the tar shards of a packed split, the same on all
    ranks (loader=dali with dataset.format=shards reads them in it)."""
    # A stream of its own (the trailing 1), apart from train_shard's sample permutation.
    return np.random.default_rng([int(seed), int(epoch), 1]).permutation(num_shards)


def val_shard(num_samples: int, *, rank: int, world_size: int) -> np.ndarray:
    """This rank's contiguous slice of the validation set: every image exactly once across ranks.

    No padding with duplicates (which would bias the metric) and no drops; sizes differ by at most one.
    """
    return np.array_split(np.arange(num_samples), world_size)[rank]
