"""make_tables on hand-made run folders (results.json as train.py writes it): labels from what the
run recorded, repeated runs as mean ± std, differences to the paper only under its protocol, only
the rows runs fill, and LaTeX ready to paste."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_eval import run_python

import emca.config  # noqa: F401  (registers the training schema train.yaml composes)
from emca.analysis import render
from emca.analysis.complexity import build_variant, count_macs
from emca.analysis.runs import find_runs, measurements, override
from emca.analysis.tables import METRICS, TABLES, fill_table
from emca.analysis.variants import PAPER_OPTIONS, channel_attention, emca, plain, variant_from_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESET_COVERAGE = {None: (1, "all"), "prev_stage_all": (1, "all"), "none": (0, 0)}


def run_config(backbone: str, attention: str, coverage: Optional[str], dataset: str, image_size: int, seed: int,
               **overrides: Any) -> dict[str, Any]:
    stages, blocks = PRESET_COVERAGE[coverage]
    config = {"backbone": {"name": backbone, "zero_init_residual": False},
              "attention": {"name": attention, "integration": "first" if attention.startswith("emca_") else "all",
                            "se_ratio": 16, "se_bias": False, "eca_kernel": "adaptive", "gating": "multiply",
                            "align": "repeat", "include_stem": False},
              "coverage": {"name": coverage or "prev_stage_all", "stages": stages, "blocks": blocks},
              "dataset": {"name": dataset, "image_size": image_size},
              "optimizer": {"lr": 0.1}, "trainer": {"seed": seed, "epochs": 100}}
    for dotted, value in overrides.items():
        group, key = dotted.split("__")
        config[group][key] = value
    return config


def write_run(folder: Path, backbone: str = "resnet18", attention: str = "se", coverage: Optional[str] = None,
              dataset: str = "imagenet", image_size: int = 224, seed: int = 0, top1: float = 70.0,
              params: int = 11_776_552, gflops: float = 1.8, run_id: Optional[str] = None, **overrides: Any) -> Path:
    """A run folder with the results.json train.py writes (the fields make_tables reads)."""
    config = run_config(
        backbone, attention, coverage if attention.startswith("emca_") else None, dataset, image_size, seed, **overrides
    )
    results = {
        "status": "completed",
        "run_id": run_id or f"{folder.name}-{seed}",
        "run_dir": str(folder),
        "model": {
            "backbone": backbone,
            "attention": attention,
            "coverage": coverage if attention.startswith("emca_") else None,
        },
        "dataset": dataset,
        "final": {"epoch": 100, "val_top1": top1, "val_top5": top1 + 20, "val_loss": 1.0},
        "best": {"epoch": 99, "val_top1": top1 + 0.1, "val_top5": top1 + 20},
        "params": params,
        "gflops": gflops,
        "image_size": image_size,
        "val_top1_per_epoch": [top1 - 1, top1],
        "config": config,
    }
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    return folder


SE = channel_attention("resnet18", "se")


def table4(root: Path, full: bool = False):
    measured, notes = measurements(find_runs([root]))
    table = fill_table(TABLES["table4"], measured, full)
    return {(row[0], row[1]): dict(zip(table.header, row, strict=True)) for row in table.rows}, table, notes


def test_repeated_runs_of_a_variant_are_mean_and_std_with_the_run_count(tmp_path):
    for seed, top1 in enumerate((70.0, 71.0, 72.0)):
        write_run(tmp_path / str(seed), seed=seed, top1=top1)
    rows, table, notes = table4(tmp_path)
    se = rows[("R-18", "SE")]
    assert se["top-1"] == "71.00 ± 1.00 (n=3) / 70.59 (+0.41)"
    assert se["#P (M)"] == "11.231 / 11.231 (+0.000)"  # a property of the model: once, not ± 0
    assert any(note.startswith("3 runs of resnet18 se integration=all (seeds 0, 1, 2) averaged: ") for note in notes)
    assert "Repeated runs of a variant (seeds): mean ± sample standard deviation (n = runs)." in table.notes
    [record] = [r for r in table.records if r["row"] == "SE" and r["metric"] == "top1"]
    assert (record["ours"], record["std"], record["runs"], record["difference"]) == pytest.approx((71.0, 1.0, 3, 0.41))


def test_repeats_whose_configs_differ_beyond_the_seed_say_so(tmp_path):
    write_run(tmp_path / "a", seed=0)
    write_run(tmp_path / "b", seed=1, optimizer__lr=0.05)
    _, _, notes = table4(tmp_path)
    assert any("(seeds 0, 1) averaged; their configs also differ in optimizer.lr:" in note for note in notes)


def legend_misses(table) -> list[str]:
    """The cells of a filled table whose form no note explains (each form a cell takes has its line)."""
    needs = {"ours / paper": "Cells: ours / paper (ours - paper)", "– / paper": "– / paper: ",
             "ours / –": "ours / –: ", "ours alone": "Cells: ours alone, measured on "}
    spec = TABLES[table.name]
    published = [METRICS[key].published for _ in spec.groups or (None,) for key in spec.metrics]
    missing = []
    for row in table.rows:
        for text, is_published in zip(row[2:], published, strict=True):
            ours, slash, theirs = text.partition(" / ")
            if not is_published or text in ("–", "– / –"):
                continue
            form = ("ours alone" if not slash else "– / paper" if ours == "–"
                    else "ours / –" if theirs == "–" else "ours / paper")
            if not any(note.startswith(needs[form]) for note in table.notes):
                missing.append(f"{row[0]} {row[1]}: {text} ({form})")
    return missing


def test_a_cell_we_trained_under_the_papers_protocol_is_ours_beside_the_papers(tmp_path):
    write_run(tmp_path / "imagenet", top1=71.0)
    rows, table, _ = table4(tmp_path)
    se = rows[("R-18", "SE")]
    assert se["top-1"] == "71.00 / 70.59 (+0.41)" and se["#P (M)"] == "11.231 / 11.231 (+0.000)"
    assert se["FPS"] == "– / 187"  # eval.py has not measured it: the paper's alone, and the legend says so
    assert table.notes[0] == ("Cells: ours / paper (ours - paper), ours measured on imagenet at 224 px as the paper's "
                              "were; '–' = none.")
    assert any(note.startswith("– / paper: ours not measured") for note in table.notes)
    assert not any(note.startswith("ours / –") for note in table.notes)  # no such cell: no such line
    assert legend_misses(table) == []


def test_a_digits_sweep_shows_ours_alone_and_no_paper_figure_in_cells_we_never_trained(tmp_path):
    """The README's sweep on digits: Table 3's SE and ECA columns trained, SRM not. No ImageNet figure of
    the paper's sits beside or among them (it read '– / 165 | – / 11.150 | – / 71.31' in the SRM column)."""
    for attention in ("emca_se", "emca_eca"):
        write_run(tmp_path / attention, attention=attention, coverage="none", dataset="digits", image_size=16,
                  top1=16.94, params=11_226_000)
    measured, _ = measurements(find_runs([tmp_path]))
    table = fill_table(TABLES["table3"], measured)
    [row] = table.rows
    assert row[:2] == ["R-18", "EMCA none"]
    assert row[2:] == ["–", "10.706", "16.94", "36.94", "–", "10.706", "16.94", "36.94", "–", "–", "–", "–"]
    markdown = render.markdown(table)
    assert not any(figure in markdown for figure in ("165", "11.150", "71.31", "11.189", "70.91"))
    assert table.notes[0].startswith(
        "Cells: ours alone, measured on digits at 16 px; '–' = not trained or not measured. The paper's figures are "
        "left out (docs/paper.md#reference-figures has them): they are on imagenet at 224 px"
    )
    assert "make_tables --complexity" in table.notes[0]
    assert not any(note.startswith(("Cells: ours / paper", "– / paper", "ours / –")) for note in table.notes)
    assert {record["paper"] for record in table.records} == {None}  # the CSV as the table: no paper column
    assert legend_misses(table) == []


