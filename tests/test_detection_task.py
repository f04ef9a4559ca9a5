"""task=detection end to end on real photographs with real boxes (Tiny-ImageNet's, converted to COCO
json by scripts/tiny_imagenet_to_coco.py): a short fine-tune from classification weights reaches a
box AP above zero, a run stopped mid-epoch resumes bit-exactly, two DDP ranks evaluate every image
once, Mask R-CNN and RetinaNet train and score, and impossible combinations are one line."""

import json
import logging
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train import assert_same_run, checkpoint

from emca.data.coco import build_detection_loaders
from emca.engine.coco_eval import CocoEvaluator
from emca.engine.distributed import DistributedContext
from emca.engine.tasks.detection import IOU_TYPES, evaluate
from emca.engine.trainer import Preempted, RunAborted, train
from emca.models import build_model
from emca.models.detectors import build_detector

from conftest import REPO_ROOT, SYNTHETIC_RUN, preempt_after_step
from test_ddp import torchrun_args

CLASSES = 2  # of the 20: a detector learns 2 classes' boxes in a few CPU steps
PER_CLASS = 8


def small_run(root) -> tuple[str, ...]:
    """A detection run of seconds on CPU: R-18 at 64 px (the images' own size), few proposals and RoIs,
    2 epochs of 4 steps; validated on the training images, which a short run has learnt first."""
    return ("task=detection", "dataset=tiny_imagenet_boxes", f"dataset.root={root}", "dataset.val_split=train",
            "backbone=resnet18", "attention=emca_eca", "detector.min_size=64", "detector.max_size=64",
            "detector.proposals=100", "detector.rois_per_image=64", "dataset.batch_size=4", "trainer.epochs=2",
            "dataset.workers=0", "optimizer.warmup_steps=2", "optimizer.lr=0.08", "trainer.log_every=2")


def score(state: dict) -> dict[str, float]:
    """COCO's figures of a checkpoint's weights on its run's validation images, in this one process."""
    cfg = state["config"]
    model = build_detector(cfg["detector"], cfg["backbone"], cfg["attention"], cfg["coverage"],
                           state["fingerprint"]["architecture"]["num_classes"])
    model.load_state_dict(state["model"])
    data = build_detection_loaders(OmegaConf.create(cfg["dataset"]), OmegaConf.create(cfg["loader"]), rank=0,
                                   world_size=1, seed=0, masks=False)
    alone = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    return evaluate(model, data.val, alone, CocoEvaluator(data.val_annotations, IOU_TYPES[cfg["detector"]["name"]]))


def fine_tune(root, classifier_weights) -> tuple[str, ...]:
    return (*small_run(root), f"model.init_from={classifier_weights}", "trainer.deterministic=true")


@pytest.fixture(scope="module")
def boxes(shared_data, tmp_path_factory):
    """Tiny-ImageNet's raw layout converted to COCO json, cut to its first CLASSES categories."""
    root = tmp_path_factory.mktemp("tiny-coco") / "coco"
    source = shared_data / "tinyimagenet-raw-mini" / "tiny-imagenet-200"
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "tiny_imagenet_to_coco.py"), str(source), str(root),
                    "--limit-per-class", str(PER_CLASS)], check=True, capture_output=True)
    for split in ("train", "val"):
        path = root / "annotations" / f"instances_{split}.json"
        coco = json.loads(path.read_text())
        coco["categories"] = [c for c in coco["categories"] if c["id"] <= CLASSES]
        coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] <= CLASSES]
        kept = {a["image_id"] for a in coco["annotations"]}
        coco["images"] = [image for image in coco["images"] if image["id"] in kept]
        path.write_text(json.dumps(coco))
    return root


@pytest.fixture(scope="module")
def classifier_weights(tmp_path_factory):
    """A classification model's state_dict, as an ImageNet run would hand its backbone over."""
    torch.manual_seed(0)
    model = build_model({"name": "resnet18"}, {"name": "emca_eca"}, {"stages": 1, "blocks": "all"}, num_classes=20)
    path = tmp_path_factory.mktemp("imagenet") / "classifier.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def fine_tuned(boxes, classifier_weights, compose_train, tmp_path_factory):
    """The fine-tune, deterministic: also the uninterrupted run a stopped and resumed one must equal."""
    run_dir = tmp_path_factory.mktemp("fine-tuned")
    cfg = compose_train(*fine_tune(boxes, classifier_weights))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)  # what train.py's logging config sets: train.log gets the run's lines
    try:
        return run_dir, train(cfg, str(run_dir))
    finally:
        root.setLevel(level)


