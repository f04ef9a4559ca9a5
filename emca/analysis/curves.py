"""Figure 9: validation top-1 per epoch of a set of runs, one panel per backbone."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from matplotlib.ticker import MaxNLocator

from emca.analysis.figures import plt, save_figure
from emca.analysis.paper_reference import SHORT_NAME
from emca.analysis.runs import Run


def plot_top1_curves(runs: Iterable[Run], path: Path, title: str = "Validation top-1 per epoch") -> Optional[Path]:
    """Write the figure to `path`; None (nothing written) when no run has a curve."""
    by_backbone: dict[str, list[Run]] = {}
    for run in runs:
        if any(value is not None for value in run.top1_curve()):
            by_backbone.setdefault(run.variant.backbone, []).append(run)
    if not by_backbone:
        return None
    figure, axes = plt.subplots(1, len(by_backbone), figsize=(6 * len(by_backbone), 4.5), squeeze=False)
    for axis, (backbone, backbone_runs) in zip(axes[0], sorted(by_backbone.items()), strict=True):
        for run in backbone_runs:
            points = [(epoch, top1) for epoch, top1 in enumerate(run.top1_curve(), start=1) if top1 is not None]
            label = run.variant.describe().removeprefix(f"{backbone} ")
            axis.plot(*zip(*points, strict=True), marker="." if len(points) < 30 else None, label=label)
        axis.set_title(SHORT_NAME.get(backbone, backbone))
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel("val top-1 (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="x-small")
    return save_figure(figure, path, title)
