"""The paper's reference numbers, table building and rendering, and scripts/make_tables.py on the
runs of a real (tiny) train.py sweep (shared with tests/test_eval.py)."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
from test_eval import RUN0, RUN1, make_sweep, run_python, sweep_base  # noqa: F401  (sweep_base is a fixture)

from emca.analysis import paper_reference as paper
from emca.analysis import render
from emca.analysis.complexity import count_variants
from emca.analysis.runs import find_runs, measurements
from emca.analysis.tables import TABLES, Measured, complexity_table, fill_table
from emca.analysis.variants import Variant, channel_attention, emca, plain, variant_from_config
from emca.layers.create_attn import ATTENTIONS

DESIGN_NOTES = Path(__file__).resolve().parents[1] / "docs" / "paper.md"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def trained_sweep(sweep_base) -> Path:  # noqa: F811
    return make_sweep(sweep_base)


# ----------------------------------------------------------------------------- reference numbers
def test_reference_blocks_are_verbatim_copies_of_the_design_notes():
    text = DESIGN_NOTES.read_text(encoding="utf-8")
    for block in (paper.TABLE_2_3_TEXT, paper.TABLE_4_TEXT, paper.TABLE_5_TEXT):
        assert block.strip() in text


def test_reference_numbers_parse_back():
    """The blocks' structure (tests/test_paper_cells.py checks their figures against the authors' README)."""
    assert len(paper.TABLE_2_3) == 3 * 6 * 3 and len(paper.TABLE_4) == 3 * 8 and len(paper.TABLE_5) == 10 + 9 + 13
    assert paper.TABLE_2_3[("resnet50", "prev_stage_all", "se")] == paper.Reference(
        params=25.037, top1=77.33, top5=93.52, fps=90
    )
    assert paper.TABLE_2_3[("resnet34", "all", "srm")].fps == 82
    assert paper.TABLE_2_3[("resnet18", "first(=none)", "srm")].top1 == 71.31
    r18 = paper.TABLE_4[("resnet18", "ResNet")]
    assert (r18.params, r18.gflops, r18.top1, r18.fps, r18.fps_model, r18.fps_pipeline) == (
        11.148,
        1.694,
        70.40,
        270,
        23552,
        859,
    )
    assert paper.TABLE_4[("resnet50", "EMCA-SRM")].fps_pipeline == 532
    # The star is part of the label: Table 4 prints ECA-Net's own run (ECA) beside the authors' retrain (ECA*).
    assert paper.TABLE_4[("resnet34", "ECA*")].top1 == 74.13 and paper.TABLE_4[("resnet34", "ECA")].top1 == 74.21
    assert paper.RETRAINED_BY_AUTHORS == {"ECA", "SRM", "FcaNet", "EPSANet", "SANet"}
    assert paper.TABLE_5[("resnet50", "A2-Nets")].fps is None  # the README's N/A
    assert paper.printed_label(paper.TABLE_5, "resnet50", "SANet") == "SANet*"
    assert paper.printed_label(paper.TABLE_5, "resnet18", "SANet") == "SANet"  # no such row: no star


# ----------------------------------------------------------------------------- table specs
def test_table_specs_cover_the_papers_rows():
    assert len(TABLES["table2"].variants()) == 27
    assert len(TABLES["table3"].variants()) == 45
    assert len(TABLES["table4"].variants()) == 21
    table5 = TABLES["table5"]
    assert len(table5.variants()) == 3 * 14
    assert [v.attention for v in table5.variants() if v.backbone == "resnet50"] == [
        "none", "se", "emca_se", "eca", "emca_eca", "srm", "emca_srm",
        "cbam", "emca_cbam", "bam", "fca", "sa", "epsa", "a2",
    ]
    # ca_all: every attention of the table, Table 5's rows first, with the same cells where both have the row.
    ca_all = TABLES["ca_all"]
    assert sorted({v.attention for v in ca_all.variants()}) == sorted(ATTENTIONS)
    assert len(ca_all.variants()) == 3 * len(ATTENTIONS)
    assert set(table5.entries) < set(ca_all.entries)
    # Every row the paper's Table 5 prints, with its own cells; the other rows (ours alone) have none.
    held = {(entry.backbone, entry.row): entry.reference for entry in table5.entries if entry.reference}
    assert held == paper.TABLE_5
    rows = {(entry.backbone, entry.row): entry for entry in table5.entries}
    assert rows[("resnet50", "CBAM")].reference.params == 26.775 and ("resnet50", "GC") not in rows
    assert {(e.backbone, e.row): e for e in ca_all.entries}[("resnet50", "GC")].reference is None
    assert rows[("resnet18", "EMCA-CBAM")].reference is None and ("resnet34", "BAM") in rows
    # Second references: the method's own R-50 figures (and FcaNet's R-34 top-1), none for the paper's own rows.
    assert rows[("resnet50", "FcaNet*")].second.top1 == 78.52 and rows[("resnet34", "FcaNet*")].second.top1 == 75.07
    assert rows[("resnet50", "CBAM")].own.params == 28.09 and rows[("resnet18", "CBAM")].own is None
    assert all(entry.second is None for entry in table5.entries if entry.variant.attention in ("none", *paper.KINDS))
    # Table 3's EMCA 'none' row and Table 2's 'first' row both quote the paper's first(=none) numbers.
    t3 = {(e.variant, e.group): e.reference for e in TABLES["table3"].entries}
    t2 = {(e.variant, e.group): e.reference for e in TABLES["table2"].entries}
    assert t3[(emca("resnet18", "srm", "none"), "SRM")] == t2[(channel_attention("resnet18", "srm", "first"), "SRM")]


def test_each_table_names_the_preset_that_trains_its_variants_with_the_papers_options():
    """A run off the paper's options is pointed to spec.preset (runs.options_notes): it must sweep the cell."""
    for spec in TABLES.values():
        assert (CONFIGS / "experiment" / f"{spec.preset}.yaml").is_file(), spec.name
        assert set(spec.variants()) <= set(TABLES[spec.preset].variants()), spec.name


