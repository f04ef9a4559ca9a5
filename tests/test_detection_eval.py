"""eval.py on task=detection checkpoints (emca/analysis/detection_eval.py): a tiny Faster R-CNN and a
tiny Mask R-CNN trained in-process on the raw Tiny ImageNet mini download converted to COCO format,
evaluated as their runs validated them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import emca.analysis.eval_config  # noqa: F401  (registers eval_schema, as eval.py does before composing)
from emca.analysis.checkpoint_eval import EvalError, evaluate_checkpoint, format_summary
from emca.engine.distributed import DistributedContext
from emca.engine.trainer import train

from test_ddp import torchrun_args

CPU = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
# Three steps of a ResNet-18 detector at 64 px: seconds on a CPU. optimizer.lr: a rate at which these
# three steps already find some boxes, so that the AP compared below is not all zeros.
RUN = ("task=detection", "dataset=tiny_imagenet_boxes", "backbone=resnet18", "attention=none",
       "detector.min_size=64", "detector.max_size=64", "detector.proposals=100", "detector.rois_per_image=64",
       "dataset.batch_size=4", "trainer.epochs=1", "trainer.max_steps_per_epoch=3", "dataset.workers=0",
       "optimizer.warmup_steps=2", "trainer.device=cpu")
# The Mask R-CNN run validates on FEW images of four classes: its mask head runs on each of up to 100
# detections per image, a minute over the 80 images on a CPU.
FEW = "few"
# One intra-op thread per process: the machine's 2 cores are shared.
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def coco(shared_data, repo_root, tmp_path_factory):
    """The converted mini download (80 train and 80 val images of 20 classes), with the FEW split: the
    first train image of classes 1, 6, 11 and 16."""
    root = tmp_path_factory.mktemp("detection-eval") / "coco"
    raw = shared_data / "tinyimagenet-raw-mini" / "tiny-imagenet-200"
    converted = subprocess.run([sys.executable, str(repo_root / "scripts" / "tiny_imagenet_to_coco.py"), str(raw),
                                str(root), "--limit-per-class", "4"], capture_output=True, text=True)
    assert converted.returncode == 0, converted.stderr
    content = json.loads((root / "annotations" / "instances_train.json").read_text())
    first = {}
    for annotation in content["annotations"]:
        first.setdefault(annotation["category_id"], annotation["image_id"])
    chosen = {first[category] for category in (1, 6, 11, 16)}
    few = {**content, "images": [image for image in content["images"] if image["id"] in chosen],
           "annotations": [annotation for annotation in content["annotations"] if annotation["image_id"] in chosen]}
    (root / "annotations" / f"instances_{FEW}.json").write_text(json.dumps(few))
    os.symlink("train", root / FEW)
    return root


def trained(compose_train, coco, tmp_path_factory, *overrides):
    run_dir = tmp_path_factory.mktemp("run") / "run"
    train(compose_train(*RUN, f"dataset.root={coco}", *overrides), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def faster_run(compose_train, coco, tmp_path_factory):
    return trained(compose_train, coco, tmp_path_factory, "dataset.val_split=train", "optimizer.lr=0.08")


@pytest.fixture(scope="module")
def mask_run(compose_train, coco, tmp_path_factory):
    return trained(compose_train, coco, tmp_path_factory, "detector=mask_rcnn", f"dataset.val_split={FEW}",
                   "optimizer.lr=0.16")


def eval_options(*overrides: str):
    """configs/eval.yaml composed with command-line style overrides, as eval.py gets it."""
    from hydra import compose, initialize_config_dir

    from conftest import REPO_ROOT

    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        return compose("eval", overrides=list(overrides))


def run_figures(run_dir) -> tuple[dict, dict]:
    """(results.json, its final val_* figures named as eval.json names them)."""
    results = json.loads((run_dir / "results.json").read_text())
    final = {key.removeprefix("val_"): value for key, value in results["final"].items() if key.startswith("val_")}
    # Guards the comparisons: figures of a detector that finds nothing are zeros whatever the weights.
    assert final["bbox_ap50"] > 0, final
    return results, final


def same(figures: dict, expected: dict) -> bool:
    """Equal to the last digit, a missing figure (no ground truth of that size) included."""
    return json.dumps(figures, sort_keys=True) == json.dumps(expected, sort_keys=True)


def test_eval_py_reproduces_the_runs_box_ap_under_torchrun_with_rank_0_alone_reporting(faster_run, run_script):
    """Two processes (one subprocess covers both the command and torchrun): each validation image
    counts once, and the 64 px images pad to the same batches on either rank, so the two ranks' halves
    score exactly as the run's single process did."""
    result = run_script(*torchrun_args("eval.py", f"checkpoint={faster_run}/checkpoints/best.pt", "device=cpu"),
                        env=SUBPROCESS_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    results, final = run_figures(faster_run)
    report = json.loads((faster_run / "eval.json").read_text())  # beside the run, as a classification run's
    assert same(report["val"], final) and set(final) == {f"bbox_{name}" for name in
                                                         ("ap", "ap50", "ap75", "ap_s", "ap_m", "ap_l")}
    assert (report["task"], report["weights"], report["world_size"], report["amp"]) == ("detection", "trained", 2,
                                                                                         "off")
    assert report["model"] == {"backbone": "resnet18", "attention": "none", "coverage": None, "num_classes": 21,
                               "detector": "faster_rcnn"}
    assert report["dataset"]["num_val"] == results["num_val"] == 80 and report["params"] == results["params"]
    assert report["ignored"] == ["rotations", "learned_scales", "speed"]
    log, *lines = result.stdout.splitlines()  # rank 0's log line, then its summary; rank 1 says nothing
    assert log.startswith("evaluating ") and "with 2 process(es)" in log, result.stdout
    assert [line.split()[0] for line in lines] == ["checkpoint", "model", "data", "box", "ignored", "wrote"], lines
    box = lines[3]
    assert box.split()[2:5] == [f"{final['bbox_ap']:.2f}", "AP50", f"{final['bbox_ap50']:.2f}"], box
    assert lines[1].startswith("model       faster_rcnn on resnet18-FPN attention=none, 20 categories")
    assert lines[4].startswith("ignored     rotations, learned_scales, speed")
    assert lines[-1] == f"wrote       {faster_run / 'eval.json'}"


def test_a_mask_rcnn_checkpoint_is_scored_on_its_masks_too(mask_run):
    # accuracy_only=true asks for no classification measurement: the summary has no "ignored" line.
    report = evaluate_checkpoint(eval_options(f"checkpoint={mask_run}/checkpoints/best.pt", "device=cpu",
                                              "accuracy_only=true"), CPU)
    _, final = run_figures(mask_run)
    assert same({key: report["val"][key] for key in final}, final) and final.keys() == report["val"].keys()
    assert "segm_ap" in final and report["dataset"]["num_val"] == 4 and report["ignored"] == []
    summary = format_summary(report)
    assert "mask AP     " in summary and "box AP      " in summary and "ignored" not in summary


def val_only(coco, folder):
    """A COCO folder holding the validation split alone, its file naming category 3 otherwise: with no
    train/, its error can only be the categories' if eval reads the val split alone."""
    (folder / "annotations").mkdir(parents=True)
    os.symlink(coco / "val", folder / "val")
    content = json.loads((coco / "annotations" / "instances_val.json").read_text())
    next(category for category in content["categories"] if category["id"] == 3)["name"] = "renamed"
    (folder / "annotations" / "instances_val.json").write_text(json.dumps(content))
    return folder


def test_detection_eval_errors_are_one_line_naming_the_fix(faster_run, coco, tmp_path):
    checkpoint = f"checkpoint={faster_run}/checkpoints/best.pt"
    other = val_only(coco, tmp_path / "other")
    cases = {
        "ema=true": ([], "holds no EMA weights (its run had trainer.ema.decay=null); drop ema=true"),
        "gradcam.images=2": ([], "faster_rcnn detection run's checkpoint and Grad-CAM maps are drawn for "
                                 "classifiers; drop gradcam.images=2"),
        "loader=dali": ([], "read with loader=torchvision, not loader=dali; drop the loader option"),
        f"dataset.root={other}": (["dataset.val_split=val"],
                                  f"the categories of {other}/annotations/instances_val.json differ from the 20 that"),
    }
    for option, (more, expected) in cases.items():
        with pytest.raises(EvalError) as caught:
            evaluate_checkpoint(eval_options(checkpoint, "device=cpu", option, *more), CPU)
        message = str(caught.value)
        assert "\n" not in message and expected in message, message
    assert "(id 3: 'renamed' there" in message and "set dataset.root" in message
