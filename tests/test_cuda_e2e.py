"""End to end on a CUDA GPU (skipped without one, by conftest's `cuda` marker): trainer=gpu (bf16,
channels_last) compiled, stopped and resumed, with DALI's GPU decoding and with torchvision's loader;
two NCCL ranks under torchrun; task=detection. benchmarks/device_check.sh runs them on the first GPU
lent; nothing here has a CPU fallback."""

import json
import logging
import math

import pytest
import test_detection_task as detection
import torch
from test_train import checkpoint

from emca.engine.trainer import Preempted, train

from conftest import QUICK_RUN, REPO_ROOT, preempt_after_step
from test_ddp import torchrun_args

pytestmark = [pytest.mark.cuda, pytest.mark.slow]
boxes = detection.boxes  # its COCO-format boxes fixture (Tiny-ImageNet's), reused by the detection test

# trainer=gpu on a tree of small JPEGs: 2 epochs of 2 steps, a line per step; ResNet-18 keeps
# torch.compile's first compilation (forward and backward) to about a minute.
GPU_RUN = ("trainer=gpu", "trainer.compile=true", "dataset=imagefolder", "backbone=resnet18",
           "dataset.image_size=48", "dataset.val_resize=56", "dataset.batch_size=4", "dataset.workers=2",
           "trainer.epochs=2", "trainer.max_steps_per_epoch=2", "trainer.log_every=1")


def assert_finite_history(results: dict) -> None:
    """Every figure of every epoch's record is a finite number (COCO's figures without ground truth: None)."""
    for record in results["history"]:
        for key, value in record.items():
            assert value is None or math.isfinite(value), (record["epoch"], key, value)


def assert_finite_weights(state: dict) -> None:
    for name, tensor in state["model"].items():
        assert torch.isfinite(tensor.float()).all(), name


@pytest.mark.parametrize("loader", ["dali", "torchvision"])
def test_gpu_trainer_compiled_stops_and_resumes(loader, image_tree, compose_train, tmp_path, monkeypatch, caplog):
    if loader == "dali":
        pytest.importorskip("nvidia.dali", reason="loader=dali needs NVIDIA DALI (pip install nvidia-dali-cuda130)")
    root = image_tree({"train": {"a": 8, "b": 8}, "val": {"a": 4, "b": 4}}, size=(80, 60))
    options = (*GPU_RUN, f"loader={loader}", f"dataset.root={root}")
    run_dir = tmp_path / "run"
    caplog.set_level(logging.INFO)  # what train.py's logging config sets
    preempt_after_step(monkeypatch, 3)  # epoch 2, after its first of 2 steps
    with pytest.raises(Preempted):
        train(compose_train(*options), str(run_dir))
    monkeypatch.undo()
    stopped = checkpoint(run_dir)
    assert (stopped["progress"]["epoch"], stopped["progress"]["step_in_epoch"]) == (1, 1)
    assert_finite_weights(stopped)

    results = train(compose_train(*options, "trainer.resume=auto"), str(run_dir))
    assert "last.pt: epoch 1 completed, step 1 of the next" in caplog.text  # the resume's own log line
    assert results["status"] == "completed" and results["epoch_reached"] == 2 and results["device"] == "cuda:0"
    assert results["config"]["trainer"]["compile"] is True and results["config"]["trainer"]["amp"] == "bf16"
    assert_finite_history(results)
    final = checkpoint(run_dir)
    assert final["progress"]["epoch"] == 2 and final["progress"]["global_step"] == 4
    assert_finite_weights(final)
    torch._dynamo.reset()  # the compiled graphs of this run: not for the next test's


def test_two_nccl_ranks_train_one_run(run_script, emca_cache, tmp_path):
    visible = torch.cuda.device_count()
    if visible < 2:
        pytest.skip(f"two NCCL ranks need two CUDA devices; this machine has {visible}")
    run_dir = tmp_path / "run"
    done = run_script(*torchrun_args(REPO_ROOT / "train.py", *QUICK_RUN, "trainer=gpu", "trainer.device=cuda",
                                     "trainer.epochs=1", "trainer.max_steps_per_epoch=2", f"hydra.run.dir={run_dir}"),
                      cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["device"] == "cuda:0" and results["status"] == "completed"
    assert_finite_history(results)
    assert_finite_weights(checkpoint(run_dir))


def test_detection_trains_on_the_gpu(boxes, compose_train, tmp_path):
    results = train(compose_train(*detection.small_run(boxes), "trainer=gpu", "trainer.epochs=1",
                                  "trainer.max_steps_per_epoch=2"), str(tmp_path / "run"))
    assert results["task"] == "detection" and results["device"] == "cuda:0" and results["epoch_reached"] == 1
    assert_finite_history(results)
    assert_finite_weights(checkpoint(tmp_path / "run"))
