"""make_tables --plot (emca/analysis/tradeoff.py): top-1 against #P, GFLOPs and FPS from hand-made run folders
(results.json as train.py writes it, eval.json's speeds as eval.py does), one point per model with its seeds as
error bars, the paper's point beside each of its rows for runs measured as the paper's were."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from test_tables_runs import write_run

from emca.analysis import paper_reference as paper
from emca.analysis.runs import find_runs, measurements
from emca.analysis.tradeoff import NO_SPEED, plot_tradeoffs, row_label
from emca.analysis.variants import channel_attention, emca

REPO = Path(__file__).resolve().parents[1]
EMCA_ECA = emca("resnet18", "eca", "prev_stage_all")
SE = channel_attention("resnet18", "se")


def write_speed(run: Path, fps: float) -> None:
    """eval.json's fields make_tables reads: the model's counts, accuracy and the three speeds."""
    speeds = {key: {"images_per_second": fps * factor} for key, factor in
              (("fps", 1), ("fps_model", 100), ("fps_pipeline", 5))}
    evaluation = {"dataset": {"name": "imagenet"}, "image_size": 224, "val": {"top1": 70.0, "top5": 90.0},
                  "speed": {"device": "cpu", **speeds}}
    (run / "eval.json").write_text(json.dumps(evaluation))


def plotted(root: Path, out: Path):
    measured, _ = measurements(find_runs([root]))
    return plot_tradeoffs(measured, out)


def test_imagenet_runs_are_drawn_beside_the_papers_points(tmp_path):
    for seed, top1 in enumerate((70.0, 71.0)):  # two seeds of SE: one point, mean and error bar
        write_run(tmp_path / "runs" / f"se{seed}", seed=seed, top1=top1, params=11_776_552)
    eca = write_run(tmp_path / "runs" / "eca", attention="emca_eca", coverage="prev_stage_all", top1=71.5,
                    params=11_689_512)
    write_speed(eca, fps=150.0)
    [figure] = plotted(tmp_path / "runs", tmp_path / "out")
    assert figure.protocol == paper.PROTOCOL and not figure.notes
    assert [path.name for path in figure.paths] == ["tradeoff_imagenet_224px.png", "tradeoff_imagenet_224px.pdf"]
    assert all(path.stat().st_size > 1000 for path in figure.paths)
    assert figure.paths[1].read_bytes().startswith(b"%PDF")
    params, gflops, fps = figure.panels
    assert (params.metric, gflops.metric, fps.metric) == ("params", "gflops", "fps")
    assert sorted(point.label for point in params.ours) == ["R-18 EMCA-ECA", "R-18 SE"]
    se = next(point for point in params.ours if point.label == "R-18 SE")
    assert (se.y, se.x, se.xerr) == (70.5, pytest.approx(11_776_552 / 2**20), None)
    assert se.yerr == pytest.approx(0.7071, abs=1e-4)  # the sample standard deviation of the two seeds
    # The paper's points for the same rows (Table 4's): #P and top-1 as it prints them.
    assert sorted((p.label, p.x, p.y) for p in params.paper) == [("R-18 EMCA-ECA", 11.148, 71.04),
                                                                 ("R-18 SE", 11.231, 70.59)]
    assert len(gflops.ours) == 2 and len(gflops.paper) == 2
    # FPS where eval.json measured it: EMCA-ECA alone, beside the paper's batch-1 FPS.
    assert [(p.label, p.x) for p in fps.ours] == [("R-18 EMCA-ECA", 150.0)] and fps.note is None
    assert [(p.label, p.x, p.y) for p in fps.paper] == [("R-18 EMCA-ECA", 170, 71.04)]


def test_without_speeds_the_fps_panel_says_how_to_measure_them(tmp_path):
    write_run(tmp_path / "runs" / "se", top1=70.0)
    [figure] = plotted(tmp_path / "runs", tmp_path / "out")
    fps = figure.panels[2]
    assert fps.ours == [] and fps.paper == [] and fps.note == NO_SPEED


def test_runs_on_another_dataset_are_drawn_without_the_papers_points(tmp_path):
    write_run(tmp_path / "runs" / "se", dataset="tiny_imagenet", image_size=64, top1=40.0)
    write_run(tmp_path / "runs" / "eca", attention="emca_eca", coverage="prev_stage_all", dataset="tiny_imagenet",
              image_size=64, top1=41.0)
    [figure] = plotted(tmp_path / "runs", tmp_path / "out")
    assert figure.paths[0].name == "tradeoff_tiny_imagenet_64px.png" and figure.paths[1].is_file()
    assert len(figure.panels[0].ours) == 2 and all(panel.paper == [] for panel in figure.panels)
    assert figure.notes and "left out beside runs on tiny_imagenet at 64 px" in figure.notes[0]


def test_a_model_off_the_papers_rows_is_labelled_by_its_description():
    assert row_label(SE) == "R-18 SE" and row_label(EMCA_ECA) == "R-18 EMCA-ECA"
    assert row_label(emca("resnet18", "se", "none")) == "R-18 EMCA none (SE)"  # Table 3's row
    assert row_label(channel_attention("resnet101", "se")) == "resnet101 se integration=all"


def test_make_tables_plot_writes_the_figures(tmp_path, capsys):
    write_run(tmp_path / "runs" / "se", top1=70.0)
    spec = importlib.util.spec_from_file_location("make_tables", REPO / "scripts" / "make_tables.py")
    make_tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_tables)
    assert make_tables.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--plot"]) == 0
    assert (tmp_path / "out" / "tradeoff_imagenet_224px.png").is_file()
    assert (tmp_path / "out" / "tradeoff_imagenet_224px.pdf").is_file()
    assert "tradeoff_imagenet_224px.pdf" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        make_tables.parse_args(["--complexity", "--plot"])