def test_filled_table_puts_ours_beside_the_paper_and_leaves_gaps():
    se = channel_attention("resnet18", "se", "all")
    measured = {se: Measured.single({"top1": 71.5, "top5": 90.0, "params": 11.2306, "gflops": 1.814, "fps": 200.0})}
    table = fill_table(TABLES["table4"], measured, full=True)
    rows = {(row[0], row[1]): row for row in table.rows}
    header = table.header
    se_row, resnet_row = rows[("R-18", "SE")], rows[("R-18", "ResNet")]
    assert se_row[header.index("top-1")] == "71.50 / 70.59 (+0.91)"
    assert se_row[header.index("#P (M)")] == "11.231 / 11.231 (+0.000)"  # the paper's unit: counts compare too
    assert se_row[header.index("FPS")] == "200 / 187 (+13)"
    assert se_row[header.index("FPS†")] == "– / 21760"
    assert resnet_row[header.index("top-1")] == "– / 70.40"
    assert len(table.records) == 21 * 7


def test_markdown_latex_and_csv_renderings():
    table = fill_table(
        TABLES["table3"], {emca("resnet34", "eca", "prev_stage_all"): Measured.single({"top1": 74.0})}, full=True
    )
    markdown = render.markdown(table)
    assert markdown.count("\n| R-") == 15 and "| R-34 | EMCA prev_stage_all |" in markdown
    assert "74.00 / 74.46 (-0.46)" in markdown
    latex = render.latex(table)
    assert r"prev\_stage\_all" in latex and r"\begin{tabular}{ll" + "r" * 12 + "}" in latex and "–" not in latex
    records = list(csv.DictReader(io.StringIO(render.csv_text([table]))))
    assert len(records) == 45 * 4
    cell = next(
        r
        for r in records
        if r["backbone"] == "resnet34"
        and r["row"] == "EMCA prev_stage_all"
        and r["group"] == "ECA"
        and r["metric"] == "top1"
    )
    assert (float(cell["ours"]), float(cell["paper"]), float(cell["difference"])) == pytest.approx((74.0, 74.46, -0.46))