def test_a_short_fine_tune_from_classification_weights_detects(fine_tuned):
    run_dir, results = fine_tuned
    assert results["task"] == "detection" and results["best_metric"] == "val_bbox_ap"
    assert results["best"]["val_bbox_ap"] > 0.0, results["history"]
    for key in ("ap", "ap50", "ap75", "ap_s", "ap_m", "ap_l"):
        assert f"val_bbox_{key}" in results["final"]
    # Every tensor of the backbone came from the classifier, whose fc alone had no place.
    init = results["init_from"]
    assert init["loaded"] > 50 and init["kept"] == 0 and init["unused"] == 2
    log = (run_dir / "train.log").read_text()
    assert "model.init_from=" in log and "tensors loaded" in log
    assert "loss_classifier" in log and "bbox AP" in log
    events = EventAccumulator(str(run_dir))
    events.Reload()
    for tag in ("bbox_ap/val", "bbox_ap50/val", "loss/train", "loss_classifier/train"):
        assert [event.step for event in events.Scalars(tag)] == [1, 2], tag
    state = checkpoint(run_dir, "best.pt")
    assert [c["id"] for c in state["categories"]] == list(range(1, CLASSES + 1))
    assert state["fingerprint"]["architecture"]["detector"] == "faster_rcnn"


def test_the_checkpoint_scores_what_the_run_recorded(fine_tuned, boxes):
    """The run's final AP is COCO's on the saved weights, recomputed here in one process."""
    run_dir, results = fine_tuned
    recorded = {key.removeprefix("val_"): value for key, value in results["final"].items() if key != "epoch"}
    assert score(checkpoint(run_dir)) == recorded


def test_stopped_mid_epoch_and_resumed_is_bit_identical(fine_tuned, boxes, classifier_weights, compose_train,
                                                         tmp_path, monkeypatch):
    options = fine_tune(boxes, classifier_weights)
    preempt_after_step(monkeypatch, 6)  # epoch 2, after its second of 4 steps
    with pytest.raises(Preempted):
        train(compose_train(*options), str(tmp_path))
    monkeypatch.undo()
    progress = checkpoint(tmp_path)["progress"]
    assert (progress["epoch"], progress["step_in_epoch"]) == (1, 2)
    train(compose_train(*options, "trainer.resume=auto"), str(tmp_path))
    assert_same_run(checkpoint(tmp_path), checkpoint(fine_tuned[0]))


@pytest.mark.parametrize("detector", ["mask_rcnn", "retinanet"])
def test_mask_rcnn_and_retinanet_train_and_score(detector, boxes, compose_train, tmp_path, caplog):
    caplog.set_level(logging.INFO)  # what train.py's logging config sets
    results = train(compose_train(*small_run(boxes), f"detector={detector}", "trainer.epochs=1",
                                  "trainer.max_steps_per_epoch=2"), str(tmp_path))
    final = results["final"]
    assert ("val_segm_ap" in final) is (detector == "mask_rcnn")
    assert all(0.0 <= final[f"val_bbox_{key}"] <= 100.0 for key in ("ap", "ap50"))
    log = (tmp_path / "train.log").read_text()
    assert ("loss_mask" in log) is (detector == "mask_rcnn") and ("bbox_regression" in log) is (detector == "retinanet")
    if detector == "retinanet":  # the paper's (MMDetection's) RetinaNet: lr 0.01 for 16 images, clipping at 35
        config = results["config"]
        assert config["trainer"]["clip_grad"] == 35.0 and config["detector"]["retinanet_extra"] == "c5"


def test_two_ranks_train_one_run_and_count_every_image_once(boxes, run_script, tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    run_dir = tmp_path / "run"
    done = run_script(*torchrun_args(REPO_ROOT / "train.py", *small_run(boxes), "trainer.epochs=1",
                                     "trainer.max_steps_per_epoch=2", f"hydra.run.dir={run_dir}"),
                      cwd=tmp_path, env={"TMPDIR": str(scratch)})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["num_val"] == 2 * PER_CLASS
    # The ranks' predictions, gathered, give COCO's figures over each image once: one process agrees.
    assert score(checkpoint(run_dir))["bbox_ap"] == pytest.approx(results["final"]["val_bbox_ap"], abs=1e-9)


@pytest.mark.parametrize("option, words", [
    ("dataset=digits", "task=detection reads COCO-format datasets"),
    ("loader=dali", "task=detection reads its images with loader=torchvision"),
    ("trainer.best_metric=val_top1", "trainer.best_metric=val_top1 is not a figure of task=detection"),
    ("trainer.mixup.mixup_alpha=0.2", "trainer.mixup mixes classification labels"),
])
def test_impossible_combinations_are_one_line(option, words, boxes, compose_train, tmp_path):
    with pytest.raises(RunAborted) as refused:
        train(compose_train(*small_run(boxes), option), str(tmp_path))
    assert words in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "checkpoints").exists()


def test_a_detector_without_its_task_is_refused(compose_train, tmp_path):
    with pytest.raises(RunAborted, match="detector=retinanet trains with task=detection; add task=detection"):
        train(compose_train(*SYNTHETIC_RUN, "detector=retinanet"), str(tmp_path))