def test_a_trained_cell_off_the_papers_protocol_beside_paper_cells_is_ours_over_a_dash(tmp_path):
    write_run(tmp_path / "imagenet", top1=71.0)
    write_run(tmp_path / "small", attention="eca", image_size=64, top1=60.0, params=11_689_548)
    write_run(tmp_path / "digits", attention="none", dataset="digits", top1=93.33, params=11_689_512)
    rows, table, _ = table4(tmp_path)
    assert rows[("R-18", "SE")]["top-1"] == "71.00 / 70.59 (+0.41)"
    eca, resnet = rows[("R-18", "ECA*")], rows[("R-18", "ResNet")]
    assert eca["top-1"] == "60.00 / –" and eca["FPS"] == "– / –"
    assert eca["#P (M)"] == "11.148 / 11.148 (+0.000)"  # the image size does not change the parameters
    assert resnet["top-1"] == "93.33 / –" and resnet["#P (M)"] == "11.148 / –"  # not '93.33 / 70.40 (+22.93)'
    assert ("ours / –: measured on imagenet at 64 px, for which the paper has no figures (the paper's are on imagenet "
            "at 224 px), but for #P, which the image size does not change: R-18 ECA*.") in table.notes
    assert ("_ours / –: measured on digits at 224 px, for which the paper has no figures (the paper's are on imagenet "
            "at 224 px): R-18 ResNet._") in render.markdown(table)
    digits = [r for r in table.records if r["row"] == "ResNet" and r["metric"] == "top1"]
    assert digits[0]["paper"] is None and digits[0]["difference"] is None
    assert legend_misses(table) == []


