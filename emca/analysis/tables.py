"""The paper's tables (docs/paper.md#reference-figures) as specifications, filled with our measurements beside theirs.

A TableSpec lists the cells of one paper table: for every (backbone, row, column group) the
Variant that fills it and the published Reference. Filling a spec with measurements (a Measured per
variant: every run's values, and the dataset and image size they were measured on) gives a Table
(header + rows of text + long-format records), which render.py writes as Markdown, CSV or LaTeX.
Parameters and GFLOPs are in the paper's units (docs/paper.md#units), so they compare digit for digit.
The experiment presets in configs/experiment/ sweep exactly the variants of these specs
(tests/test_experiments.py checks it).

Tables 6 and 8 (COCO detection) are DetectionSpecs (DETECTION_TABLES): rows are (detector, Variant)
cells, filled by fill_detection_table from detection runs, with #P and GFLOPs in MMDetection's decimal
units (emca/analysis/detection_complexity.py, docs/paper.md#tables-6-and-8).
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping, Optional, Sequence

from emca.analysis import paper_reference as paper
from emca.analysis.complexity import build_variant, paper_gflops
from emca.analysis.detection_complexity import DetectorCount, count_detector
from emca.analysis.method_reference import (
    METHOD_REFERENCES,
    SRM_EPOCHS,
    SRM_TABLE,
    SRM_TABLE_SOURCE,
    MethodReference,
)
from emca.analysis.paper_reference import Reference
from emca.analysis.variants import Variant, channel_attention, emca, plain
from emca.layers.create_attn import ATTENTION_KINDS, default_integration, kind_of

BACKBONES = ("resnet18", "resnet34", "resnet50")
KINDS = paper.KINDS
KIND_LABELS = {kind.name: kind.label for kind in ATTENTION_KINDS if kind.name in KINDS}
# Table 3's EMCA rows (coverage presets) and the paper's label of each.
COVERAGE_ROWS = {
    "none": "first(=none)",
    "prev_stage_last": "prev_stage_last",
    "prev_stage_all": "prev_stage_all",
    "all_stages_last": "all_stages_last",
}
# The coverage of the EMCA rows in Tables 4 and 5: the paper's default.
DEFAULT_COVERAGE = "prev_stage_all"
# The backbone of the other methods' own figures (method_reference.py): their papers' ResNet-50.
OWN_BACKBONE = "resnet50"


@dataclass(frozen=True)
class Metric:
    label: str
    digits: int
    # Whether the paper publishes a value (paper_reference.py): cells of unpublished metrics show ours alone.
    published: bool = True
    # A property of the model, the same in every run of it: repeats show it once, not as mean ± std.
    per_model: bool = False


ROTATIONS = (90, 180, 270)
STAGES = (1, 2, 3, 4)
# Figure 6's summary of the learned scales: eval.json 'learned_scales' key -> (column label, digits,
# factor from eval.json's value to the table's: shares are fractions there, percent here).
SCALE_STATISTICS = {
    "mean": ("mean", 3, 1),
    "variance": ("var", 4, 1),
    "below_half": ("% <0.5", 1, 100),
    "zeros": ("% zero", 1, 100),
}

METRICS = {
    "fps": Metric("FPS", 0),
    "params": Metric("#P (M)", 3, per_model=True),
    "gflops": Metric("GFLOPs", 3, per_model=True),
    "top1": Metric("top-1", 2),
    "top5": Metric("top-5", 2),
    "fps_model": Metric("FPS†", 0),
    "fps_pipeline": Metric("FPS‡", 0),
    **{f"top1_rot{degrees}": Metric(f"top-1 {degrees}°", 2, published=False) for degrees in ROTATIONS},
    **{f"scales_{key}_s{stage}": Metric(f"s{stage} {label}", digits, published=False)
       for stage in STAGES for key, (label, digits, _) in SCALE_STATISTICS.items()},
}


@dataclass(frozen=True)
class Second:
    """A row's second reference: accuracies the method's own authors published (their paper or repository),
    printed in brackets after the EMCA paper's figure, with `source` in the table's notes."""

    label: str  # whose figures, as the notes name them
    source: str
    top1: Optional[float] = None
    top5: Optional[float] = None


@dataclass(frozen=True)
class Entry:
    backbone: str
    row: str
    group: Optional[str]  # column block (SE / ECA / SRM) of wide tables; None in long tables
    variant: Optional[Variant]  # None: a paper row the framework does not implement
    reference: Optional[Reference]  # the EMCA paper's own cells: the first reference
    # The method paper's own #P and GFLOPs (Table 5's other methods' R-50 rows): ours beside them in that
    # paper's units at its printed digits, in brackets (own_unit_comparison).
    own: Optional[MethodReference] = None
    second: Optional[Second] = None


@dataclass(frozen=True)
class TableSpec:
    name: str
    paper_name: str  # "Table 4": the number the paper gives it
    caption: str
    row_header: str
    metrics: tuple[str, ...]
    entries: tuple[Entry, ...]
    groups: tuple[str, ...] = ()
    # Filled from runs only when some run has one of these (default: any of the metrics); eval.py
    # alone measures rotations and scales, so a sweep without eval.json leaves those tables out.
    required: tuple[str, ...] = ()
    # Whether make_tables --complexity lists its variants (not for tables of Table 4's variants).
    complexity: bool = True
    # (dataset, image size) of the paper's runs behind this table: ours are differenced only then.
    protocol: tuple[str, int] = paper.PROTOCOL
    # The preset of configs/experiment/ that trains its variants with the paper's options (Tables 9 and
    # Figure 6 are eval.py's measurements of Table 4's runs): a run of other options is pointed to it.
    preset: Optional[str] = None

    @property
    def title(self) -> str:
        return f"{self.paper_name}: {self.caption}"

    def filled_by(self, measured: Mapping[Variant, "Measured"]) -> bool:
        required = set(self.required or self.metrics)
        return any(required & measured[variant].values.keys() for variant in self.variants() if variant in measured)

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
    return TableSpec("table2", "Table 2", "integration strategies of plain channel attention", "integration",
                     ("fps", "params", "top1", "top5"), entries, tuple(KIND_LABELS.values()), preset="table2")


def _table3() -> TableSpec:
    entries = []
    for backbone in BACKBONES:
        entries += [Entry(backbone, "all (plain CA)", KIND_LABELS[kind], channel_attention(backbone, kind, "all"),
                          paper.TABLE_2_3[(backbone, "all", kind)]) for kind in KINDS]
        entries += [Entry(backbone, f"EMCA {coverage}", KIND_LABELS[kind], emca(backbone, kind, coverage),
                          paper.TABLE_2_3[(backbone, label, kind)])
                    for coverage, label in COVERAGE_ROWS.items() for kind in KINDS]
    return TableSpec("table3", "Table 3", "EMCA coverage regions (rows) with SE / ECA / SRM excitation", "coverage",
                     ("fps", "params", "top1", "top5"), tuple(entries), tuple(KIND_LABELS.values()), preset="table3")


def _methods(backbone: str) -> list[tuple[str, Variant]]:
    """Table 4/5 rows: the plain ResNet, then each CA module (dense) and its EMCA version."""
    rows = [("ResNet", plain(backbone))]
    for kind in KINDS:
        rows.append((KIND_LABELS[kind], channel_attention(backbone, kind, "all")))
        rows.append((f"EMCA-{KIND_LABELS[kind]}", emca(backbone, kind, DEFAULT_COVERAGE)))
    return rows


# Where the bracketed figures of a second reference come from, for the notes.
ECA_SECOND_SOURCE = ("ECA-Net's authors' own runs, which the paper's Table 4 prints unstarred beside its "
                     "retrained ECA* (R-18 70.78 / 89.92, R-34 74.21 / 91.83, R-50 77.48 / 93.68; BangguWu/ECANet's "
                     "README prints 74.21 / 91.83 for ECA-Net34, 77.48 / 93.68 for ECA-Net50 until its 2019-11-06 "
                     "revision and 77.42 / 93.62 since, and 70.92 / 89.93 for ECA-Net18)")


def _eca_second(backbone: str) -> Second:
    own = paper.TABLE_4[(backbone, "ECA")]
    return Second("ECA*", ECA_SECOND_SOURCE, own.top1, own.top5)


def _method_entries(seconds: bool = False) -> tuple[Entry, ...]:
    """Every backbone x (ResNet, each CA module, its EMCA version): the rows of Tables 4 and 9, with Table 4's
    cells (and, with `seconds`, ECA-Net's own accuracies after the retrained ECA*'s)."""
    return tuple(
        Entry(backbone, label, None, variant, paper.TABLE_4[(backbone, label)],
              second=_eca_second(backbone) if seconds and variant.attention == "eca" else None)
        for backbone in BACKBONES for method, variant in _methods(backbone)
        for label in (paper.printed_label(paper.TABLE_4, backbone, method),)
    )


def _table4() -> TableSpec:
    entries = _method_entries(seconds=True)
    return TableSpec(
        "table4",
        "Table 4",
        f"each CA module and its EMCA version (EMCA coverage {DEFAULT_COVERAGE})",
        "method",
        ("params", "gflops", "top1", "top5", "fps", "fps_model", "fps_pipeline"),
        entries,
        preset="table4",
    )


def in_paper_table5(label: str) -> bool:
    """Whether the paper's Table 5 prints a row of this method on some backbone."""
    return any((backbone, paper.printed_label(paper.TABLE_5, backbone, label)) in paper.TABLE_5
               for backbone in BACKBONES)


