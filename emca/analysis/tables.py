"""The paper's tables (PAPER.md §6) as specifications, filled with our measurements beside theirs.

A TableSpec lists the cells of one paper table: for every (backbone, row, column group) the
Variant that fills it and the published Reference. Filling a spec with measurements gives a
Table (header + rows of text + long-format records), which render.py writes as Markdown, CSV or
LaTeX. The experiment presets in configs/experiment/ sweep exactly the variants of these specs
(tests/test_experiments.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping, Optional

from emca.analysis import paper_reference as paper
from emca.analysis.paper_reference import Reference
from emca.analysis.variants import Variant, channel_attention, emca, plain

BACKBONES = ("resnet18", "resnet34", "resnet50")
KINDS = paper.KINDS
KIND_LABELS = {"se": "SE", "eca": "ECA", "srm": "SRM"}
# Table 3's EMCA rows (coverage presets) and the paper's label of each.
COVERAGE_ROWS = {"none": "first(=none)", "prev_stage_last": "prev_stage_last", "prev_stage_all": "prev_stage_all", "all_stages_last": "all_stages_last"}
# The coverage of the EMCA rows in Tables 4 and 5: the paper's default.
DEFAULT_COVERAGE = "prev_stage_all"


@dataclass(frozen=True)
class Metric:
    label: str
    digits: int
    # Whether ours - paper means something: parameter counts follow different conventions
    # (PAPER.md §6), so their difference is left out (--complexity compares deltas instead).
    differenced: bool = True
    # Whether PAPER.md has the paper's value: cells of unpublished metrics show ours alone.
    published: bool = True


ROTATIONS = (90, 180, 270)
STAGES = (1, 2, 3, 4)
# Figure 6's summary of the learned scales: eval.json 'learned_scales' key -> (column label, digits,
# factor from eval.json's value to the table's: shares are fractions there, percent here).
SCALE_STATISTICS = {"mean": ("mean", 3, 1), "variance": ("var", 4, 1), "below_half": ("% <0.5", 1, 100), "zeros": ("% zero", 1, 100)}

METRICS = {
    "fps": Metric("FPS", 0),
    "params": Metric("#P (M)", 3, differenced=False),
    "gflops": Metric("GFLOPs", 3),
    "top1": Metric("top-1", 2),
    "top5": Metric("top-5", 2),
    "fps_model": Metric("FPS†", 0),
    "fps_pipeline": Metric("FPS‡", 0),
    **{f"top1_rot{degrees}": Metric(f"top-1 {degrees}°", 2, published=False) for degrees in ROTATIONS},
    **{f"scales_{key}_s{stage}": Metric(f"s{stage} {label}", digits, published=False)
       for stage in STAGES for key, (label, digits, _) in SCALE_STATISTICS.items()},
}


@dataclass(frozen=True)
class Entry:
    backbone: str
    row: str
    group: Optional[str]  # column block (SE / ECA / SRM) of wide tables; None in long tables
    variant: Optional[Variant]  # None: a paper row the framework does not implement
    reference: Optional[Reference]


@dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    row_header: str
    metrics: tuple[str, ...]
    entries: tuple[Entry, ...]
    groups: tuple[str, ...] = ()
    # Filled from runs only when some run has one of these (default: any of the metrics); eval.py
    # alone measures rotations and scales, so a sweep without eval.json leaves those tables out.
    required: tuple[str, ...] = ()
    # Whether make_tables --complexity lists its variants (not for tables of Table 4's variants).
    complexity: bool = True

    def filled_by(self, measured: Mapping[Variant, Mapping[str, float]]) -> bool:
        required = set(self.required or self.metrics)
        return any(required & measured[variant].keys() for variant in self.variants() if variant in measured)

    def variants(self) -> list[Variant]:
        """Every variant the table needs, in table order, once each."""
        return list(dict.fromkeys(entry.variant for entry in self.entries if entry.variant is not None))

    def restricted_to(self, backbones: Optional[Iterable[str]]) -> "TableSpec":
        """The same table with only the rows of these backbones (all when None)."""
        if backbones is None:
            return self
        backbones = set(backbones)
        return replace(self, entries=tuple(entry for entry in self.entries if entry.backbone in backbones))


def _table2() -> TableSpec:
    entries = tuple(
        Entry(backbone, row, KIND_LABELS[kind], channel_attention(backbone, kind, row),
              paper.TABLE_2_3[(backbone, "first(=none)" if row == "first" else row, kind)])
        for backbone in BACKBONES for row in ("all", "first", "last") for kind in KINDS
    )
    return TableSpec("table2", "Table 2: integration strategies of plain channel attention", "integration",
                     ("fps", "params", "top1", "top5"), entries, tuple(KIND_LABELS.values()))


def _table3() -> TableSpec:
    entries = []
    for backbone in BACKBONES:
        entries += [Entry(backbone, "all (plain CA)", KIND_LABELS[kind], channel_attention(backbone, kind, "all"),
                          paper.TABLE_2_3[(backbone, "all", kind)]) for kind in KINDS]
        entries += [Entry(backbone, f"EMCA {coverage}", KIND_LABELS[kind], emca(backbone, kind, coverage),
                          paper.TABLE_2_3[(backbone, label, kind)])
                    for coverage, label in COVERAGE_ROWS.items() for kind in KINDS]
    return TableSpec("table3", "Table 3: EMCA coverage regions (rows) with SE / ECA / SRM excitation", "coverage",
                     ("fps", "params", "top1", "top5"), tuple(entries), tuple(KIND_LABELS.values()))


def _methods(backbone: str) -> list[tuple[str, Variant]]:
    """Table 4/5 rows: the plain ResNet, then each CA module (dense) and its EMCA version."""
    rows = [("ResNet", plain(backbone))]
    for kind in KINDS:
        rows.append((KIND_LABELS[kind], channel_attention(backbone, kind, "all")))
        rows.append((f"EMCA-{KIND_LABELS[kind]}", emca(backbone, kind, DEFAULT_COVERAGE)))
    return rows


def _method_label(method: str) -> str:
    return method + "*" if method in paper.RETRAINED_BY_AUTHORS else method


def _table4() -> TableSpec:
    entries = tuple(
        Entry(backbone, _method_label(method), None, variant, paper.TABLE_4_5[(backbone, method)])
        for backbone in BACKBONES for method, variant in _methods(backbone)
    )
    return TableSpec("table4", f"Table 4: each CA module and its EMCA version (EMCA coverage {DEFAULT_COVERAGE})", "method",
                     ("params", "gflops", "top1", "top5", "fps", "fps_model", "fps_pipeline"), entries)


def _table5() -> TableSpec:
    backbone = paper.TABLE_5_BACKBONE
    entries = [Entry(backbone, _method_label(method), None, variant, paper.TABLE_4_5[(backbone, method)])
               for method, variant in _methods(backbone)]
    entries += [Entry(backbone, f"{method} (not in this framework)", None, None, Reference(top1=top1))
                for method, top1 in paper.TABLE_5_OTHERS.items()]
    return TableSpec("table5", "Table 5: EMCA against other attention methods (R-50)", "method",
                     ("params", "gflops", "top1", "top5"), tuple(entries))


def _table9() -> TableSpec:
    rotated = tuple(f"top1_rot{degrees}" for degrees in ROTATIONS)
    entries = tuple(
        Entry(backbone, _method_label(method), None, variant, paper.TABLE_4_5[(backbone, method)])
        for backbone in BACKBONES for method, variant in _methods(backbone)
    )
    return TableSpec("table9", "Table 9: robustness, top-1 on validation images rotated clockwise (never seen in training)",
                     "method", ("top1", *rotated), entries, required=rotated, complexity=False)


def _figure6() -> TableSpec:
    metrics = tuple(f"scales_{key}_s{stage}" for stage in STAGES for key in SCALE_STATISTICS)
    entries = tuple(
        Entry(backbone, _method_label(method), None, variant, None)
        for backbone in BACKBONES for method, variant in _methods(backbone) if variant.attention != "none"
    )
    return TableSpec("figure6", "Figure 6: learned scales of the first attention module of each stage (s1-s4), "
                     "per-channel averages over the validation set", "method", metrics, entries, complexity=False)


TABLES: dict[str, TableSpec] = {spec.name: spec for spec in (_table2(), _table3(), _table4(), _table5(), _table9(), _figure6())}


@dataclass
class Table:
    """A filled table: display rows (text) for Markdown / LaTeX and long records for CSV."""

    name: str
    title: str
    header: list[str]
    rows: list[list[str]]
    records: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def format_number(value: Optional[float], digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def compare_cell(ours: Optional[float], reference: Optional[float], metric: Metric) -> str:
    """'ours / paper (ours - paper)', or ours alone for a metric the paper's numbers lack; a dash
    for what is missing."""
    if not metric.published:
        return format_number(ours, metric.digits)
    text = f"{format_number(ours, metric.digits)} / {format_number(reference, metric.digits)}"
    if metric.differenced and ours is not None and reference is not None:
        text += f" ({ours - reference:+.{metric.digits}f})"
    return text


def fill_table(spec: TableSpec, measured: Mapping[Variant, Mapping[str, float]]) -> Table:
    """The spec with our numbers (by variant; missing variants are gaps) beside the paper's."""
    metrics = [(key, METRICS[key]) for key in spec.metrics]
    groups = spec.groups or (None,)
    header = ["backbone", spec.row_header] + [
        f"{group} {metric.label}" if group else metric.label for group in groups for _, metric in metrics
    ]
    by_row: dict[tuple[str, str], dict[Optional[str], Entry]] = {}
    for entry in spec.entries:
        by_row.setdefault((entry.backbone, entry.row), {})[entry.group] = entry

    rows, records = [], []
    for (backbone, row_label), cells in by_row.items():
        row = [paper.SHORT_NAME.get(backbone, backbone), row_label]
        for group in groups:
            entry = cells.get(group)
            ours = measured.get(entry.variant, {}) if entry and entry.variant else {}
            for key, metric in metrics:
                reference = getattr(entry.reference, key, None) if entry and entry.reference else None
                row.append(compare_cell(ours.get(key), reference, metric))
                records.append({
                    "table": spec.name, "backbone": backbone, "row": row_label, "group": group or "", "metric": key,
                    "ours": ours.get(key), "paper": reference,
                    "difference": ours[key] - reference if metric.differenced and ours.get(key) is not None and reference is not None else None,
                })
        rows.append(row)
    notes = ["Cells: ours / paper (ours - paper); '–' = not measured or not published."
             if any(metric.published for _, metric in metrics) else "Cells: ours ('–' = not measured); PAPER.md has no published values."]
    if any(key.startswith("top1_rot") for key in spec.metrics):
        notes.append("Rotated columns: ours alone (PAPER.md has no published values); top-1 is the unrotated accuracy.")
    if "params" in spec.metrics:
        notes.append("#P: ours = sum(numel), the paper's = the authors' own count; compare deltas with make_tables --complexity.")
    return Table(spec.name, spec.title, header, rows, records, notes)