def test_a_row_we_never_trained_is_the_papers_figures_alone_with_full(tmp_path):
    write_run(tmp_path / "imagenet", top1=71.0)
    rows, table, _ = table4(tmp_path, full=True)
    assert rows[("R-50", "EMCA-SRM")]["top-1"] == "– / 77.20" and rows[("R-50", "EMCA-SRM")]["#P (M)"] == "– / 24.380"
    assert any(note.startswith("– / paper: ") for note in table.notes) and legend_misses(table) == []


def test_a_run_off_the_papers_options_is_named_with_the_override_that_trains_the_papers_model(tmp_path):
    """The README's `train.py -m attention=emca_se,...` trains Hu et al.'s SE (biases): the note gives the fix."""
    write_run(tmp_path / "biased", attention="emca_se", coverage="prev_stage_all", attention__se_bias=True,
              params=11_776_000)
    write_run(tmp_path / "gated", attention="emca_eca", coverage="none", attention__gating="residual")
    rows, table, notes = table4(tmp_path)
    # Its #P is that of SE with biases: the options note explains it, not the paper's model's known difference.
    assert rows[("R-18", "EMCA-SE")]["#P (M)"] == "11.230 / 11.190 (+0.040)"
    assert not any("include_stem" in note for note in table.notes)
    assert [note for note in notes if note.startswith("Not the paper's model")] == [
        "Not the paper's model (the cells show this one's figures), attention.se_bias=true where the paper has "
        f"attention.se_bias=false: resnet18 emca_se integration=first coverage=prev_stage_all ({tmp_path / 'biased'}). "
        "To train the paper's, add attention.se_bias=false to the command, or sweep with +experiment=table3 or "
        "+experiment=table4 or +experiment=table5 or +experiment=ca_all.",
        "Not the paper's model (the cells show this one's figures), attention.gating=residual where the paper has "
        f"attention.gating=multiply: resnet18 emca_eca integration=first coverage=none ({tmp_path / 'gated'}). To "
        "train the paper's, add attention.gating=multiply to the command, or sweep with +experiment=table3.",
    ]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        readme = ["attention=emca_se", "coverage=prev_stage_all"]
        assert variant_from_config(compose("train", overrides=readme)).options == (("se_bias", True),)
        assert variant_from_config(compose("train", overrides=[*readme, "attention.se_bias=false"])).options == ()