def _table5_methods(backbone: str, every: bool = False) -> list[tuple[str, Variant]]:
    """Table 5's rows on one backbone: Table 4's, then each other method of the paper's Table 5 (every method of
    the attention table with `every`, ca_all's rows) and its EMCA version; the paper's rows carry its cells."""
    rows = _methods(backbone)
    for kind in ATTENTION_KINDS:
        if kind.name not in KINDS and (every or in_paper_table5(kind.label)):
            rows.append((kind.label, Variant(backbone, kind.name, default_integration(kind.name))))
            if kind.excitation is not None:
                rows.append((f"EMCA-{kind.label}", emca(backbone, kind.name, DEFAULT_COVERAGE)))
    return rows


def _method_second(attention: str, backbone: str) -> Optional[Second]:
    """The other method's own published accuracy on this backbone, where its source prints one."""
    own = METHOD_REFERENCES.get(attention)
    if own is None or attention in KINDS:
        return None
    top1 = own.top1 if backbone == OWN_BACKBONE else dict(own.other_backbones).get(backbone)
    if top1 is None:
        return None
    return Second(own.label, own.source, top1, own.top5 if backbone == OWN_BACKBONE else None)


def _method_entries_of(every: bool) -> tuple[Entry, ...]:
    entries = []
    for backbone in BACKBONES:
        for method, variant in _table5_methods(backbone, every):
            label = paper.printed_label(paper.TABLE_5, backbone, method)
            other = variant.attention not in ("none", *KINDS) and not variant.is_emca
            own = METHOD_REFERENCES.get(variant.attention) if other and backbone == OWN_BACKBONE else None
            entries.append(Entry(backbone, label, None, variant, paper.TABLE_5.get((backbone, label)), own,
                                 _method_second(variant.attention, backbone) if other else None))
    return tuple(entries)


def _methods_table(name: str, paper_name: str, caption: str, every: bool) -> TableSpec:
    """Table 5 (every=False) or ca_all, every method of the attention table and its EMCA version (every=True),
    trained by the preset of the same name."""
    return TableSpec(name, paper_name, caption, "method",
                     ("params", "gflops", "top1", "top5", "fps", "fps_model", "fps_pipeline"),
                     _method_entries_of(every), preset=name)


def _table5() -> TableSpec:
    return _methods_table("table5", "Table 5", "EMCA against other attention methods: the paper's cells, then in "
                          "brackets the other methods' own published figures (for #P and GFLOPs ours / theirs in that "
                          "paper's unit at its printed digits, emca/analysis/method_reference.py)", every=False)


def _ca_all() -> TableSpec:
    return _methods_table("ca_all", "Channel attention", "every method of the attention table on R-18/34/50: the "
                          "EMCA paper's cells where its Table 5 prints the row, then in brackets each method's own "
                          "published figures (emca/analysis/method_reference.py)", every=True)


def _unit_text(unit: int) -> str:
    """'10^6', '2^20': a unit as the notes write it."""
    for base in (10, 2):
        exponent = round(math.log(unit, base))
        if base**exponent == unit:
            return f"{base}^{exponent}"
    return str(unit)


def _printed(value: float, digits: int, signed: bool = False) -> str:
    value = round(value, digits) + 0.0  # + 0.0: no '-0.00'
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def own_unit_comparison(own: MethodReference, key: str, ours: Optional[float], plain_gflops: Optional[float] = None
                        ) -> Optional[tuple[str, bool]]:
    """('10^6: 28.09 / 28.09', True): ours beside a method paper's own figure in that paper's unit and at its
    printed digits, and whether the two print the same ('–' for ours and True without `ours`). #P as counted;
    GFLOPs as the increment over the plain ResNet-50 (its paper's base_gflops, ours `plain_gflops`), or as
    printed for a figure without a plain ResNet-50 of its count (gflops_absolute). `ours` and `plain_gflops`
    are in this table's units (the EMCA paper's); None for another metric."""
    if (key == "params" and own.params is None) or (key == "gflops" and own.gflops is None):
        return None  # not printed in a source we read (the method reference's note says so)
    if key == "params":
        ours, theirs, over = None if ours is None else ours * paper.PARAM_UNIT / own.params_unit, own.params, None
        unit, digits = own.params_unit, own.params_digits
    elif key == "gflops":
        scale, unit, digits = paper.GFLOP_UNIT / own.gflops_unit, own.gflops_unit, own.gflops_digits
        if own.gflops_absolute:
            ours, theirs, over = None if ours is None else ours * scale, own.gflops, None
        else:
            increment = None if ours is None or plain_gflops is None else (ours - plain_gflops) * scale
            ours, theirs, over = increment, own.gflops - own.base_gflops, "R-50"
    else:
        return None
    texts = ["–" if value is None else _printed(value, digits, signed=over is not None) for value in (ours, theirs)]
    return f"{_unit_text(unit)}{f' over {over}' if over else ''}: {texts[0]} / {texts[1]}", texts[0] in ("–", texts[1])


def _table9() -> TableSpec:
    rotated = tuple(f"top1_rot{degrees}" for degrees in ROTATIONS)
    entries = _method_entries()
    return TableSpec(
        "table9",
        "Table 9",
        "robustness, top-1 on validation images rotated clockwise (never seen in training)",
        "method",
        ("top1", *rotated),
        entries,
        required=rotated,
        complexity=False,
        preset="table4",
    )