def complexity_table(spec: TableSpec, counts: Mapping[Variant, tuple[int, float]]) -> Table:
    """Parameters and GFLOPs of every variant of the spec, and their increase over the plain
    ResNet of the same backbone, ours beside the paper's.

    counts: {variant: (parameters, GFLOPs)}, the plain ResNet of every backbone included.
    """
    header = ["backbone", spec.row_header, "#P ours (M)", "#P paper (M)", "ΔP ours", "ΔP paper",
              "GFLOPs ours", "GFLOPs paper", "ΔGFLOPs ours", "ΔGFLOPs paper"]
    rows, records, seen = [], [], set()
    for entry in spec.entries:
        if entry.variant is None or entry.variant in seen:
            continue
        seen.add(entry.variant)
        backbone = entry.backbone
        params, gflops = counts[entry.variant]
        base_params, base_gflops = counts[plain(backbone)]
        paper_base = paper.TABLE_4_5[(backbone, "ResNet")]
        reference = entry.reference
        paper_params = reference.params if reference else None
        paper_gflops = reference.gflops if reference else None
        values = {
            "params_m": params / 1e6,
            "paper_params_m": paper_params,
            "delta_params": params - base_params,
            "paper_delta_params": None if paper_params is None else round((paper_params - paper_base.params) * 1e6),
            "gflops": gflops,
            "paper_gflops": paper_gflops,
            "delta_gflops": gflops - base_gflops,
            "paper_delta_gflops": None if paper_gflops is None else paper_gflops - paper_base.gflops,
        }
        label = entry.row if entry.group is None else f"{entry.row} {entry.group}"
        rows.append([paper.SHORT_NAME.get(backbone, backbone), label,
                     format_number(values["params_m"], 3), format_number(values["paper_params_m"], 3),
                     f"{values['delta_params']:,}", "–" if values["paper_delta_params"] is None else f"{values['paper_delta_params']:,}",
                     format_number(values["gflops"], 3), format_number(values["paper_gflops"], 3),
                     format_number(values["delta_gflops"], 4), format_number(values["paper_delta_gflops"], 3)])
        records.append({"table": spec.name, "backbone": backbone, "row": label, **values})
    notes = [
        "Ours: sum(numel) and multiply-adds at the given resolution, 1000 classes; the paper's: the authors' counts.",
        "Δ: increase over the plain ResNet of the same backbone (the paper's from its Table 4 ResNet rows); "
        "the paper rounds to 1 K parameters / 0.001 GFLOPs.",
    ]
    return Table(f"{spec.name}_complexity", f"{spec.title}: complexity", header, rows, records, notes)
