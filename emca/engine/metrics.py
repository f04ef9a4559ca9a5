"""Classification's metrics: loss and accuracy as sums over ranks, and the distribution of the
learned attention scales (emca/engine/tasks/classification.py).

Metrics are kept as sums (loss x images, correct predictions, images) on the device and reduced
with one all_reduce: the result is the exact figure over all images, not a mean of per-rank means.

Nothing here makes the host wait for the device until a figure is read (tests/test_host_syncs.py):
image counts stay on the host until the sums are read (HostCountedSums, detection's loss sums too), as
a tensor made from a host number on a CUDA device would be a blocking copy from pageable memory on
every step; the histograms fill fixed bins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from emca.engine.distributed import DistributedContext


def correct_counts(logits: torch.Tensor, labels: torch.Tensor, topk: tuple[int, ...]) -> list[torch.Tensor]:
    """For each k, how many labels are among the k highest logits (k capped at the class count)."""
    maxk = min(max(topk), logits.shape[1])
    predictions = logits.topk(maxk, dim=1).indices
    hits = predictions == labels.unsqueeze(1)
    return [hits[:, : min(k, maxk)].any(dim=1).sum() for k in topk]


class HostCountedSums:
    """Running sums on the device whose last entry counts images. An update's images are known on the
    host (the batch's length) and counted there, then added to that entry when the sums are read: whole
    numbers below 2^53 add exactly in float64, so the totals are those of adding every batch's count on
    the device, without a copy from the host per update."""

    def __init__(self, size: int, device: torch.device, start: Optional[Sequence[float]] = None):
        """`start`: totals to continue from (those of an epoch cut short by a pre-emption)."""
        self.totals = torch.zeros(size, dtype=torch.float64, device=device)
        if start is not None:
            self.totals += torch.tensor(start, dtype=torch.float64, device=device)
        self.images = 0  # counted since the last read

    def add(self, sums: torch.Tensor, images: int) -> None:
        """`sums`: every entry but the image count."""
        self.totals[:-1] += sums
        self.images += images

    def reduce_totals(self, ctx: DistributedContext) -> list[float]:
        """The totals summed over ranks (a collective: every rank calls it)."""
        return ctx.all_reduce_sum(self._read().clone()).tolist()

    def local_totals(self) -> list[float]:
        """This rank's totals alone (no collective)."""
        return self._read().tolist()

    def _read(self) -> torch.Tensor:
        self.totals[-1] += self.images  # a scalar argument of the kernel: no copy from the host
        self.images = 0
        return self.totals


class MetricSums(HostCountedSums):
    """Running sums of loss, top-1 and top-5 hits and images; no host synchronisation until read."""

    def __init__(self, device: torch.device, start: Optional[Sequence[float]] = None):
        super().__init__(4, device, start)

    def update(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """`loss` is the batch mean; it is weighted by the batch size."""
        top1, top5 = correct_counts(logits.detach(), labels, (1, 5))
        count = labels.shape[0]
        self.add(torch.stack([loss.detach().double() * count, top1.double(), top5.double()]), count)

    def reduce(self, ctx: DistributedContext) -> "Metrics":
        """Sum over ranks (a collective: every rank calls it) and return the means."""
        return Metrics.of_totals(self.reduce_totals(ctx))

    def local(self) -> "Metrics":
        """This rank's means alone (no collective), for a step line between reports."""
        return Metrics.of_totals(self.local_totals())


@dataclass(frozen=True)
class Metrics:
    loss: float
    top1: float
    top5: float
    count: int

    @staticmethod
    def of_totals(totals: Sequence[float]) -> "Metrics":
        loss_sum, top1, top5, count = totals
        denominator = max(count, 1.0)
        return Metrics(loss=loss_sum / denominator, top1=100.0 * top1 / denominator, top5=100.0 * top5 / denominator,
                       count=int(count))

    def line(self) -> str:
        return f"loss {self.loss:.4f}  top1 {self.top1:.2f}%"

    def scalars(self) -> dict[str, float]:
        """A step series' and an epoch's training figures (top-5 is a validation figure)."""
        return {"loss": self.loss, "top1": self.top1}


class ScaleHistograms:
    """Histograms of every attention module's scales (the output of its `gate`) over a pass.

    Fixed bins on [0, 1] (sigmoid outputs) accumulate on the device, so the whole validation set
    is covered at constant memory and ranks are merged by summing counts.
    """

    def __init__(self, modules: dict[str, nn.Module], device: torch.device, bins: int = 100):
        self.bins = bins
        self.names = list(modules)
        # Bucket i holds (i/bins, (i+1)/bins]; TensorBoard draws a bucket up to its right edge.
        self.inner_edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64, device=device)[1:-1]
        # Per module: bucket counts, then count, sum, sum of squares, min, max. The count of scales is
        # known on the host (`sizes`) and joined to `moments` in reduce().
        self.counts = torch.zeros(len(modules), bins, dtype=torch.float64, device=device)
        self.moments = torch.zeros(len(modules), 3, dtype=torch.float64, device=device)
        self.sizes = [0] * len(modules)
        self.minimum = torch.full((len(modules),), float("inf"), dtype=torch.float64, device=device)
        self.maximum = torch.full((len(modules),), float("-inf"), dtype=torch.float64, device=device)
        self._handles = [
            module.gate.register_forward_hook(self._hook(index)) for index, module in enumerate(modules.values())
        ]

    def _hook(self, index: int):
        def record(_module, _inputs, scales: torch.Tensor) -> None:
            values = scales.detach().double().flatten()
            # bucketize + index_add_ into the fixed bins: no host synchronisation (bincount reads the
            # largest bucket back to size its output, histc its range) and deterministic on CUDA too
            # (trainer.deterministic; adding ones in float64 is exact in any order).
            buckets = torch.bucketize(values, self.inner_edges)
            self.counts[index].index_add_(0, buckets, torch.ones_like(values))
            self.sizes[index] += values.numel()
            self.moments[index, 1:] += torch.stack([values.sum(), (values * values).sum()])
            self.minimum[index] = torch.minimum(self.minimum[index], values.min())
            self.maximum[index] = torch.maximum(self.maximum[index], values.max())

        return record

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reduce(self, ctx: DistributedContext) -> None:
        """Merge all ranks (a collective: every rank calls it), once, after the pass."""
        self.moments[:, 0] += torch.tensor(self.sizes, dtype=torch.float64, device=self.moments.device)
        self.sizes = [0] * len(self.sizes)
        ctx.all_reduce_sum(self.counts)
        ctx.all_reduce_sum(self.moments)
        ctx.all_reduce(self.minimum, dist.ReduceOp.MIN)
        ctx.all_reduce(self.maximum, dist.ReduceOp.MAX)

    def bucket_limits(self) -> list[float]:
        """Right edge of each bucket (TensorBoard's convention)."""
        return [(i + 1) / self.bins for i in range(self.bins)]