def _figure6() -> TableSpec:
    metrics = tuple(f"scales_{key}_s{stage}" for stage in STAGES for key in SCALE_STATISTICS)
    entries = tuple(
        Entry(backbone, paper.printed_label(paper.TABLE_4, backbone, method), None, variant, None)
        for backbone in BACKBONES for method, variant in _methods(backbone) if variant.attention != "none"
    )
    return TableSpec("figure6", "Figure 6", "learned scales of the first attention module of each stage (s1-s4), "
                     "per-channel averages over the validation set", "method", metrics, entries, complexity=False,
                     preset="table4")


TABLES: dict[str, TableSpec] = {
    spec.name: spec for spec in (_table2(), _table3(), _table4(), _table5(), _ca_all(), _table9(), _figure6())
}


@dataclass(frozen=True)
class Measured:
    """What the runs of one table cell measured: each metric's value in every run that has it,
    and the (dataset, image size) those runs were measured on."""

    values: Mapping[str, Sequence[float]]
    protocol: tuple[Optional[str], Optional[int]] = paper.PROTOCOL
    # Attention options of its runs off the paper's (Variant.options): a #P that differs is theirs, which
    # the runs' options note explains, not a known difference of the paper's model.
    options: tuple[tuple[str, object], ...] = ()

    @classmethod
    def single(cls, metrics: Mapping[str, float], protocol: tuple[Optional[str], Optional[int]] = paper.PROTOCOL
               ) -> "Measured":
        return cls({key: (value,) for key, value in metrics.items()}, protocol)


@dataclass
class Table:
    """A filled table: display rows (text) for Markdown / LaTeX and long records for CSV."""

    name: str
    title: str  # "Table 4: ..." as Markdown prints it
    caption: str  # the same without the number, which LaTeX gives
    header: list[str]
    rows: list[list[str]]
    records: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class KnownDifference:
    """Why some cells of some variants cannot print as the published figure (each claim checked by
    computing it in tests/test_tables_units.py): one note per cause, shown where such a cell is."""

    applies: Callable[[Variant], bool]
    note: str
    metrics: tuple[str, ...] = ("params",)  # the columns whose cells it explains
    # Which figure it explains ours against: "paper", the EMCA paper's cell; "own", the method paper's (brackets).
    against: tuple[str, ...] = ("paper",)


def _method(name: str, backbone: Optional[str] = None) -> Callable[[Variant], bool]:
    return lambda variant: variant.attention == name and backbone in (None, variant.backbone)


PARAM_DIFFERENCES = (
    KnownDifference(
        lambda v: v.attention.endswith("srm") or v.attention == "sa",
        "#P of SRM and SANet rows: ours include the parameters these modules hold themselves (SRM's channel-wise FC "
        "cfc, 2 per channel and module; SA's four gating vectors), which the paper's counter missed (thop counts the "
        "parameters of modules without children, and these modules have some); without them ours print as the "
        "paper's.",
    ),
    KnownDifference(
        lambda v: v.backbone == "resnet18" and v.attention == "emca_se" and v.coverage in ("prev_stage_all",
                                                                                         "all_stages_last"),
        "#P of R-18 EMCA-SE prev_stage_all / all_stages_last: ours are 11,733,041 parameters, 1 short of the "
        "11,733,042 that print as the paper's 11.190. With attention.include_stem=true (the stem as stage 0, as in "
        "the authors' code) they are 11,733,043 / 11,733,046 = 11.190, and every EMCA #P of Tables 3 and 4 prints as "
        "the paper's (EMCA-SRM's without the cfc of the SRM note); the table presets keep the default, off "
        "(docs/paper.md#parameter-counts).",
    ),
)

# Table 5's other methods: their cells compare with the EMCA paper's and, in brackets, with their own papers'
# figures in those papers' units at their printed digits (own_unit_comparison). Where ours print differently, why.
METHOD_DIFFERENCES = (
    KnownDifference(
        _method("cbam"),
        "GFLOPs of CBAM against its own paper: its +0.006 over its plain ResNet-50 is ours counted over convolutions "
        "and linear layers alone; this column's counter (the EMCA paper's) also counts 1 per averaged element and 2 "
        "per BatchNorm output, which CBAM's two average poolings (over space for its channel gate, over channels for "
        "its spatial gate) and its spatial gate's BatchNorm raise by 0.011 x 10^9.",
        ("gflops",), ("own",),
    ),
    KnownDifference(
        _method("cbam", "resnet50"),
        "#P of R-50 CBAM: the paper's 26.775 M are 28,075,099 to 28,076,146 parameters, 13,478 to 14,525 fewer than "
        "CBAM's own model (ours, 28,089,624: its paper's 28.09 M in brackets); the paper's R-18 and R-34 CBAM counts "
        "are ours to the digit. Which model it counted on R-50 the paper does not say.",
    ),
    KnownDifference(
        _method("bam"),
        "#P of BAM: the paper prints BAM's in 10^6, not in its 2^20: R-50's 25.92 is BAM's own paper's figure (in "
        "brackets), and ours, 11,712,503 (R-18) and 25,915,099 (R-50) parameters, are 11.713 and 25.92 in 10^6 "
        "against its 11.712 and 25.92. Its BAM GFLOPs (1.821, 3.946) are of a count we do not reproduce; ours give "
        "BAM's own paper's +0.08 over its plain ResNet-50 (in brackets).",
    ),
    KnownDifference(
        _method("triplet"),
        "GFLOPs of Triplet against its own paper: its 4.17 over the plain ResNet-50's 4.12 of the same 10^9 count "
        "(+0.05) is ours counted over convolutions alone (+0.046); this column's counter also counts 1 per averaged "
        "element and 2 per BatchNorm output, which each module's three Z-pool means (each reads all of y) and its "
        "three one-channel gate BatchNorms raise by 0.018 x 10^9.",
        ("gflops",), ("own",),
    ),
    KnownDifference(
        _method("sge"),
        "GFLOPs of SGE against its own paper: its +0.005 over its plain ResNet-50 (4.127 against 4.122) is ours "
        "counted over convolutions, linear layers and SGE's similarity products alone (+0.0055); this column's "
        "counter also counts 1 per averaged element, which each module's group means (each reads all of y) and its "
        "means of the similarities over the positions raise by 0.006 x 10^9.",
        ("gflops",), ("own",),
    ),
    *(
        KnownDifference(_method(name), f"#P and GFLOPs of {own.label}: not reproduced; {own.note}.",
                        ("params", "gflops"), ("paper", "own"))
        for name, own in METHOD_REFERENCES.items()
        if not own.reproduced
    ),
)
KNOWN_DIFFERENCES = PARAM_DIFFERENCES + METHOD_DIFFERENCES


def difference_notes(differing: Iterable[tuple[Variant, str, str]]) -> list[str]:
    """The notes of the known differences that explain some of these (variant, metric, against) cells."""
    differing = list(differing)
    return [known.note for known in KNOWN_DIFFERENCES
            if any(key in known.metrics and against in known.against and known.applies(variant)
                   for variant, key, against in differing)]