def test_complexity_table_compares_increases_over_the_plain_resnet():
    spec = TABLES["table4"]
    variants = [v for v in spec.variants() if v.backbone == "resnet18"]
    counts = count_variants(variants, image_size=32)
    assert plain("resnet18") in counts
    se_params = counts[channel_attention("resnet18", "se")][0]
    table = complexity_table(spec.restricted_to(["resnet18"]), counts, image_size=32)
    rows = {row[1]: row for row in table.rows}
    delta = table.header.index("ΔP (M)")
    assert rows["ResNet"][delta] == "0.000 / 0.000" and rows["ResNet"][2] == "11.148 / 11.148 (+0.000)"
    assert rows["SE"][delta] == f"{(se_params - counts[plain('resnet18')][0]) / 2**20:.3f} / 0.083"  # 11.231 - 11.148
    assert (
        rows["SE"][table.header.index("GFLOPs")] == f"{counts[channel_attention('resnet18', 'se')][1]:.3f}"
    )  # 32 px: ours alone
    assert len(table.rows) == 7


def test_variant_from_config_reads_the_coverage_fields_not_the_name():
    cfg = {
        "backbone": {"name": "resnet50"},
        "attention": {"name": "emca_eca", "integration": "first", "gating": "residual"},
        "coverage": {"name": "prev_stage_all", "stages": "all", "blocks": 1},
    }
    variant = variant_from_config(cfg)
    assert variant.cell() == emca("resnet50", "eca", "all_stages_last")
    assert variant.options == (("gating", "residual"),)
    assert variant_from_config({**cfg, "attention": {"name": "none", "integration": "all"}}) == Variant(
        "resnet50", "none"
    )
    # integration null is the model's default (first for EMCA), which is what the run built.
    assert variant_from_config({**cfg, "attention": {"name": "emca_eca", "integration": None}}).integration == "first"
    # se_bias: the paper's SE has none; a config without the key predates it and had biases.
    se = {**cfg, "attention": {"name": "se", "integration": "all"}}
    assert variant_from_config(se).options == (("se_bias", True),)
    assert variant_from_config({**se, "attention": {**se["attention"], "se_bias": False}}).options == ()
    assert (
        variant_from_config({**cfg, "attention": {"name": "eca", "integration": "all", "se_bias": True}}).options == ()
    )


