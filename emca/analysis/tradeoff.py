"""Trade-off figures (make_tables --plot): top-1 against #P, GFLOPs and FPS, the paper's accuracy / cost argument.

One point per table cell that runs measured (runs.measurements: a model's repeated runs, its seeds, as the mean
with the sample standard deviation as error bars), labelled by the paper's row name for it, and beside it the
paper's own point for that row (paper_reference.py, through the tables' entries) where the paper prints both
figures and our runs were measured as its were (ImageNet at 224 px): top-1 on another dataset is not on the
paper's scale, as the tables say. One figure per dataset and image size, as PNG and PDF.
"""

from __future__ import annotations

import statistics
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from emca.analysis import paper_reference as paper
from emca.analysis.figures import plt, save_figure
from emca.analysis.tables import TABLES, Entry, Measured
from emca.analysis.variants import Variant

# (metric key of runs.measurements, axis label); FPS is eval.py's batch-1 speed, the paper's latency figure.
PANELS = (
    ("params", "#P (M = 2^20 parameters)"),
    ("gflops", "GFLOPs (2^30 multiply-accumulates)"),
    ("fps", "FPS (batch 1; ours eval.py's, the paper's on a Titan XP)"),
)
# Which table names a cell and holds its paper figures first: the method tables, whose rows the argument is about.
LABEL_TABLES = ("table4", "table5", "table2", "table3")
NO_SPEED = "no speed: no run here has an eval.json with one (python eval.py checkpoint=<run>/checkpoints/best.pt)"


@dataclass(frozen=True)
class Point:
    label: str
    x: float
    y: float
    xerr: Optional[float] = None  # sample standard deviation over a cell's runs; None for one run
    yerr: Optional[float] = None


@dataclass
class Panel:
    metric: str
    ours: list[Point] = field(default_factory=list)
    paper: list[Point] = field(default_factory=list)
    note: Optional[str] = None


@dataclass
class TradeoffFigure:
    protocol: tuple[Optional[str], Optional[int]]
    paths: list[Path]
    panels: list[Panel]
    notes: list[str]


def _entries(cell: Variant) -> list[Entry]:
    return [entry for name in LABEL_TABLES for entry in TABLES[name].entries if entry.variant == cell]


def row_label(cell: Variant) -> str:
    """'R-18 EMCA-ECA', 'R-50 EMCA prev_stage_last (SE)': the paper's row for the cell, else its description."""
    entries = _entries(cell)
    if not entries:
        return cell.describe()
    entry = entries[0]
    group = f" ({entry.group})" if entry.group else ""
    return f"{paper.SHORT_NAME.get(entry.backbone, entry.backbone)} {entry.row}{group}"


def _spread(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation; no error bar for one run or where the runs agree (#P, GFLOPs)."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), spread or None


def _paper_point(cell: Variant, metric: str, label: str) -> Optional[Point]:
    """The paper's (metric, top-1) for the cell's row: the first table of LABEL_TABLES printing both."""
    for entry in _entries(cell):
        reference = entry.reference
        if reference is not None and getattr(reference, metric) is not None and reference.top1 is not None:
            return Point(label, getattr(reference, metric), reference.top1)
    return None


def tradeoff_panels(measured: Mapping[Variant, Measured], with_paper: bool) -> list[Panel]:
    """The three panels' points: ours for every cell with top-1 and the panel's metric, the paper's beside them."""
    panels = []
    for metric, _ in PANELS:
        panel = Panel(metric)
        for cell, cell_measured in measured.items():
            values = cell_measured.values
            if not values.get(metric) or not values.get("top1"):
                continue
            label = row_label(cell)
            (x, xerr), (y, yerr) = _spread(values[metric]), _spread(values["top1"])
            panel.ours.append(Point(label, x, y, xerr, yerr))
            reference = _paper_point(cell, metric, label) if with_paper else None
            panel.paper += [reference] if reference else []
        if metric == "fps" and not panel.ours:
            panel.note = NO_SPEED
        panels.append(panel)
    return panels


def _draw(axis, panel: Panel, xlabel: str) -> None:
    for point in panel.ours:
        axis.errorbar(point.x, point.y, xerr=point.xerr, yerr=point.yerr, fmt="o", color="C0", capsize=3)
        axis.annotate(point.label, (point.x, point.y), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    ours = {point.label: point for point in panel.ours}
    for point in panel.paper:
        axis.plot(point.x, point.y, "s", markerfacecolor="none", color="0.4")
        # A dotted line from each of our points to the paper's for the same row.
        axis.plot([ours[point.label].x, point.x], [ours[point.label].y, point.y], ":", color="0.6", linewidth=0.8)
    if panel.note:
        axis.text(0.5, 0.5, textwrap.fill(panel.note, 40), transform=axis.transAxes, ha="center", va="center",
                  fontsize="small", color="0.3")
    # Models differ in the 3rd or 4th digit of GFLOPs: all digits on a few ticks, not an offset label.
    axis.ticklabel_format(useOffset=False)
    axis.xaxis.set_major_locator(MaxNLocator(4))
    axis.set_xlabel(xlabel)
    axis.set_ylabel("top-1 (%)")
    axis.grid(alpha=0.3)


def _legend(axis, with_paper: bool) -> None:
    handles = [Line2D([], [], marker="o", linestyle="none", color="C0", label="ours (mean ± std over seeds)")]
    handles += [Line2D([], [], marker="s", linestyle="none", markerfacecolor="none", color="0.4",
                       label="the paper's, same row")] if with_paper else []
    axis.legend(handles=handles, fontsize="x-small")


def plot_tradeoffs(measured: Mapping[object, Measured], out_dir: Path) -> list[TradeoffFigure]:
    """tradeoff_<dataset>_<size>px.png and .pdf in out_dir, one per protocol of the measured classification
    cells (detection cells, keyed by detector, are left out); [] when no cell has a top-1."""
    by_protocol: dict[tuple, dict[Variant, Measured]] = {}
    for cell, cell_measured in measured.items():
        if isinstance(cell, Variant) and cell_measured.values.get("top1"):
            by_protocol.setdefault(cell_measured.protocol, {})[cell] = cell_measured
    figures = []
    for protocol, cells in sorted(by_protocol.items(), key=str):
        dataset, size = protocol
        with_paper = protocol == paper.PROTOCOL
        panels = tradeoff_panels(cells, with_paper)
        notes = [] if with_paper else [f"the paper's points (ImageNet at 224 px) left out beside runs on {dataset} "
                                       f"at {size} px, whose top-1 is not on their scale"]
        figure, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4.5), squeeze=False)
        for axis, panel, (_, xlabel) in zip(axes[0], panels, PANELS, strict=True):
            _draw(axis, panel, xlabel)
        _legend(axes[0][0], any(panel.paper for panel in panels))
        title = f"top-1 against size, compute and speed: {dataset} at {size} px" + "".join(f"; {n}" for n in notes)
        path = save_figure(figure, out_dir / f"tradeoff_{dataset}_{size}px.png", title, also=(".pdf",))
        figures.append(TradeoffFigure(protocol, [path, path.with_suffix(".pdf")], panels, notes))
    return figures