def format_number(value: Optional[float], digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def mean_and_std(values: Sequence[float], metric: Metric) -> tuple[Optional[float], Optional[float]]:
    """The mean of the runs' values and their sample standard deviation (None for one run or a
    property of the model, which every run shares)."""
    if not values:
        return None, None
    spread = len(values) > 1 and not metric.per_model
    return statistics.fmean(values), statistics.stdev(values) if spread else None


def format_ours(values: Sequence[float], metric: Metric) -> str:
    """'71.02', or '71.02 ± 0.15 (n=3)' for repeated runs; '–' without any."""
    mean, std = mean_and_std(values, metric)
    text = format_number(mean, metric.digits)
    return text if std is None else f"{text} ± {std:.{metric.digits}f} (n={len(values)})"


def compare_cell(values: Sequence[float], reference: Optional[float], metric: Metric, comparable: bool = True) -> str:
    """'ours / paper (ours - paper)' for runs that followed the paper's protocol; ours alone for
    other runs and for metrics the paper's numbers lack; a dash for what is missing. The difference
    is that of the printed numbers, so that it reads off the cell."""
    ours = format_ours(values, metric)
    if not metric.published or not comparable:
        return ours
    text = f"{ours} / {format_number(reference, metric.digits)}"
    mean, _ = mean_and_std(values, metric)
    if mean is not None and reference is not None:
        text += f" ({round(mean, metric.digits) - reference:+.{metric.digits}f})"
    return text


def _rows(spec: TableSpec) -> dict[tuple[str, str], dict[Optional[str], Entry]]:
    """{(backbone, row label): {column group: entry}} in table order."""
    by_row: dict[tuple[str, str], dict[Optional[str], Entry]] = {}
    for entry in spec.entries:
        by_row.setdefault((entry.backbone, entry.row), {})[entry.group] = entry
    return by_row


def _params_differ(values: Sequence[float], reference: Optional[float]) -> bool:
    return (
        bool(values)
        and reference is not None
        and round(statistics.fmean(values), METRICS["params"].digits) != reference
    )


def reference_cell(entry: Optional[Entry], key: str, values: Sequence[float], comparable: bool = True,
                   plain_gflops: Optional[float] = None) -> tuple[str, tuple[str, ...]]:
    """The cell of one metric of one entry, and which figures ours print differently from (cells a note must
    explain): "paper", the EMCA paper's #P, digit for digit in its unit; "own", a method paper's #P or GFLOPs in
    that paper's unit at its printed digits, in brackets after the paper's cell (`plain_gflops`: our plain
    ResNet-50's, for GFLOPs increments). A second reference's accuracy follows in brackets too. GFLOPs of the
    paper's own rows agree within 0.2 % (units_note), not to the digit."""
    metric = METRICS[key]
    reference = getattr(entry.reference, key, None) if entry and entry.reference else None
    text = compare_cell(values, reference, metric, comparable)
    if entry is None or not comparable or not metric.published:
        return text, ()
    differs = ("paper",) if key == "params" and _params_differ(values, reference) else ()
    second = getattr(entry.second, key, None) if entry.second and key in ("top1", "top5") else None
    if second is not None:
        return f"{text} [{format_number(second, metric.digits)}]", differs
    ours = statistics.fmean(values) if values else None
    comparison = entry.own and own_unit_comparison(entry.own, key, ours, plain_gflops)
    if comparison:
        bracket, same = comparison
        return f"{text} [{bracket}]", differs + (() if same else ("own",))
    return text, differs


@functools.lru_cache(maxsize=None)
def _plain_gflops(backbone: str, image_size: int) -> float:
    """Our plain ResNet's GFLOPs in the paper's unit (for a run table's GFLOPs increments)."""
    return paper_gflops(build_variant(plain(backbone)), image_size)


# Parameters do not depend on the image size: #P of a run on the paper's dataset at another size still compares.
SIZE_FREE = frozenset({"params"})


def comparable_with_paper(protocol: tuple[Optional[str], Optional[int]], paper_protocol: tuple[str, int],
                          key: str) -> bool:
    """Whether our value of this metric, measured on `protocol` (dataset, image size), compares with the
    paper's: the same dataset (its classes set the classifier's size) and, but for #P, the same image size."""
    return protocol[0] == paper_protocol[0] if key in SIZE_FREE else tuple(protocol) == tuple(paper_protocol)


def _shows_paper(spec: TableSpec, cells: Iterable[Measured]) -> bool:
    """Whether the table sets the paper's figures beside ours: when some run compares with one of them, or
    no run fills it. A table of digits or Tiny-ImageNet runs alone shows ours alone: ImageNet figures
    beside them (or in the cells we never trained) would read as if they compared."""
    cells = list(cells)
    published = [key for key in spec.metrics if METRICS[key].published]
    return not cells or any(comparable_with_paper(cell.protocol, spec.protocol, key)
                            for cell in cells for key in published)


@dataclass
class _Filling:
    """A run table being filled: its CSV records, the cells a note must explain, and which cell forms it
    holds (the notes say how to read each form the table shows, and only those)."""

    spec: TableSpec
    measured: Mapping[Variant, Measured]
    paper_shown: bool
    records: list[dict] = field(default_factory=list)
    differing: list[tuple[Variant, str, str]] = field(default_factory=list)  # (variant, metric, against)
    forms: set[str] = field(default_factory=set)
    # {(dataset, image size) other than the paper's: labels of the cells measured so}
    apart: dict[tuple, list[str]] = field(default_factory=dict)

    def row(self, backbone: str, row_label: str, cells: Mapping[Optional[str], Entry]) -> list[str]:
        row = [paper.SHORT_NAME.get(backbone, backbone), row_label]
        for group in self.spec.groups or (None,):
            entry = cells.get(group)
            cell = self.measured.get(entry.variant) if entry and entry.variant else None
            if cell is not None and tuple(cell.protocol) != tuple(self.spec.protocol):
                label = f"{row[0]} {row_label}" + (f" {group}" if group else "")
                self.apart.setdefault(cell.protocol, []).append(label)
            row += [self.cell(backbone, row_label, group, entry, cell, key) for key in self.spec.metrics]
        return row

    def cell(self, backbone: str, row_label: str, group: Optional[str], entry: Optional[Entry],
             cell: Optional[Measured], key: str) -> str:
        metric = METRICS[key]
        values = tuple(cell.values.get(key, ())) if cell else ()
        reference = getattr(entry.reference, key, None) if entry and entry.reference else None
        comparable = cell is None or comparable_with_paper(cell.protocol, self.spec.protocol, key)
        shown = reference if metric.published and self.paper_shown and comparable else None
        self.records.append(_record(self.spec.name, backbone, row_label, group, key, values, shown, metric))
        if not metric.published or not self.paper_shown:
            self.forms |= {"ours alone"} if values and metric.published else set()
            return format_ours(values, metric)
        if not comparable:  # a run on another dataset or image size: no figure of the paper's is its
            self.forms |= {"ours / – (elsewhere)"} if values else set()
            return compare_cell(values, None, metric)
        self.forms |= {_form(values, reference)}
        # A method paper's GFLOPs increment needs our plain ResNet's, which the runs may not have.
        own = entry.own if entry else None
        increment = bool(values) and key == "gflops" and own is not None and not own.gflops_absolute
        plain_gflops = _plain_gflops(backbone, self.spec.protocol[1]) if increment else None
        text, differs = reference_cell(entry, key, values, True, plain_gflops)
        if cell is not None and not cell.options:
            self.differing += [(entry.variant, key, against) for against in differs]
        if text.endswith("]"):  # a second reference in brackets: of an accuracy or of a size
            self.forms.add("second size" if key in ("params", "gflops") else "second accuracy")
        return text


def _form(values: Sequence[float], reference: Optional[float]) -> str:
    """The form of a cell under the paper's protocol, as the notes name it."""
    if values:
        return "ours / paper" if reference is not None else "ours / – (unpublished)"
    return "– / paper" if reference is not None else "– / –"


def fill_table(spec: TableSpec, measured: Mapping[Variant, Measured], full: bool = False) -> Table:
    """The spec with our numbers (by variant) beside the paper's: only the rows some run fills,
    or every row of the paper's layout with `full` (missing variants are gaps)."""
    groups = spec.groups or (None,)
    header = ["backbone", spec.row_header] + [
        f"{group} {METRICS[key].label}" if group else METRICS[key].label for group in groups for key in spec.metrics
    ]
    every_row = _rows(spec)
    shown = {row: cells for row, cells in every_row.items()
             if full or any(entry.variant in measured for entry in cells.values())}
    filling = _Filling(spec, measured, _shows_paper(spec, (measured[entry.variant] for cells in shown.values()
                                                           for entry in cells.values() if entry.variant in measured)))
    rows = [filling.row(backbone, row_label, cells) for (backbone, row_label), cells in shown.items()]
    notes = _cell_notes(spec, [measured[v] for v in spec.variants() if v in measured], filling)
    if filling.paper_shown:
        notes += row_notes(spec, [entry for cells in shown.values() for entry in cells.values()], spec.metrics)
    notes += difference_notes(filling.differing)
    if len(shown) < len(every_row):
        notes.append(f"Only the rows our runs fill ({len(every_row) - len(shown)} of the paper's left out): "
                     "make_tables --full prints them all.")
    return Table(spec.name, spec.title, spec.caption, header, rows, filling.records, notes)


def _record(table: str, backbone: str, row: str, group: Optional[str], metric_key: str, values: Sequence[float],
            shown: Optional[float], metric: Metric) -> dict:
    """One CSV line: our mean, its spread and run count, the paper's figure where the table sets it beside
    ours (`shown`: runs measured as the paper's were, or no run) and the difference, unrounded."""
    mean, std = mean_and_std(values, metric)
    return {"table": table, "backbone": backbone, "row": row, "group": group or "", "metric": metric_key,
            "ours": mean, "std": std, "runs": len(values) or None, "paper": shown,
            "difference": mean - shown if mean is not None and shown is not None else None}


# The specs that hold the paper's printed cells (Table 9 repeats Table 4's top-1; Figure 6 holds none).
PAPER_TABLES = ("table2", "table3", "table4", "table5")
# The R-50 rows whose accuracies are SRM's paper's (method_reference.SRM_TABLE), by variant.
SRM_TABLE_ROWS = {plain("resnet50"): "ResNet", channel_attention("resnet50", "se"): "SE",
                  channel_attention("resnet50", "srm"): "SRM*"}


def _cell_name(entry: Entry) -> str:
    return " ".join(filter(None, (paper.SHORT_NAME[entry.backbone], entry.row, entry.group)))


def disagreements(spec: TableSpec, entries: Iterable[Entry], metrics: Iterable[str]) -> list[str]:
    """'R-18 ECA* FPS‡ 848 (Table 5: 839)': the cells of these entries that another of the paper's tables
    prints differently for the same model (each table holds its own)."""
    if spec.name not in PAPER_TABLES:
        return []
    found: dict[str, dict[str, list[str]]] = {}  # {our cell as printed: {the other figure: [tables]}}
    for entry in (entry for entry in entries if entry.reference):
        for key in metrics:
            digits, ours = METRICS[key].digits, getattr(entry.reference, key)
            for other in (TABLES[name] for name in PAPER_TABLES if name != spec.name and key in TABLES[name].metrics):
                for twin in (e for e in other.entries if e.variant == entry.variant and e.reference):
                    theirs = getattr(twin.reference, key)
                    if None not in (ours, theirs) and ours != theirs:
                        cell = f"{_cell_name(entry)} {METRICS[key].label} {ours:.{digits}f}"
                        found.setdefault(cell, {}).setdefault(f"{theirs:.{digits}f}", []).append(other.paper_name)
    return [f"{cell} ({', '.join(f'{_tables_text(names)}: {figure}' for figure, names in others.items())})"
            for cell, others in found.items()]


def _tables_text(names: list[str]) -> str:
    """'Table 5', or 'Tables 3 and 4'."""
    return names[0] if len(names) == 1 else "Tables " + " and ".join(name.split()[-1] for name in names)


def row_notes(spec: TableSpec, entries: Sequence[Entry], metrics: Sequence[str]) -> list[str]:
    """Notes on the paper's figures in these rows: where its tables disagree, a probable error of the source,
    figures taken from another paper's table, and the sources of the second references."""
    entries = [entry for entry in entries if entry is not None]
    notes = []
    found = disagreements(spec, entries, metrics)
    if found:
        notes.append("The paper's tables print some cells of one model differently; each table holds its own: "
                     + "; ".join(found) + ".")
    if any(entry.backbone == "resnet18" and entry.variant.attention == "bam" and entry.reference for entry in entries):
        bam = paper.TABLE_5[("resnet18", "BAM")]
        notes.append(f"R-18 BAM: the paper's row repeats its R-50 BAM row's top-1, top-5 and speeds ({bam.top1:.2f} / "
                     f"{bam.top5:.2f}; {bam.fps:.0f}, {bam.fps_model:.0f}, {bam.fps_pipeline:.0f}) with an R-18 size "
                     f"({bam.params:.3f} / {bam.gflops:.3f}): held as printed, a probable error of the source.")
    srm = [label for label in (SRM_TABLE_ROWS.get(entry.variant) for entry in entries if entry.reference) if label]
    if srm and {"top1", "top5"} & set(metrics):
        notes.append(f"R-50 {', '.join(dict.fromkeys(srm))}: the paper's top-1 / top-5 are those of SRM's paper's "
                     f"table ({SRM_TABLE_SOURCE}: " + ", ".join(f"{a:.2f} / {b:.2f}" for a, b in SRM_TABLE.values())
                     + f" for ResNet-50, SE-ResNet-50, SRM-ResNet-50), trained {SRM_EPOCHS} epochs, not a 100-epoch "
                     "retrain under the paper's protocol (docs/paper.md#training-protocol).")
    sources = {}  # the second references the cells show: accuracies (second), #P and GFLOPs (own)
    for entry in entries:
        for second, shown in ((entry.second, {"top1", "top5"}), (entry.own, {"params", "gflops"})):
            if second and shown & set(metrics):
                sources[second.label] = second.source + _baseline_text(METHOD_REFERENCES.get(entry.variant.attention))
    if sources:
        notes.append("Second references [...]: " + "; ".join(f"{label}: {source}" for label, source in sources.items())
                     + ".")
    return notes


def _baseline_text(own: Optional[MethodReference]) -> str:
    """'; its plain ResNet-50: 75.20 / 92.52 (source)': the baseline a method's own paper compares with."""
    if own is None or own.base_top1 is None:
        return ""
    top5 = "" if own.base_top5 is None else f" / {own.base_top5:.2f}"
    return f"; its plain ResNet-50: {own.base_top1:.2f}{top5}" + (f" ({own.base_source})" if own.base_source else "")


def units_note(metric_keys: Iterable[str], others: bool = False) -> list[str]:
    """The paper's units, for tables with parameter or GFLOPs columns (`others`: with rows of other methods)."""
    if not {"params", "gflops"} & set(metric_keys):
        return []
    rows = ("its SE / ECA / SRM and EMCA rows within 0.2 % and its other methods' within 0.25 %, but BAM's and "
            "A2-Nets' (their notes)") if others else "its attention rows within 0.2 %"
    return [
        "#P in M = 2^20 parameters and GFLOPs in 2^30 multiply-accumulates, the paper's units "
        "(docs/paper.md#units). GFLOPs count conv and linear layers, 2 per BatchNorm output and 1 per averaged "
        f"element: that gives the paper's plain-ResNet GFLOPs to the digit and {rows}."
    ]


def _has_others(spec: TableSpec) -> bool:
    """Whether the table has rows of methods other than the paper's SE / ECA / SRM and their EMCA versions."""
    return any(e.variant.attention.removeprefix("emca_") not in ("none", *KINDS) for e in spec.entries if e.variant)


def _protocol_text(protocol: tuple[Optional[str], Optional[int]]) -> str:
    dataset, size = protocol
    return f"{dataset or 'an unrecorded dataset'} at {f'{size} px' if size else 'an unrecorded size'}"


def _second_text(accuracy: bool, size: bool) -> str:
    """How the second references read, for a table that shows some: of accuracies, of #P and GFLOPs."""
    if not (accuracy or size):
        return ""
    what = []
    if accuracy:
        what.append("their accuracy")
    if size:
        what.append("for #P and GFLOPs ours / theirs in their paper's unit at its printed digits (GFLOPs as the "
                    "increment over its plain ResNet-50, EPSANet's as printed)")
    return f"; [...]: a second reference, the method's own authors' figure (sources below): {', or '.join(what)}"


def _cell_notes(spec: TableSpec, shown: list[Measured], filling: _Filling) -> list[str]:
    """How to read the cells: each form the table holds, units, repeats, and which cells stand alone and why."""
    if not any(METRICS[key].published for key in spec.metrics):
        notes = ["Cells: ours ('–' = not measured); the paper publishes no values for them."]
    elif filling.paper_shown:
        notes = _paper_legend(spec, filling)
    else:
        notes = [_ours_alone_legend(spec, filling.apart)]
    if any(len(values) > 1 for cell in shown for key, values in cell.values.items() if not METRICS[key].per_model):
        notes.append("Repeated runs of a variant (seeds): mean ± sample standard deviation (n = runs).")
    if any(key.startswith("top1_rot") for key in spec.metrics):
        notes.append(f"Rotated columns: ours alone: the paper prints no figure of {spec.paper_name}, neither in its "
                     "text nor in the authors' README (github.com/eslambakr/EMCA); top-1 is the unrotated accuracy, "
                     "beside Table 4's.")
    return notes + units_note(spec.metrics, _has_others(spec))


def _paper_legend(spec: TableSpec, filling: _Filling) -> list[str]:
    """One line per cell form of a table that sets the paper's figures beside ours."""
    paper_at = _protocol_text(spec.protocol)
    forms = filling.forms
    notes = [f"Cells: ours / paper (ours - paper), ours measured on {paper_at} as the paper's were"
             + _second_text("second accuracy" in forms, "second size" in forms) + "; '–' = none."]
    if "– / paper" in forms:
        notes.append("– / paper: ours not measured (no run of the cell, or a speed eval.py has not measured), the "
                     "paper's figure alone.")
    if "ours / – (unpublished)" in forms:
        notes.append("ours / –: the paper publishes no figure for this cell.")
    for protocol, labels in filling.apart.items():
        sized = protocol[0] == spec.protocol[0] and SIZE_FREE & set(spec.metrics)
        but = ", but for #P, which the image size does not change" if sized else ""
        notes.append(f"ours / –: measured on {_protocol_text(protocol)}, for which the paper has no figures (the "
                     f"paper's are on {paper_at}){but}: {', '.join(labels)}.")
    return notes


def _ours_alone_legend(spec: TableSpec, apart: Mapping[tuple, list[str]]) -> str:
    """The line of a table that shows ours alone: where they were measured and where the paper's figures are."""
    several = len(apart) > 1
    where = "; ".join(_protocol_text(protocol) + (f" ({', '.join(labels)})" if several else "")
                      for protocol, labels in apart.items())
    # #P depends on the classifier (the dataset's classes) alone, GFLOPs on the image size too.
    counted = {frozenset({"params"}): "#P counts the runs' own classifier",
               frozenset({"gflops"}): "GFLOPs count the runs' own classifier and image size",
               frozenset({"params", "gflops"}): "#P and GFLOPs count the runs' own classifier (GFLOPs their image "
                                                "size too)"}.get(frozenset({"params", "gflops"} & set(spec.metrics)))
    sizes = counted and (f", and our {counted}: make_tables --complexity counts the same models at 1000 classes and "
                         "224 px beside the paper's")
    return (f"Cells: ours alone, measured on {where}; '–' = not trained or not measured. The paper's figures are left "
            f"out (docs/paper.md#reference-figures has them): they are on "
            f"{_protocol_text(spec.protocol)}, so none of our accuracies or speeds here compares with them"
            f"{sizes or ''}.")


def complexity_table(spec: TableSpec, counts: Mapping[Variant, tuple[int, float]], image_size: int = 224) -> Table:
    """Parameters and GFLOPs (the paper's units) of every variant of the spec, and their increase
    over the plain ResNet of the same backbone, ours beside the paper's.

    counts: {variant: (parameters, GFLOPs in 2^30 units)}, the plain ResNet of every backbone included.
    """
    header = ["backbone", spec.row_header, "#P (M)", "GFLOPs", "ΔP (M)", "ΔGFLOPs"]
    comparable = image_size == spec.protocol[1]  # parameters do not depend on it; GFLOPs do
    rows, records, differing = [], [], []
    for entry in _first_entries(spec):
        variant, backbone, reference = entry.variant, entry.backbone, entry.reference or Reference()
        params, gflops = counts[variant][0] / paper.PARAM_UNIT, counts[variant][1]
        base_params, base_gflops = counts[plain(backbone)][0] / paper.PARAM_UNIT, counts[plain(backbone)][1]
        paper_base = _plain_reference(spec, backbone)
        values = {
            "params": counts[variant][0], "params_m": params, "paper_params_m": reference.params,
            "delta_params_m": params - base_params, "paper_delta_params_m": _minus(reference.params, paper_base.params),
            "gflops": gflops, "paper_gflops": reference.gflops,
            "delta_gflops": gflops - base_gflops, "paper_delta_gflops": _minus(reference.gflops, paper_base.gflops),
        }
        label = entry.row if entry.group is None else f"{entry.row} {entry.group}"
        params_cell, params_differ = reference_cell(entry, "params", (params,))
        gflops_cell, gflops_differ = reference_cell(entry, "gflops", (gflops,), comparable, base_gflops)
        rows.append([paper.SHORT_NAME.get(backbone, backbone), label, params_cell, gflops_cell,
                     _delta_cell(values["delta_params_m"], values["paper_delta_params_m"], True),
                     _delta_cell(values["delta_gflops"], values["paper_delta_gflops"], comparable)])
        records.append({"table": spec.name, "backbone": backbone, "row": label, **values})
        differing += [(variant, key, against) for key, differs in (("params", params_differ),
                                                                   ("gflops", gflops_differ)) for against in differs]
    sizes = any(entry.own for entry in _first_entries(spec))
    notes = ["Cells: ours / paper (ours - paper)" + _second_text(False, sizes) + ". Ours: counted on each model built "
             "with the paper's options (SE without biases) and 1000 classes."] + units_note(["params", "gflops"],
                                                                                           _has_others(spec))
    notes.append("Δ: increase over the plain ResNet of the same backbone (the paper's from the ResNet rows of "
                 f"{'this table' if any(e.variant == plain(e.backbone) for e in spec.entries) else 'Table 4'}).")
    if not comparable:
        notes.append(f"GFLOPs at {image_size} px, ours alone (the paper's are at {spec.protocol[1]} px).")
    notes += row_notes(spec, _first_entries(spec), ("params", "gflops") if comparable else ("params",))
    notes += difference_notes(differing)
    return Table(f"{spec.name}_complexity", f"{spec.title}: complexity", f"{spec.caption}: complexity",
                 header, rows, records, notes)


def _plain_reference(spec: TableSpec, backbone: str) -> Reference:
    """The paper's plain ResNet row of this backbone: the table's own, or Table 4's for a table without one."""
    return next((entry.reference for entry in spec.entries
                 if entry.backbone == backbone and entry.variant == plain(backbone) and entry.reference),
                paper.TABLE_4[(backbone, "ResNet")])


def _first_entries(spec: TableSpec) -> list[Entry]:
    """The first entry of each variant (Table 2 and 3 list some models twice)."""
    first: dict[Variant, Entry] = {}
    for entry in spec.entries:
        if entry.variant is not None:
            first.setdefault(entry.variant, entry)
    return list(first.values())


def _minus(value: Optional[float], base: Optional[float]) -> Optional[float]:
    return None if value is None or base is None else value - base


def _delta_cell(ours: float, reference: Optional[float], comparable: bool, digits: int = 3) -> str:
    """'ours / paper' (a difference of increases would say nothing the absolute columns do not)."""
    ours_text = format_number(ours, digits)
    return f"{ours_text} / {format_number(reference, digits)}" if comparable else ours_text


# ----------------------------------------------------------------------------- Tables 6 and 8: COCO detection
DETECTION_BACKBONE = "resnet50"
DETECTORS = ("faster_rcnn", "mask_rcnn", "retinanet")
AP_COLUMNS = {"ap": "AP", "ap50": "AP50", "ap75": "AP75", "ap_s": "AP_S", "ap_m": "AP_M", "ap_l": "AP_L"}
IOU_TYPES = {"bbox": "box", "segm": "mask"}
AP_METRICS = tuple(f"{iou}_{key}" for iou in IOU_TYPES for key in AP_COLUMNS)  # results.json's val_<key>, in %
# MMDetection's units (decimal), unlike the binary #P and GFLOPs of METRICS.
DETECTION_METRICS = {
    "params_1e6": Metric("#P (M)", 2, per_model=True),
    "gflops_1e9": Metric("GFLOPs", 2, per_model=True),
    **{key: Metric(AP_COLUMNS[key.split("_", 1)[1]], 1) for key in AP_METRICS},
}
_REFERENCE_FIELDS = {"params_1e6": "params", "gflops_1e9": "gflops"}  # the metrics with held figures
NOT_HELD = ("the project holds no other figure of Tables 6 and 8 than the plain detectors' #P and GFLOPs "
            "(docs/paper.md#tables-6-and-8)")


@dataclass(frozen=True)
class DetectionEntry:
    detector: str
    row: str  # the method, as the paper labels it
    variant: Variant
    reference: Optional[paper.DetectionReference]  # None: the project holds none of the row's figures

    @property
    def cell(self) -> tuple[str, Variant]:
        """The key of the row's runs in measurements() (Run.cell)."""
        return self.detector, self.variant

    @property
    def label(self) -> str:
        return f"{paper.DETECTOR_LABEL[self.detector]} {self.row}"

    def count(self, counting: str = "mmdet") -> DetectorCount:
        return count_detector(self.detector, self.variant.backbone, self.variant.attention, self.variant.coverage,
                              counting)


@dataclass(frozen=True)
class DetectionSpec:
    """A table of COCO runs: rows (detector, method) of R-50-FPN detectors, columns of DETECTION_METRICS."""

    name: str
    paper_name: str
    caption: str
    metrics: tuple[str, ...]
    entries: tuple[DetectionEntry, ...]
    required: str  # the metric a run must have to fill the table: box AP, mask AP for Table 8
    protocol: tuple[str, int] = paper.DETECTION_PROTOCOL

    @property
    def title(self) -> str:
        return f"{self.paper_name}: {self.caption}"

    def cells(self) -> list[tuple[str, Variant]]:
        return list(dict.fromkeys(entry.cell for entry in self.entries))

    def filled_by(self, measured: Mapping[object, Measured]) -> bool:
        return any(self.required in measured[cell].values for cell in self.cells() if cell in measured)


def _detection_methods(detector: str) -> list[tuple[str, Variant]]:
    """One detector's rows: the plain R-50, GC and NL (one non-local block: Mask R-CNN's rows), then SE / ECA (every
    block) and their EMCA versions (the paper's coverage)."""
    rows = [("ResNet", plain(DETECTION_BACKBONE))]
    if detector == "mask_rcnn":
        rows += [(kind_of(name).label, Variant(DETECTION_BACKBONE, name, default_integration(name)))
                 for name in ("gc", "nl")]
    for kind in ("se", "eca"):
        rows += [(KIND_LABELS[kind], channel_attention(DETECTION_BACKBONE, kind, "all")),
                 (f"EMCA-{KIND_LABELS[kind]}", emca(DETECTION_BACKBONE, kind, DEFAULT_COVERAGE))]
    return rows


def _detection_entries(detectors: Sequence[str]) -> tuple[DetectionEntry, ...]:
    return tuple(DetectionEntry(detector, row, variant,
                                paper.TABLE_6_PLAIN.get(detector) if variant.attention == "none" else None)
                 for detector in detectors for row, variant in _detection_methods(detector))


DETECTION_TABLES: dict[str, DetectionSpec] = {
    spec.name: spec for spec in (
        DetectionSpec("table6", "Table 6", "object detection on COCO with R-50-FPN detectors (box AP, val)",
                      ("params_1e6", "gflops_1e9", *(key for key in AP_METRICS if key.startswith("bbox_"))),
                      _detection_entries(DETECTORS), "bbox_ap"),
        DetectionSpec("table8", "Table 8", "instance segmentation on COCO with Mask R-CNN R-50-FPN (mask AP, val)",
                      tuple(key for key in AP_METRICS if key.startswith("segm_")), _detection_entries(("mask_rcnn",)),
                      "segm_ap"),
    )
}


def detection_units_note() -> str:
    return ("#P: trainable parameters in 10^6 (stem and stage 1 frozen, the other stages' BatchNorm affine values "
            "trained, as the paper's MMDetection runs); GFLOPs: 10^9 multiply-adds of one 1280 x 800 image as "
            "MMDetection's get_flops counts them, with the heads the paper counts (81 classes, 80 for RetinaNet): "
            "docs/paper.md#tables-6-and-8. Decimal units, unlike Tables 2-5's.")


@dataclass
class _DetectionFilling:
    """A detection table being filled from runs: its CSV records and what its notes must explain."""

    spec: DetectionSpec
    measured: Mapping[object, Measured]
    records: list[dict] = field(default_factory=list)
    forms: set[str] = field(default_factory=set)
    apart: dict[tuple, list[str]] = field(default_factory=dict)  # {(dataset, min_size) not the paper's: row labels}
    differing: list[tuple[DetectionEntry, float]] = field(default_factory=list)  # plain #P printing off the paper's
    repeated: bool = False

    def row(self, entry: DetectionEntry) -> list[str]:
        cell = self.measured.get(entry.cell)
        if cell is not None and tuple(cell.protocol) != tuple(self.spec.protocol):
            self.apart.setdefault(tuple(cell.protocol), []).append(entry.label)
        return [paper.DETECTOR_LABEL[entry.detector], entry.row] + [self.cell(entry, cell, key)
                                                                     for key in self.spec.metrics]

    def cell(self, entry: DetectionEntry, cell: Optional[Measured], key: str) -> str:
        metric = DETECTION_METRICS[key]
        values = () if cell is None else tuple(cell.values.get(key, ()))
        if cell is not None and key == "gflops_1e9":  # runs record none: the row's model, counted
            values = (entry.count().gflops,)
        reference = getattr(entry.reference, _REFERENCE_FIELDS.get(key, ""), None)
        # A run on another dataset trained other heads: its #P is its own, no figure of the paper's is its.
        comparable = key != "params_1e6" or cell is None or cell.protocol[0] == self.spec.protocol[0]
        shown = reference if comparable else None
        self.records.append({**_record(self.spec.name, DETECTION_BACKBONE, entry.label, None, key, values, shown,
                                       metric), "detector": entry.detector})
        self.repeated |= len(values) > 1 and not metric.per_model
        if key not in _REFERENCE_FIELDS:  # AP: the project holds none of the paper's
            return format_ours(values, metric)
        if comparable:  # a run elsewhere is named by the notes' measured-on line
            self.forms.add(_form(values, shown))
        if key == "params_1e6" and shown is not None and _params_differ(values, shown):
            self.differing.append((entry, statistics.fmean(values)))
        return compare_cell(values, shown, metric)

    def notes(self) -> list[str]:
        iou = IOU_TYPES[self.spec.required.split("_")[0]]
        notes = []
        if "ours / paper" in self.forms or "– / paper" in self.forms:
            notes.append("#P and GFLOPs: ours / paper (ours - paper); '–' = none.")
        if "ours / – (unpublished)" in self.forms:
            notes.append(f"ours / –: the paper's figure is not held: {NOT_HELD}.")
        if "– / paper" in self.forms:
            notes.append("– / paper: no run of the row, the paper's figure alone.")
        notes.append(f"AP columns: ours alone, COCO {iou} AP in percent ('–' = no run): {NOT_HELD}.")
        if self.repeated:
            notes.append("Repeated runs of a row (seeds): mean ± sample standard deviation (n = runs).")
        for (dataset, size), labels in self.apart.items():
            own = ", its #P ours / – (its labels set the heads)" if dataset != self.spec.protocol[0] else ""
            notes.append(f"Measured on {dataset} at a shorter side of {size} px, not the paper's "
                         f"{self.spec.protocol[0]} at {self.spec.protocol[1]} px{own}: {', '.join(labels)}.")
        if _REFERENCE_FIELDS.keys() & set(self.spec.metrics):
            notes += [detection_units_note(), "Ours: #P as each run recorded it (results.json params_trained, with "
                      "the heads of its own labels); GFLOPs counted on the row's model, which runs do not record "
                      "(make_tables --complexity counts every row)."]
        notes += [_trained_params_note(entry, ours) for entry, ours in self.differing]
        return notes


def _trained_params_note(entry: DetectionEntry, ours: float) -> str:
    """Why a run's #P prints off the paper's: the heads it trained, each count computed."""
    coco, mmdet = entry.count("coco_ids").params, entry.count().params
    return (f"#P of {entry.label}: the run trained {round(ours * paper.DETECTION_PARAM_UNIT):,} parameters; the "
            f"row's model has {coco:,} with the heads a COCO run trains (labels are COCO's category ids: 91 classes) "
            f"and {mmdet:,} with MMDetection's, which the paper counts.")


def fill_detection_table(spec: DetectionSpec, measured: Mapping[object, Measured], full: bool = False) -> Table:
    """A detection spec with our runs' figures (measured by (detector, Variant) cell): only the rows some run
    fills, or every row of the paper's layout with `full`."""
    header = ["detector", "method"] + [DETECTION_METRICS[key].label for key in spec.metrics]
    shown = [entry for entry in spec.entries if full or entry.cell in measured]
    filling = _DetectionFilling(spec, measured)
    rows = [filling.row(entry) for entry in shown]
    notes = filling.notes()
    if len(shown) < len(spec.entries):
        notes.append(f"Only the rows our runs fill ({len(spec.entries) - len(shown)} of the paper's left out): "
                     "make_tables --full prints them all.")
    return Table(spec.name, spec.title, spec.caption, header, rows, filling.records, notes)


def detection_complexity_table(spec: DetectionSpec) -> Table:
    """#P and GFLOPs (MMDetection's count) of every row's detector and their increase over the plain detector,
    ours beside the paper's where the project holds them."""
    header = ["detector", "method", "#P (M)", "GFLOPs", "ΔP", "ΔGFLOPs"]
    rows, records, differing = [], [], []
    for entry in spec.entries:
        count, base = entry.count(), count_detector(entry.detector, DETECTION_BACKBONE)
        reference = entry.reference or paper.DetectionReference()
        cells = []
        for key, ours, theirs in (("params_1e6", count.params_m, reference.params),
                                  ("gflops_1e9", count.gflops, reference.gflops)):
            metric = DETECTION_METRICS[key]
            cells.append(compare_cell((ours,), theirs, metric))
            if theirs is not None and round(ours, metric.digits) != theirs:
                differing.append(f"{entry.label} {metric.label} {ours:.{metric.digits + 2}f}")
        rows.append([paper.DETECTOR_LABEL[entry.detector], entry.row, *cells, f"{count.params - base.params:+,}",
                     f"{count.gflops - base.gflops:+.2f}"])
        records.append({"table": spec.name, "backbone": DETECTION_BACKBONE, "detector": entry.detector,
                        "row": entry.label, "params": count.params, "params_1e6": count.params_m,
                        "paper_params_1e6": reference.params, "gflops_1e9": count.gflops,
                        "paper_gflops_1e9": reference.gflops, "delta_params": count.params - base.params,
                        "delta_gflops_1e9": count.gflops - base.gflops})
    notes = [f"Cells: ours / paper (ours - paper) for the plain detectors, ours / – for the others: {NOT_HELD}. Ours: "
             "each row's detector built with the paper's settings (configs/detector's defaults) and attention options.",
             detection_units_note(), "ΔP: trainable parameters the attention adds to the plain detector; ΔGFLOPs: "
             "its increase."]
    if differing:
        notes.append(f"Not the paper's printed figure: {'; '.join(differing)} (what the count follows and where it "
                     "cannot: docs/paper.md#tables-6-and-8).")
    return Table(f"{spec.name}_complexity", f"{spec.title}: complexity", f"{spec.caption}: complexity", header, rows,
                 records, notes)
