"""The learned scales of Figure 6: for the first attention module of each stage, every channel's
scale averaged over the validation set, summarised by mean, variance, the share below 0.5 and the
share of exact zeros (the paper finds about 1.5 % for EMCA and proposes pruning those channels).

A channel's average is exactly zero only when the sigmoid gave exactly 0.0 (underflow) on every
image; the shares are over channels. Sums are kept per channel on the device in float64 and merged
over ranks with one all_reduce, so the statistics cover each validation image once.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from emca.analysis.figures import plt, save_figure
from emca.engine.distributed import DistributedContext
from emca.models import attention_modules


def first_attention_per_stage(model: nn.Module) -> dict[str, tuple[int, nn.Module]]:
    """{qualified name: (stage number, module)} of the first attention module of each stage.

    Stages are the ResNet's layer1..layer4; named_modules visits their blocks in order, so the
    first module seen under a stage is that stage's first.
    """
    first: dict[str, tuple[str, nn.Module]] = {}
    for name, module in attention_modules(model).items():
        first.setdefault(name.split(".", 1)[0], (name, module))
    return {name: (int(stage.removeprefix("layer")), module) for stage, (name, module) in first.items()}


class LearnedScales:
    """Per-channel sums of the scales (the `gate` outputs) of the first attention module of each
    stage, recorded only inside `recording()`."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.modules = first_attention_per_stage(model)
        # Sized up front (a module gates its stage's channels) so that every rank, even one whose
        # validation shard is empty, reduces tensors of the same shapes.
        self._sums = [torch.zeros(model.stage_channels[stage - 1], dtype=torch.float64, device=device)
                      for stage, _ in self.modules.values()]
        self._images = torch.zeros(len(self.modules), dtype=torch.float64, device=device)
        self._recording = False
        self._handles = [
            module.gate.register_forward_hook(self._hook(index))
            for index, (_, module) in enumerate(self.modules.values())
        ]

    def _hook(self, index: int):
        def record(_module, _inputs, scales: torch.Tensor) -> None:
            if not self._recording:
                return
            per_image = scales.detach().reshape(scales.shape[0], -1).double()
            self._sums[index] += per_image.sum(dim=0)
            self._images[index] += per_image.shape[0]

        return record

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        self._recording = True
        try:
            yield
        finally:
            self._recording = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reduce(self, ctx: DistributedContext) -> None:
        """Merge the ranks' sums (a collective: every rank calls it)."""
        flat = ctx.all_reduce_sum(torch.cat([*self._sums, self._images]))
        sizes = [s.numel() for s in self._sums]
        *self._sums, self._images = torch.split(flat, sizes + [len(self._images)])

    def statistics(self) -> list[dict[str, Any]]:
        """Per stage: the module, its per-channel average scales and their summary."""
        rows = []
        for (name, (stage, _)), sums, images in zip(
            self.modules.items(), self._sums, self._images.tolist(), strict=True
        ):
            average = sums / max(images, 1.0)
            rows.append({
                "stage": stage,
                "module": name,
                "channels": average.numel(),
                "images": int(images),
                "mean": average.mean().item(),
                "variance": average.var(unbiased=False).item(),
                "below_half": (average < 0.5).double().mean().item(),
                "zeros": (average == 0).double().mean().item(),
                "per_channel_mean": average.tolist(),
            })
        return rows


def plot_scales(statistics: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Figure 6: each stage's per-channel average scale, with the 0.5 line and the summary."""
    figure, axes = plt.subplots(len(statistics), 1, figsize=(8, 2.2 * len(statistics)), squeeze=False)
    for axis, row in zip(axes[:, 0], statistics, strict=True):
        values = row["per_channel_mean"]
        axis.bar(range(len(values)), values, width=1.0, color="tab:blue")
        axis.axhline(0.5, color="tab:red", linewidth=0.8, linestyle="--")
        axis.set_xlim(-0.5, len(values) - 0.5)
        axis.set_ylim(0, 1)
        axis.set_ylabel("scale")
        axis.set_title(
            f"stage {row['stage']} ({row['module']}): mean {row['mean']:.3f}, variance {row['variance']:.4f}, "
            f"{100 * row['below_half']:.1f}% below 0.5, {100 * row['zeros']:.1f}% zeros",
            fontsize="small",
        )
    axes[-1, 0].set_xlabel("channel")
    return save_figure(figure, path, title)