# ----------------------------------------------------------------------------- make_tables
def test_make_tables_complexity_mode(tmp_path):
    result = run_python("scripts/make_tables.py", "--complexity", "--tables", "table4", "--backbones", "resnet18",
                        "--image-size", "32", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Table 4" in result.stdout and result.stdout.count("\n| R-18 |") == 7
    assert "| R-18 | SE | 11.231 / 11.231 (+0.000) | 0.035 | 0.083 / 0.083 | 0.000 |" in result.stdout
    assert {p.name for p in tmp_path.iterdir()} == {"tables.md", "tables.csv", "table4_complexity.tex"}


def test_make_tables_complexity_mode_refuses_tables_of_measured_results(tmp_path):
    result = run_python(
        "scripts/make_tables.py", "--complexity", "--tables", "table9", "figure6", "--out", str(tmp_path)
    )
    assert result.returncode == 2 and "table9, figure6 hold(s) only measured results" in result.stderr
    assert not TABLES["table9"].complexity and not TABLES["figure6"].complexity
    assert TABLES["table9"].variants() == TABLES["table4"].variants()


def test_make_tables_on_a_real_sweep(trained_sweep, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(trained_sweep, sweep, ignore=shutil.ignore_patterns("*.pt"))
    # An unfinished run (no results yet) and one with a broken config are gaps, not crashes.
    shutil.copytree(sweep / RUN0 / ".hydra", sweep / "unfinished" / ".hydra")
    (sweep / "broken" / ".hydra").mkdir(parents=True)
    (sweep / "broken" / ".hydra" / "config.yaml").write_text("backbone: [unclosed\n")
    # A later command rewrote run 0's Hydra config: the run is still what its results.json says.
    (sweep / RUN0 / ".hydra" / "config.yaml").write_text("backbone: {name: resnet50}\nattention: {name: emca_srm}\n")
    results = {name[0]: json.loads((sweep / name / "results.json").read_text()) for name in (RUN0, RUN1)}

    out = tmp_path / "tables"
    result = run_python("scripts/make_tables.py", str(sweep), "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    markdown = result.stdout
    # plain ResNet-18 and EMCA-SE (prev_stage_all) fill Tables 4 and 5, the EMCA run also Table 3's row.
    assert "Table 3:" in markdown and "Table 4:" in markdown and "Table 5:" in markdown and "Table 2:" not in markdown
    lines = markdown.splitlines()
    # Digits at 16 px is not the paper's protocol: our numbers stand alone, and a note says why.
    resnet_row = next(line for line in lines if line.startswith("| R-18 | ResNet |"))
    assert (
        f"| {results['0']['final']['val_top1']:.2f} |" in resnet_row
        and "70.40" not in resnet_row
        and " / " not in resnet_row
    )
    emca_row = next(line for line in lines if line.startswith("| R-18 | EMCA-SE |"))
    assert f"| {results['1']['final']['val_top1']:.2f} |" in emca_row and "71.00" not in emca_row
    assert any(line.startswith("_Cells: ours alone, measured on digits at 16 px; '–' = not trained or not measured. "
                               "The paper's figures are left out (docs/paper.md#reference-figures has them): they are "
                               "on imagenet at 224 px") for line in lines)
    assert not any(line.startswith(("_Cells: ours / paper", "_– / paper")) for line in lines)
    # Only the rows the runs fill: no R-18 SE row, no rows.
    assert not any(line.startswith(("| R-18 | SE |", "| R-34", "| R-50")) for line in lines)
    assert "resnet50" not in markdown and "emca_srm" not in markdown
    assert "incomplete" in markdown and "unfinished" in markdown and "broken" in markdown
    assert "Traceback" not in result.stderr

    records = list(csv.DictReader((out / "tables.csv").open()))
    # (Table 9 repeats Table 4's top-1 when test_eval.py's eval.json is in the shared sweep.)
    top1 = {(r["table"], r["row"]): r["ours"] for r in records
            if r["metric"] == "top1" and r["backbone"] == "resnet18" and r["ours"] and r["table"] != "table9"}
    assert top1 == {
        ("table4", "ResNet"): str(results["0"]["final"]["val_top1"]),
        ("table4", "EMCA-SE"): str(results["1"]["final"]["val_top1"]),
        ("table5", "ResNet"): str(results["0"]["final"]["val_top1"]),
        ("table5", "EMCA-SE"): str(results["1"]["final"]["val_top1"]),
        ("table3", "EMCA prev_stage_all"): str(results["1"]["final"]["val_top1"]),
    }
    assert (out / "table3.tex").is_file() and (out / "table4.tex").is_file()
    assert (out / "figure9_val_top1.png").stat().st_size > 0


def test_the_run_log_prints_parameters_with_their_unit_as_the_table_does(trained_sweep):
    """train.log's #P carries its unit and is the figure make_tables prints (M = 2^20), not a bare 10^6 one."""
    results = json.loads((trained_sweep / RUN1 / "results.json").read_text())
    params = results["params"]
    [line] = [line for line in (trained_sweep / RUN1 / "train.log").read_text().splitlines() if " parameters (" in line]
    assert f": {params:,} parameters ({params / 2**20:.3f} M, M = 2^20 as in make_tables), " in line
    assert f"{params / 1e6:.3f}" not in line
    measured, _ = measurements(find_runs([trained_sweep / RUN1]))
    [row] = fill_table(TABLES["table4"], measured).rows
    assert row[1:3] == ["EMCA-SE", f"{params / 2**20:.3f}"]


def test_measurements_take_speeds_from_eval_json_and_count_a_copied_run_once(trained_sweep, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(trained_sweep, sweep, ignore=shutil.ignore_patterns("*.pt"))
    eval_json = {
        "val": {"top1": 1.0, "top5": 2.0},
        "params": 5_000_000,
        "gflops": 0.5,
        "speed": {
            "device": "cpu",
            "fps": {"images_per_second": 10.0},
            "fps_model": {"images_per_second": 300.0},
            "fps_pipeline": {"images_per_second": 200.0},
        },
    }
    (sweep / RUN1 / "checkpoints").mkdir(exist_ok=True)
    (sweep / RUN1 / "checkpoints" / "eval.json").write_text(json.dumps(eval_json))
    results = json.loads((sweep / RUN1 / "results.json").read_text())
    runs = find_runs([sweep])
    measured, notes = measurements(runs)
    emca_se = measured[emca("resnet18", "se", "prev_stage_all")].values
    assert emca_se["fps"] == (10.0,) and emca_se["fps_pipeline"] == (200.0,)
    # Accuracy and parameters from results.json, the run's own record; parameters in 2^20 units.
    assert emca_se["params"] == (results["params"] / 2**20,) and emca_se["top1"] == (results["final"]["val_top1"],)
    shutil.copytree(sweep / RUN1, sweep / "again")  # the same run (its run_id) in two folders: not a repeat
    measured, notes = measurements(find_runs([sweep]))
    assert measured[emca("resnet18", "se", "prev_stage_all")].values["top1"] == (results["final"]["val_top1"],)
    assert any(note.startswith(f"one run (run_id {results['run_id']}) in 2 folders") for note in notes)


def _run_folder(root: Path, name: str, content: str) -> Path:
    """A run folder (plain ResNet-18) whose results.json or eval.json holds `content`."""
    run = root / "0"
    (run / ".hydra").mkdir(parents=True, exist_ok=True)
    (run / ".hydra" / "config.yaml").write_text(
        "backbone: {name: resnet18}\nattention: {name: none}\ndataset: {name: digits}\n"
    )
    (run / name).write_text(content)
    return run


@pytest.mark.parametrize(
    "name, content, problem",
    [
        ("results.json", "[1, 2]", "it holds an array, not a JSON object"),
        ("results.json", "3", "it holds a number, not a JSON object"),
        ("results.json", "{bad", "not valid JSON (Expecting property name enclosed in double quotes"),
        ("results.json", "", "not valid JSON (Expecting value"),
        ("results.json", '{"final": 3}', "its fields differ from those train.py / eval.py write (TypeError"),
        ("results.json", '{"final": {"val_top1": "high", "val_top5": 90}}', "a measurement in it is not a number"),
        ("results.json", '{"val_top1_per_epoch": [50, "x"]}', "a measurement in it is not a number"),
        ("eval.json", '{"speed": [1]}', "its fields differ from those train.py / eval.py write (AttributeError"),
        ("eval.json", '{"speed": {"device": 3}}', "speed.device is not a string"),
    ],
)
def test_a_results_or_eval_json_the_tables_cannot_use_is_one_warning_and_a_gap(
    name, content, problem, tmp_path, caplog
):
    run = _run_folder(tmp_path, name, content)
    [found] = find_runs([tmp_path])
    assert found.results is None and found.evaluation is None and not found.complete
    [warning] = caplog.messages
    assert warning.startswith(f"ignoring {run / name}: {problem}")
    assert measurements([found])[1] == [f"incomplete (no usable results.json or eval.json): {run}"]


def test_make_tables_on_a_results_json_holding_a_list_warns_and_completes(tmp_path):
    run = _run_folder(tmp_path / "sweep", "results.json", "[]")
    result = run_python("scripts/make_tables.py", str(tmp_path / "sweep"), "--out", str(tmp_path / "tables"))
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert f"WARNING ignoring {run / 'results.json'}: it holds an array, not a JSON object" in result.stderr


def test_make_tables_refuses_impossible_arguments_in_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    for arguments, message in (
        (["--image-size", "0"], "error: --image-size=0 must be >= 1"),
        (
            ["--out", str(tmp_path / "file")],
            f"error: --out={tmp_path / 'file'} is a file; give a folder for the tables",
        ),
        (["--backbones", "resnet7"], "error: argument --backbones: invalid choice: 'resnet7'"),
    ):
        result = run_python("scripts/make_tables.py", "--complexity", "--tables", "table4", *arguments)
        assert result.returncode == 2 and message in result.stderr.splitlines()[-1], result.stderr[-2000:]
