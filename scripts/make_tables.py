"""The paper's tables from training runs, with the published numbers beside ours.

    python scripts/make_tables.py multirun/table3/2026-01-01_10-00-00 [more sweep folders] --out tables/
    python scripts/make_tables.py multirun/table4/... --full       # every row of the paper's layout
    python scripts/make_tables.py multirun/table4/... --plot       # and top-1 against #P, GFLOPs, FPS
    python scripts/make_tables.py --complexity                    # params / GFLOPs, no training needed
    python scripts/make_tables.py --complexity --tables table4 --backbones resnet18 --image-size 224
    python scripts/make_tables.py --complexity --tables table6 table8  # detectors, MMDetection's count

Run folders are found recursively (any folder with results.json or .hydra/config.yaml); each
one's model, dataset and image size come from what the run recorded (results.json, or the
checkpoint eval.py measured). Only rows some run fills are printed unless --full; repeated runs
of one model (seeds) are shown as mean ± std (n runs). Cells read `ours / paper (ours - paper)` for
runs on ImageNet at 224 px, as the paper's were (#P at any size), `– / paper` where ours is not
measured and `ours / –` for a run on another dataset or size; a table whose runs are all on
another dataset (digits, Tiny-ImageNet) shows ours alone, without the paper's ImageNet figures.
The notes under each table say how to read each form it holds, and name the override (e.g.
attention.se_bias=false) or preset that trains the paper's model where a run's options differ.
#P and GFLOPs are in the paper's units (2^20 parameters, 2^30 multiply-accumulates). Prints Markdown and
writes to --out: tables.md, tables.csv (one number per line), one .tex per table (booktabs) and
figure9_val_top1.png (validation top-1 per epoch of every run found); --plot adds
tradeoff_<dataset>_<size>px.png and .pdf (emca/analysis/tradeoff.py). Table 9 (rotations) and
Figure 6 (learned-scale statistics) come from the runs' eval.json (eval.py). Tables 6 and 8 (COCO
detection and instance segmentation) come from task=detection runs: box and mask AP, and #P and
GFLOPs as MMDetection counts them (10^6 trainable parameters, 10^9 multiply-adds at 1280 x 800), of
which the project holds the paper's figures for the plain detectors alone (docs/paper.md#tables-6-and-8).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from emca.analysis import render
from emca.analysis.complexity import count_variants
from emca.analysis.curves import plot_top1_curves
from emca.analysis.runs import ACCURACIES, find_runs, measurements
from emca.analysis.tables import (
    DETECTION_BACKBONE,
    DETECTION_TABLES,
    TABLES,
    Table,
    complexity_table,
    detection_complexity_table,
    fill_detection_table,
    fill_table,
)
from emca.analysis.tradeoff import plot_tradeoffs
from emca.models import BACKBONES

# Tables whose models --complexity counts: the ImageNet tables that say so, and every detection table.
COUNTED = [name for name, spec in TABLES.items() if spec.complexity] + list(DETECTION_TABLES)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("sweep_dirs", nargs="*", type=Path, help="folders holding runs (searched recursively)")
    parser.add_argument(
        "--out", type=Path, help="where to write files (default: SWEEP_DIR/tables, or ./tables with --complexity)"
    )
    parser.add_argument(
        "--tables",
        nargs="+",
        choices=sorted({**TABLES, **DETECTION_TABLES}),
        help="which tables (default: every table a run fills; all with --complexity)",
    )
    parser.add_argument(
        "--accuracy", choices=ACCURACIES, default="final", help="the epoch whose accuracy is reported (default: final)"
    )
    parser.add_argument(
        "--full", action="store_true", help="print every row of the paper's tables, not only those runs fill"
    )
    parser.add_argument(
        "--complexity", action="store_true", help="count params / GFLOPs of every variant instead of reading runs"
    )
    parser.add_argument(
        "--plot", action="store_true",
        help="also draw top-1 against #P, GFLOPs and FPS, beside the paper's points (tradeoff_*.png and .pdf)"
    )
    parser.add_argument(
        "--backbones", nargs="+", choices=BACKBONES, help="--complexity: only these backbones (e.g. resnet18)"
    )
    parser.add_argument(
        "--image-size", type=int, default=224,
        help="--complexity: input resolution for the ImageNet tables' GFLOPs (default 224; detectors: 1280 x 800)"
    )
    args = parser.parse_args(argv)
    if not args.complexity and not args.sweep_dirs:
        parser.error("give at least one SWEEP_DIR (or --complexity)")
    if args.complexity and args.tables and not any(name in COUNTED for name in args.tables):
        parser.error(
            f"--complexity counts the variants of {', '.join(COUNTED)}; "
            f"{', '.join(args.tables)} hold(s) only measured results: drop --complexity and give the sweep folders"
        )
    held_back = [name for name in args.tables or () if name in DETECTION_TABLES]
    if args.complexity and args.backbones and DETECTION_BACKBONE not in args.backbones and held_back:
        parser.error(f"{', '.join(held_back)} hold(s) {DETECTION_BACKBONE} detectors: add {DETECTION_BACKBONE} to "
                     "--backbones or drop them from --tables")
    if args.complexity and args.plot:
        parser.error("--plot draws what runs measured; --complexity reads no runs: drop one of them")
    if args.complexity and args.full:
        parser.error("--full prints the rows runs leave empty; --complexity counts every row already: drop one of them")
    if args.image_size < 1:
        parser.error(f"--image-size={args.image_size} must be >= 1")
    if args.out is None:
        args.out = args.sweep_dirs[0] / "tables" if args.sweep_dirs else Path("tables")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out={args.out} is a file; give a folder for the tables")
    return args


def complexity_tables(args: argparse.Namespace) -> list[Table]:
    names = [name for name in args.tables or COUNTED if name in COUNTED]
    specs = [TABLES[name].restricted_to(args.backbones) for name in names if name in TABLES]
    specs = [spec for spec in specs if spec.variants()]
    counts = count_variants((variant for spec in specs for variant in spec.variants()), image_size=args.image_size)
    tables = [complexity_table(spec, counts, args.image_size) for spec in specs]
    if args.backbones is None or DETECTION_BACKBONE in args.backbones:  # the detection tables are R-50's
        tables += [detection_complexity_table(DETECTION_TABLES[name]) for name in names if name in DETECTION_TABLES]
    return tables


def table_cells(name: str) -> list:
    """The cells (measurements' keys) of a table: Variants, (detector, Variant) for the detection tables."""
    return DETECTION_TABLES[name].cells() if name in DETECTION_TABLES else TABLES[name].variants()


def default_tables(specs: dict, measured: dict) -> list[str]:
    """The tables the runs fill; ca_all (every method) only where it holds runs no paper table places, since
    it repeats Table 5's rows."""
    names = [name for name, spec in specs.items() if spec.filled_by(measured)]
    placed = {cell for name in names if name != "ca_all" for cell in table_cells(name)}
    if "ca_all" in names and all(cell in placed for cell in table_cells("ca_all") if cell in measured):
        names.remove("ca_all")
    return names


def protocol_text(run) -> str:
    size = f"{run.image_size} px shorter side (detection)" if run.task == "detection" else f"{run.image_size} px"
    return f"{run.dataset} at {size}"


def run_tables(args: argparse.Namespace) -> list[Table] | None:
    runs = find_runs(args.sweep_dirs)
    if not runs:
        return None
    measured, notes = measurements(runs, args.accuracy)
    specs = {**TABLES, **DETECTION_TABLES}
    names = args.tables or default_tables(specs, measured)
    placed = {cell for name in names for cell in table_cells(name)}
    notes += [f"not in {', '.join(names) or 'any paper table'}: {run.describe()} ({run.path})"
              for run in runs if run.complete and run.cell not in placed]
    datasets = sorted({protocol_text(run) for run in runs if run.complete})
    notes.insert(
        0,
        f"{len(runs)} run folder(s), trained on {', '.join(datasets) or 'nothing yet'}; "
        f"{args.accuracy}-epoch accuracy.",
    )
    tables = [fill_detection_table(DETECTION_TABLES[name], measured, args.full) if name in DETECTION_TABLES
              else fill_table(TABLES[name], measured, args.full) for name in names]
    for table in tables:
        table.notes += notes
    if not tables:
        print("\n".join(notes))
    figure = plot_top1_curves(runs, args.out / "figure9_val_top1.png")
    if figure is not None:
        print(f"wrote {figure}", file=sys.stderr)
    if args.plot:
        plot_tradeoff_figures(measured, args.out)
    return tables


def plot_tradeoff_figures(measured: dict, out: Path) -> None:
    figures = plot_tradeoffs(measured, out)
    for figure in figures:
        print(f"wrote {' and '.join(map(str, figure.paths))}", file=sys.stderr)
    if not figures:
        print("--plot: no run has a top-1 to draw", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    tables = complexity_tables(args) if args.complexity else run_tables(args)
    if tables is None:
        print(
            "error: no run folders (with results.json or .hydra/config.yaml) under "
            f"{', '.join(map(str, args.sweep_dirs))}",
            file=sys.stderr,
        )
        return 1
    text = "\n".join(render.markdown(table) for table in tables)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tables.md").write_text(text)
    (args.out / "tables.csv").write_text(render.csv_text(tables))
    for table in tables:
        (args.out / f"{table.name}.tex").write_text(render.latex(table))
    print(f"wrote {args.out}/tables.md, tables.csv and {len(tables)} .tex file(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