def test_the_override_a_note_names_sets_each_option_to_the_papers_value():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[override(key, value) for key, value in PAPER_OPTIONS.items()])
    attention = OmegaConf.to_container(cfg.attention)
    assert {key: attention[key] for key in PAPER_OPTIONS} == {
        key: list(value) if isinstance(value, tuple) else value for key, value in PAPER_OPTIONS.items()
    }
    assert override("fca_dct_size", (56, 28, 14, 7)) == "attention.fca_dct_size=[56,28,14,7]"


def test_gflops_are_the_recorded_layer_count_plus_what_the_papers_counter_adds(tmp_path):
    write_run(tmp_path / "0", gflops=1.0)
    rows, _, _ = table4(tmp_path)
    extra = count_macs(build_variant(SE), 224)[1]
    assert rows[("R-18", "SE")]["GFLOPs"].startswith(f"{(1e9 + extra) / 2**30:.3f} / 1.695 (")


def test_runs_of_the_papers_protocol_win_a_cell_over_others(tmp_path):
    write_run(tmp_path / "paper", top1=71.0)
    write_run(tmp_path / "tiny1", dataset="tiny_imagenet", image_size=64, seed=1, top1=50.0)
    write_run(tmp_path / "tiny2", dataset="tiny_imagenet", image_size=64, seed=2, top1=52.0)
    rows, _, notes = table4(tmp_path)
    assert rows[("R-18", "SE")]["top-1"] == "71.00 / 70.59 (+0.41)"
    [aside] = [note for note in notes if note.startswith("not shown")]
    assert "on tiny_imagenet at 64 px" in aside and "tiny1" in aside and "tiny2" in aside


def test_only_rows_with_runs_unless_full(tmp_path):
    write_run(tmp_path / "0")
    rows, table, _ = table4(tmp_path)
    assert list(rows) == [("R-18", "SE")]
    assert (
        "Only the rows our runs fill (20 of the paper's left out): make_tables --full prints them all." in table.notes
    )
    rows, table, _ = table4(tmp_path, full=True)
    assert len(rows) == 21 and rows[("R-50", "EMCA-SRM")]["top-1"] == "– / 77.20"
    assert not any(note.startswith("Only the rows") for note in table.notes)


def test_labels_come_from_results_json_not_a_rewritten_hydra_config(tmp_path):
    run = write_run(tmp_path / "0", attention="emca_se", coverage="prev_stage_all", top1=71.5, params=11_733_041)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("backbone: {name: resnet50}\nattention: {name: srm, integration: all}\n"
                                                "dataset: {name: digits, image_size: 32}\n")
    [found] = find_runs([tmp_path])
    assert (found.variant, found.dataset, found.image_size, found.run_id) == (
        emca("resnet18", "se", "prev_stage_all"),
        "imagenet",
        224,
        "0-0",
    )
    rows, _, _ = table4(tmp_path)
    assert list(rows) == [("R-18", "EMCA-SE")] and rows[("R-18", "EMCA-SE")]["top-1"] == "71.50 / 71.00 (+0.50)"


def test_a_results_json_whose_model_and_config_disagree_is_a_warning_and_a_gap(tmp_path, caplog):
    run = write_run(tmp_path / "0")
    results = json.loads((run / "results.json").read_text())
    results["model"]["attention"] = "eca"
    (run / "results.json").write_text(json.dumps(results))
    [found] = find_runs([tmp_path])
    assert not found.complete
    assert caplog.messages == [
        f"ignoring {run / 'results.json'}: its model ('resnet18', 'eca', None) is not the one its "
        "config describes (resnet18 se integration=all); its run is a gap in the tables until the file is restored"
    ]


