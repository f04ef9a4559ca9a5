"""Tables 6 and 8 (COCO detection): #P and GFLOPs counted as MMDetection's get_flops counts them
(emca/analysis/detection_complexity.py) against the paper's plain R-50-FPN figures, the attention rows'
increments counted independently, the tables filled from hand-made detection run folders, and
scripts/make_tables.py printing both tables."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Optional

import pytest
import torch
from test_eval import run_python

from emca.analysis import paper_reference as paper
from emca.analysis.detection_complexity import (
    MASK_ROIS,
    build_counted_detector,
    count_detector,
    count_detector_macs,
    detector_complexity,
)
from emca.analysis.runs import find_runs, measurements
from emca.analysis.tables import DETECTION_TABLES, fill_detection_table
from emca.analysis.variants import PAPER_OPTIONS
from emca.layers.excitation import eca_kernel_size

REPO = Path(__file__).resolve().parents[1]
DESIGN_NOTES = REPO / "docs" / "paper.md"
R50_BLOCKS = (3, 4, 6, 3)
R50_CHANNELS = (256, 512, 1024, 2048)  # each stage's block output
TRAINED_STAGES = (1, 2, 3)  # 0-based: stage 1 is frozen with the stem (MMDetection's frozen_stages=1)


# ----------------------------------------------------------------------------- the paper's figures
def test_reference_block_is_a_verbatim_copy_of_the_design_notes():
    assert paper.TABLE_6_PLAIN_TEXT.strip() in DESIGN_NOTES.read_text(encoding="utf-8")
    assert paper.TABLE_6_PLAIN["mask_rcnn"] == paper.DetectionReference(params=44.18, gflops=275.58)


@pytest.mark.parametrize("detector", ["faster_rcnn", "mask_rcnn", "retinanet"])
def test_plain_detectors_count_as_the_paper_prints(detector):
    params, gflops = detector_complexity(detector)
    reference = paper.TABLE_6_PLAIN[detector]
    assert (round(params, 2), round(gflops, 2)) == (reference.params, reference.gflops)


def test_counts_of_the_plain_detectors():
    """The exact counts behind the printed figures (docs/paper.md#tables-6-and-8 quotes them)."""
    counts = {detector: count_detector(detector) for detector in ("faster_rcnn", "mask_rcnn", "retinanet")}
    assert {detector: (count.params, count.macs) for detector, count in counts.items()} == {
        "faster_rcnn": (41_531_812, 207_069_234_100),
        "mask_rcnn": (44_175_349, 275_575_859_700),
        "retinanet": (37_743_348, 239_316_500_520),
    }
    # MMDetection 2.x's heads (box regression and mask logits over 80 classes, not 81) would print 44.17.
    assert round((counts["mask_rcnn"].params - 4 * 1025 - 257) / 1e6, 2) == 44.17


def test_mask_head_is_counted_as_mmdetection_v1_counts_it():
    """Mask R-CNN's extra multiply-adds are its mask head on 100 RoIs of 256 x 14 x 14, the deconvolution
    counted at each of its 28 x 28 outputs (MMDetection v1's _ConvNd hook): without that, 260.16 GFLOPs."""
    rois, inner, outer, classes = MASK_ROIS, 14 * 14, 28 * 28, 81
    convs = 4 * rois * inner * (256 * 256 * 9 + 256 + 256)  # kernel, bias, ReLU module
    deconv = rois * outer * (256 * 256 * 4 + 256 + 256)  # kernel at every output, bias, ReLU module
    logits = rois * outer * (256 * classes + classes)
    increase = count_detector("mask_rcnn").macs - count_detector("faster_rcnn").macs
    assert increase == convs + deconv + logits
    at_inputs = count_detector("mask_rcnn").macs - rois * (outer - inner) * 256 * 256 * 4
    assert round(at_inputs / 1e9, 2) == 260.16  # mmcv's later hook (kernel at each input), not the paper's 275.58


@pytest.mark.parametrize("detector, extra", [
    # R-CNN classifier and class-specific box regression over 91 classes instead of 81, each row 1024 + 1 wide.
    ("faster_rcnn", 10 * 5 * 1025),
    ("mask_rcnn", 10 * 5 * 1025 + 10 * 257),  # ... and 10 more mask logits, 1 x 1 over 256 channels
    ("retinanet", 9 * 11 * (256 * 9 + 1)),  # 9 anchors x 11 more classes, 3 x 3 over 256 channels
])
def test_coco_id_heads_differ_from_the_papers_by_their_outputs_alone(detector, extra):
    assert count_detector(detector, counting="coco_ids").params - count_detector(detector).params == extra


# ----------------------------------------------------------------------------- attention rows
def trainable(detector: str, attention: str) -> dict[str, int]:
    model = build_counted_detector(detector, attention=attention)
    return {name: parameter.numel() for name, parameter in model.named_parameters() if parameter.requires_grad}


@pytest.mark.parametrize("attention, expected", [
    # EMCA-ECA in the first block of stages 2-4: ECA's kernel and one scale weight per covered output
    # (prev_stage_all: the previous stage's blocks and its own).
    ("emca_eca", sum(eca_kernel_size(R50_CHANNELS[s]) + R50_BLOCKS[s - 1] + 1 for s in TRAINED_STAGES)),
    ("eca", sum(R50_BLOCKS[s] * eca_kernel_size(R50_CHANNELS[s]) for s in TRAINED_STAGES)),
    # The paper's SE (no biases, reduction 16) in every block of stages 2-4.
    ("se", sum(R50_BLOCKS[s] * 2 * R50_CHANNELS[s] ** 2 // 16 for s in TRAINED_STAGES)),
])
def test_attention_rows_add_their_modules_trained_parameters(attention, expected):
    plain, attended = trainable("faster_rcnn", "none"), trainable("faster_rcnn", attention)
    added = {name: count for name, count in attended.items() if name not in plain}
    assert {name: count for name, count in attended.items() if name in plain} == plain
    assert sum(added.values()) == expected
    assert all(".attn" in name or "stage_attn" in name for name in added), sorted(added)
    assert count_detector("faster_rcnn", attention=attention).params - count_detector("faster_rcnn").params \
        == expected
    assert expected == {"emca_eca": 33, "eca": 71, "se": 2_490_368}[attention]


def test_counting_on_the_meta_device_equals_a_real_forward(one_torch_thread):
    torch.manual_seed(0)
    real = build_counted_detector("mask_rcnn", attention="emca_se", device="cpu")
    meta = build_counted_detector("mask_rcnn", attention="emca_se")
    assert count_detector_macs(real, (128, 96)) == count_detector_macs(meta, (128, 96))


# ----------------------------------------------------------------------------- tables from runs
def write_detection_run(folder: Path, detector: str = "faster_rcnn", attention: str = "none",
                        coverage: Optional[str] = None, dataset: str = "coco", seed: int = 0, box_ap: float = 37.4,
                        mask_ap: Optional[float] = None, params_trained: Optional[int] = None) -> Path:
    """A run folder with the results.json task=detection writes (the fields make_tables reads)."""
    emca = attention.startswith("emca_")
    stages, blocks = (1, "all") if emca else (0, 0)
    config = {"task": "detection", "backbone": {"name": "resnet50", "zero_init_residual": False},
              "attention": {"name": attention, "integration": "first" if emca else "all", **PAPER_OPTIONS},
              "coverage": {"name": coverage or "none", "stages": stages, "blocks": blocks},
              "detector": {"name": detector, "min_size": 800, "max_size": 1333, "trainable_layers": 3,
                           "norm": "mmdet", "retinanet_extra": "c5"},
              "dataset": {"name": dataset}, "trainer": {"seed": seed}}
    final = {"epoch": 12, **{f"val_bbox_{key}": box_ap + offset for key, offset in AP_OFFSETS.items()}}
    if mask_ap is not None:
        final.update({f"val_segm_{key}": mask_ap + offset for key, offset in AP_OFFSETS.items()})
    params = count_detector(detector, attention=attention, counting="coco_ids").params
    results = {"status": "completed", "run_id": f"{folder.name}-{seed}", "task": "detection",
               "model": {"detector": detector, "backbone": "resnet50", "attention": attention,
                         "coverage": coverage if emca else None},
               "dataset": dataset, "params": params + 225_344,
               "params_trained": params if params_trained is None else params_trained,
               "final": final, "best": final, "val_bbox_ap_per_epoch": [box_ap], "config": config}
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    return folder


AP_OFFSETS = {"ap": 0.0, "ap50": 20.0, "ap75": 3.0, "ap_s": -16.0, "ap_m": 4.0, "ap_l": 11.0}


def table(root: Path, name: str, full: bool = False):
    measured, notes = measurements(find_runs([root]))
    filled = fill_detection_table(DETECTION_TABLES[name], measured, full)
    return {(row[0], row[1]): dict(zip(filled.header, row, strict=True)) for row in filled.rows}, filled, notes


@pytest.fixture
def detection_runs(tmp_path) -> Path:
    write_detection_run(tmp_path / "faster")
    for seed, box_ap in enumerate((38.0, 38.2)):
        write_detection_run(tmp_path / f"emca_eca_{seed}", attention="emca_eca", coverage="prev_stage_all",
                            seed=seed, box_ap=box_ap)
    write_detection_run(tmp_path / "mask", detector="mask_rcnn", box_ap=38.2, mask_ap=34.7)
    (tmp_path / "unfinished" / ".hydra").mkdir(parents=True)
    (tmp_path / "unfinished" / ".hydra" / "config.yaml").write_text("task: detection\n")
    return tmp_path


def test_table6_from_runs(detection_runs):
    rows, filled, notes = table(detection_runs, "table6")
    assert filled.header == ["detector", "method", "#P (M)", "GFLOPs", "AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L"]
    assert list(rows) == [("Faster R-CNN", "ResNet"), ("Faster R-CNN", "EMCA-ECA"), ("Mask R-CNN", "ResNet")]
    faster = rows[("Faster R-CNN", "ResNet")]
    # The run trained torchvision's heads over COCO's 91 category ids: 51,250 more than the paper counts.
    assert (faster["#P (M)"], faster["GFLOPs"], faster["AP"], faster["AP50"]) == (
        "41.58 / 41.53 (+0.05)", "207.07 / 207.07 (+0.00)", "37.4", "57.4")
    assert rows[("Faster R-CNN", "EMCA-ECA")]["#P (M)"] == "41.58 / –"
    assert rows[("Faster R-CNN", "EMCA-ECA")]["AP"] == "38.1 ± 0.1 (n=2)"
    assert rows[("Mask R-CNN", "ResNet")]["#P (M)"] == "44.23 / 44.18 (+0.05)"
    assert any(note.startswith("incomplete (no usable results.json or eval.json): ") for note in notes)
    assert ("#P of Faster R-CNN ResNet: the run trained 41,583,062 parameters; the row's model has 41,583,062 with "
            "the heads a COCO run trains (labels are COCO's category ids: 91 classes) and 41,531,812 with "
            "MMDetection's, which the paper counts.") in filled.notes
    assert any(note.startswith("AP columns: ours alone, COCO box AP in percent") for note in filled.notes)
    assert any(note.startswith("ours / –: the paper's figure is not held") for note in filled.notes)
    assert "Only the rows our runs fill (14 of the paper's left out): make_tables --full prints them all." \
        in filled.notes
    records = [r for r in filled.records if r["row"] == "Faster R-CNN ResNet" and r["metric"] == "params_1e6"]
    assert [(r["ours"], r["paper"], r["detector"]) for r in records] == [(41.583062, 41.53, "faster_rcnn")]


def test_full_table6_shows_missing_runs_as_gaps(detection_runs):
    rows, filled, _ = table(detection_runs, "table6", full=True)
    assert len(rows) == 17 and ("Mask R-CNN", "NL") in rows  # 5 rows a detector, GC and NL for Mask R-CNN
    retinanet = rows[("RetinaNet", "ResNet")]
    assert (retinanet["#P (M)"], retinanet["GFLOPs"], retinanet["AP"]) == ("– / 37.74", "– / 239.32", "–")
    assert rows[("RetinaNet", "EMCA-SE")]["#P (M)"] == "– / –"
    assert "– / paper: no run of the row, the paper's figure alone." in filled.notes


def test_table8_holds_the_mask_rcnn_runs(detection_runs):
    rows, filled, _ = table(detection_runs, "table8")
    assert filled.header == ["detector", "method", "AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L"]
    assert rows == {("Mask R-CNN", "ResNet"): {"detector": "Mask R-CNN", "method": "ResNet", "AP": "34.7",
                                                "AP50": "54.7", "AP75": "37.7", "AP_S": "18.7", "AP_M": "38.7",
                                                "AP_L": "45.7"}}
    assert not any(note.startswith("#P") for note in filled.notes)


def test_a_run_on_another_dataset_keeps_its_own_parameters(tmp_path):
    write_detection_run(tmp_path / "boxes", dataset="tiny_imagenet_boxes", params_trained=41_400_000)
    rows, filled, _ = table(tmp_path, "table6")
    assert rows[("Faster R-CNN", "ResNet")]["#P (M)"] == "41.40 / –"
    assert ("Measured on tiny_imagenet_boxes at a shorter side of 800 px, not the paper's coco at 800 px, its #P "
            "ours / – (its labels set the heads): Faster R-CNN ResNet.") in filled.notes


def test_detection_runs_stay_out_of_the_imagenet_tables(detection_runs):
    measured, _ = measurements(find_runs([detection_runs]))
    assert all(isinstance(cell, tuple) for cell in measured)
    assert not DETECTION_TABLES["table8"].filled_by({cell: measured[cell] for cell in measured
                                                     if cell[0] == "faster_rcnn"})


# ----------------------------------------------------------------------------- make_tables
def test_make_tables_complexity_prints_tables_6_and_8(tmp_path):
    result = run_python("scripts/make_tables.py", "--complexity", "--tables", "table6", "table8", "--out",
                        str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "### Table 6: " in result.stdout and "### Table 8: " in result.stdout
    assert "| Faster R-CNN | ResNet | 41.53 / 41.53 (+0.00) | 207.07 / 207.07 (+0.00) | +0 | +0.00 |" in result.stdout
    assert "| Mask R-CNN | ResNet | 44.18 / 44.18 (+0.00) | 275.58 / 275.58 (+0.00) | +0 | +0.00 |" in result.stdout
    assert "| RetinaNet | ResNet | 37.74 / 37.74 (+0.00) | 239.32 / 239.32 (+0.00) | +0 | +0.00 |" in result.stdout
    assert "| Faster R-CNN | EMCA-ECA | 41.53 / – | 207.21 / – | +33 | +0.14 |" in result.stdout
    assert {p.name for p in tmp_path.iterdir()} == {"tables.md", "tables.csv", "table6_complexity.tex",
                                                    "table8_complexity.tex"}


@pytest.fixture(scope="module")
def make_tables():
    """scripts/make_tables.py as a module, for in-process calls (the CLI itself runs above)."""
    spec = importlib.util.spec_from_file_location("make_tables", REPO / "scripts" / "make_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_tables_reads_detection_runs(make_tables, detection_runs, tmp_path, capsys):
    assert make_tables.main([str(detection_runs), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    titles = [line for line in printed.splitlines() if line.startswith("### ")]
    assert [title.split(":")[0] for title in titles] == ["### Table 6", "### Table 8"]
    assert "| Mask R-CNN | ResNet | 34.7 | 54.7 | 37.7 | 18.7 | 38.7 | 45.7 |" in printed
    assert "coco at 800 px shorter side (detection)" in printed
    assert {path.name for path in (tmp_path / "out").iterdir()} == {"tables.md", "tables.csv", "table6.tex",
                                                                   "table8.tex"}


def test_make_tables_refuses_detection_tables_without_resnet50(make_tables, capsys):
    with pytest.raises(SystemExit) as exit_info:
        make_tables.parse_args(["--complexity", "--tables", "table6", "--backbones", "resnet18"])
    assert exit_info.value.code == 2
    assert "table6 hold(s) resnet50 detectors: add resnet50 to --backbones" in capsys.readouterr().err


def test_a_figure_without_objects_of_its_size_and_an_eval_json_leave_the_run_in_the_table(tmp_path):
    """COCO's AP_L of a validation set without large objects is null in results.json; eval.py's
    detection eval.json beside it: the run still fills its row, the missing figure a gap."""
    run = write_detection_run(tmp_path / "faster")
    results = json.loads((run / "results.json").read_text())
    results["final"]["val_bbox_ap_l"] = results["best"]["val_bbox_ap_l"] = None
    (run / "results.json").write_text(json.dumps(results))
    (run / "eval.json").write_text(json.dumps({"task": "detection", "val": {"bbox_ap": 37.4}}))
    rows, _, notes = table(tmp_path, "table6")
    faster = rows[("Faster R-CNN", "ResNet")]
    assert (faster["AP"], faster["AP_L"]) == ("37.4", "–")
    assert not any("incomplete" in note for note in notes)