def test_a_run_measured_by_eval_py_alone_is_labelled_from_its_checkpoint(tmp_path):
    run = tmp_path / "0"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("backbone: {name: resnet50}\nattention: {name: srm}\n")
    checkpoint = run / "checkpoints" / "last.pt"
    torch.save({"config": run_config("resnet18", "none", None, "imagenet", 224, 0), "run_id": "abc"}, checkpoint)
    (run / "checkpoints" / "eval.json").write_text(json.dumps({
        "checkpoint": str(checkpoint), "dataset": {"name": "imagenet", "image_size": 224}, "image_size": 224,
        "val": {"top1": 70.5, "top5": 89.5}, "params": 11_689_512}))
    [found] = find_runs([tmp_path])
    assert (found.variant, found.protocol, found.run_id) == (plain("resnet18"), ("imagenet", 224), "abc")
    rows, _, _ = table4(tmp_path)
    assert (
        rows[("R-18", "ResNet")]["top-1"] == "70.50 / 70.40 (+0.10)"
        and rows[("R-18", "ResNet")]["#P (M)"] == "11.148 / 11.148 (+0.000)"
    )


def test_latex_has_the_caption_without_the_papers_number_and_a_label(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path / str(seed), seed=seed, top1=70.0 + seed)
    _, table, _ = table4(tmp_path)
    latex = render.latex(table)
    assert r"\caption{each CA module and its EMCA version (EMCA coverage prev\_stage\_all)}" in latex
    assert r"\label{tab:table4}" in latex and "Table 4:" not in latex.split("\n", 1)[1]  # the comment line keeps it
    assert r"70.50 $\pm$ 0.71 (n=2) / 70.59 (-0.09)" in latex and "$2^{20}$" in latex and "±" not in latex


def test_make_tables_end_to_end_on_run_folders(tmp_path):
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        write_run(sweep / str(seed), seed=seed, top1=70.0 + seed)
    out = tmp_path / "tables"
    result = run_python("scripts/make_tables.py", str(sweep), "--tables", "table4", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| R-18 | SE | 11.231 / 11.231 (+0.000) |" in result.stdout and result.stdout.count("\n| R-") == 1
    assert "70.50 ± 0.71 (n=2) / 70.59 (-0.09)" in result.stdout
    full = run_python("scripts/make_tables.py", str(sweep), "--tables", "table4", "--full", "--out", str(out))
    assert full.returncode == 0 and full.stdout.count("\n| R-") == 21
    records = list(csv.DictReader((out / "tables.csv").open()))
    top1 = next(r for r in records if r["row"] == "SE" and r["metric"] == "top1" and r["backbone"] == "resnet18")
    assert (top1["runs"], float(top1["std"])) == ("2", pytest.approx(0.7071, abs=1e-4))


def test_the_every_method_table_is_printed_for_runs_beyond_the_papers_tables(tmp_path):
    """make_tables leaves ca_all out while the paper's tables place every run (it repeats Table 5's rows), and
    prints it, with only the rows the runs fill, once a run of a method beyond the paper's (GC) is among them."""
    sweep = tmp_path / "sweep"
    write_run(sweep / "se", attention="se")
    out = tmp_path / "tables"
    result = run_python("scripts/make_tables.py", str(sweep), "--out", str(out))
    assert result.returncode == 0 and "Table 5:" in result.stdout and "Channel attention:" not in result.stdout
    write_run(sweep / "gc", attention="gc", params=11_776_000)
    result = run_python("scripts/make_tables.py", str(sweep), "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    table = result.stdout[result.stdout.index("Channel attention:"):]
    assert "| R-18 | GC |" in table and "| R-18 | SE |" in table and "not in " not in result.stdout
