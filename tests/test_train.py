"""The trainer end to end: train.py and its run folder, multirun, errors, resume, pre-emption, NaN."""

import itertools
import json
import signal
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from emca.engine.trainer import Preempted, RunAborted, Trainer, train

from conftest import QUICK_RUN, REPO_ROOT, SYNTHETIC_RUN, preempt_after_step

RUN_FILES = (
    ".hydra/config.yaml",
    ".hydra/overrides.yaml",
    "train.log",
    "results.json",
    "checkpoints/last.pt",
    "checkpoints/best.pt",
)
DETERMINISTIC = (*QUICK_RUN, "trainer.deterministic=true")
# Every option of a modern recipe that touches training at once: an EMA (copying during epoch 1, then
# every 2 steps), mixup and cutmix, an augmentation policy with random erasing, 2 micro-batches per
# step, clipping. Resume must stay exact with all of them.
RECIPE = (
    "trainer.ema.decay=0.6", "trainer.ema.every=2", "trainer.ema.copy_epochs=1", "trainer.mixup.mixup_alpha=0.2",
    "trainer.mixup.cutmix_alpha=1.0", "trainer.accumulate=2", "trainer.clip_grad=2.0",
    "trainer.best_metric=ema_val_top1", "dataset.auto_augment=trivialaugment", "dataset.random_erasing=0.5",
)


def checkpoint(run_dir, name="last.pt"):
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_same_optimizer_state(a: dict, b: dict):
    assert a["param_groups"] == b["param_groups"]
    for index in a["state"]:
        assert_same_tensors(a["state"][index], b["state"][index])


def assert_same_run(resumed: dict, expected: dict):
    """Bit for bit: weights, EMA weights, optimizer state and the epochs' records."""
    assert_same_tensors(resumed["model"], expected["model"])
    assert (resumed["ema"] is None) == (expected["ema"] is None)
    if expected["ema"] is not None:
        assert_same_tensors(resumed["ema"], expected["ema"])
    assert_same_optimizer_state(resumed["optimizer"], expected["optimizer"])
    assert resumed["progress"]["history"] == expected["progress"]["history"]


# --------------------------------------------------------------------------- train.py end to end
def test_train_py_writes_a_complete_run_folder(run_script, tmp_path):
    run_dir = tmp_path / "run"
    done = run_script("train.py", *QUICK_RUN, "loader=dali", f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    # Not a terminal: plain progress lines instead of a tqdm bar.
    assert "epoch 1/2 step 2/3" in done.stdout and "\r" not in done.stdout

    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["epoch_reached"] == 2 and results["world_size"] == 1
    for section in ("final", "best"):
        assert 0.0 <= results[section]["val_top1"] <= results[section]["val_top5"] <= 100.0
    assert results["params"] > 11_000_000 and results["gflops"] > 0 and results["images_per_s"] > 0
    assert results["wall_time_s"] > 0 and len(results["git"]["commit"]) == 40
    assert results["versions"]["torch"] == torch.__version__.split("+")[0]
    assert len(results["val_top1_per_epoch"]) == 2 and results["loader"] == "dali"

    state = checkpoint(run_dir)
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "progress", "config", "fingerprint"} <= state.keys()
    assert state["progress"]["epoch"] == 2 and state["config"]["trainer"]["epochs"] == 2
    assert state["fingerprint"]["architecture"]["attention"] == "emca_eca"

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("train_step/loss", "train_step/top1", "train_step/lr", "train_step/images_per_s", "top1/val",
                "top5/val", "loss/val", "loss/train", "top1/train", "lr/epoch", "hparams/best_val_top1",
                "hparams/final_val_top1"):
        assert tag in tags["scalars"], tag
    # Train and val on one axis (the epoch); the step series on the optimizer step.
    assert [event.step for event in events.Scalars("top1/val")] == [1, 2]
    assert [event.step for event in events.Scalars("loss/train")] == [1, 2]
    # log_every=2 over 3 steps: steps 2 and 3 of each epoch.
    assert [event.step for event in events.Scalars("train_step/loss")] == [2, 3, 5, 6]
    # One scale histogram per attention module (EMCA in the first block of each of the 4 stages).
    scale_tags = [tag for tag in tags["histograms"] if tag.startswith("scales/")]
    assert len(scale_tags) == 4
    first_stage = events.Histograms(next(tag for tag in scale_tags if tag.startswith("scales/layer1.")))
    assert len(first_stage) == 2 and first_stage[0].histogram_value.num == 360 * 64  # val images x channels
    # The HParams tab's records, in the run folder itself (not a timestamped subfolder).
    assert set(events.PluginTagToContent("hparams")) >= {"_hparams_/experiment", "_hparams_/session_start_info"}
    assert not [p for p in run_dir.iterdir() if p.is_dir() and p.name not in (".hydra", "checkpoints", ".checkpoints")]


def test_multirun_sweeps_four_jobs_into_one_folder(run_script, tmp_path):
    sweep = tmp_path / "sweep"
    done = run_script("train.py", "-m", *SYNTHETIC_RUN, "trainer.epochs=1", "trainer.max_steps_per_epoch=1",
                      "attention=emca_se,emca_eca", "coverage=none,prev_stage_all", f"hydra.sweep.dir={sweep}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (sweep / "multirun.yaml").is_file()
    combos = set()
    # Each job's folder: its number and the values of the swept keys.
    jobs = [f"{n}_attention-{a}__coverage-{c}" for n, (a, c) in
            enumerate((a, c) for a in ("emca_se", "emca_eca") for c in ("none", "prev_stage_all"))]
    assert sorted(path.name for path in sweep.iterdir() if path.is_dir()) == sorted(jobs)
    for job in jobs:
        for name in RUN_FILES:
            assert (sweep / job / name).is_file(), f"{job}/{name}"
        assert list((sweep / job).glob("events.out.tfevents.*"))
        model = json.loads((sweep / job / "results.json").read_text())["model"]
        combos.add((model["attention"], model["coverage"]))
    assert combos == {(a, c) for a in ("emca_se", "emca_eca") for c in ("none", "prev_stage_all")}


def test_errors_are_one_line_and_touch_nothing(run_script, tmp_path):
    run_dir = tmp_path / "run"
    done = run_script("train.py", *QUICK_RUN, "coverage.stages=5", f"hydra.run.dir={run_dir}")
    output = done.stdout + done.stderr
    assert done.returncode == 1
    assert "Traceback" not in output
    assert [line for line in output.splitlines() if "coverage.stages=5" in line] == [
        next(line for line in output.splitlines() if "ERROR" in line)
    ]
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "results.json").exists()

    # A key the schema lacks is refused before anything runs, in one line naming the closest (emca/cli.py).
    done = run_script("train.py", "trainer.epochz=3", f"hydra.run.dir={run_dir}")
    assert done.returncode == 1 and done.stderr.splitlines() == [
        "error: trainer.epochz=3: trainer.epochz is not an option (did you mean trainer.epochs?); "
        "`python train.py --cfg job` lists them all"]


# --------------------------------------------------------------------------- resume
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, compose_train):
    """The final checkpoint of an uninterrupted deterministic quick run, per loader and options."""
    runs = {}

    def get(loader: str, *options: str):
        if (loader, options) not in runs:
            run_dir = tmp_path_factory.mktemp(f"full-{loader}")
            train(compose_train(*DETERMINISTIC, f"loader={loader}", *options), str(run_dir))
            runs[loader, options] = checkpoint(run_dir)
        return runs[loader, options]

    return get


@pytest.mark.parametrize(
    "loader, options", [("torchvision", ()), ("dali", ()), ("dali", RECIPE)], ids=["torchvision", "dali", "dali-recipe"]
)
def test_stopped_after_an_epoch_and_resumed_is_bit_identical(
    loader, options, uninterrupted, compose_train, tmp_path, monkeypatch
):
    expected = uninterrupted(loader, *options)
    evaluate = Trainer.evaluate

    def evaluate_then_preempt(self, model, epoch, board, stop, tag="val"):
        metrics = evaluate(self, model, epoch, board, stop, tag)
        # After the epoch's last validation pass (the EMA weights' when there is an EMA).
        if epoch == 0 and (tag == "ema_val" or self.average is None):
            signal.raise_signal(signal.SIGUSR1)  # as SLURM does before the time limit
        return metrics

    monkeypatch.setattr(Trainer, "evaluate", evaluate_then_preempt)
    with pytest.raises(Preempted):
        train(compose_train(*DETERMINISTIC, f"loader={loader}", *options), str(tmp_path))
    monkeypatch.undo()
    assert checkpoint(tmp_path)["progress"]["epoch"] == 1 and not (tmp_path / "results.json").exists()

    train(compose_train(*DETERMINISTIC, f"loader={loader}", *options, "trainer.resume=auto"), str(tmp_path))
    assert_same_run(checkpoint(tmp_path), expected)
    assert json.loads((tmp_path / "results.json").read_text())["epoch_reached"] == 2


@pytest.mark.parametrize("options", [(), RECIPE], ids=["plain", "recipe"])
def test_stopped_mid_epoch_and_resumed_is_bit_identical(options, uninterrupted, compose_train, tmp_path, monkeypatch):
    expected = uninterrupted("torchvision", *options)
    preempt_after_step(monkeypatch, 4)  # epoch 2, after its first of 3 steps
    with pytest.raises(Preempted):
        train(compose_train(*DETERMINISTIC, "loader=torchvision", *options), str(tmp_path))
    monkeypatch.undo()
    progress = checkpoint(tmp_path)["progress"]
    assert (progress["epoch"], progress["step_in_epoch"], progress["global_step"]) == (1, 1, 4)
    # The interrupted epoch's totals so far: one step's images.
    assert progress["interrupted_epoch"]["totals"][3] == compose_train(*DETERMINISTIC).dataset.batch_size

    train(compose_train(*DETERMINISTIC, "loader=torchvision", *options, "trainer.resume=auto"), str(tmp_path))
    resumed = checkpoint(tmp_path)
    # With the interrupted epoch's record (train loss, top-1, learning rate) the uninterrupted one.
    assert_same_run(resumed, expected)
    assert resumed["progress"]["interrupted_epoch"] is None


# The validation set is 12 batches: stop in the first pass, or (with an EMA) in the EMA weights' pass.
@pytest.mark.parametrize("options, stop_at", [((), 2), (RECIPE, 14)], ids=["plain", "recipe-in-ema-pass"])
def test_stopped_during_validation_saves_at_once_and_resumes_exactly(
    options, stop_at, uninterrupted, compose_train, tmp_path, monkeypatch
):
    import emca.engine.tasks.classification as task_module

    expected = uninterrupted("torchvision", *options)
    evaluate, seen = task_module.evaluate, []

    def evaluate_interrupted(model, loader, ctx, **options):
        def batches():
            for batch in loader:
                seen.append(len(seen))
                if len(seen) == stop_at:
                    signal.raise_signal(signal.SIGTERM)
                yield batch
        return evaluate(model, batches(), ctx, **options)

    monkeypatch.setattr(task_module, "evaluate", evaluate_interrupted)
    with pytest.raises(Preempted):
        train(compose_train(*DETERMINISTIC, "loader=torchvision", *options), str(tmp_path))
    monkeypatch.undo()
    assert len(seen) == stop_at  # the pass stopped at the batch in hand instead of running to the end
    progress = checkpoint(tmp_path)["progress"]
    assert (progress["epoch"], progress["step_in_epoch"], progress["history"]) == (0, 3, [])

    train(compose_train(*DETERMINISTIC, "loader=torchvision", *options, "trainer.resume=auto"), str(tmp_path))
    assert_same_run(checkpoint(tmp_path), expected)


def test_sigterm_saves_and_exits_cleanly(run_script, compose_train, tmp_path):
    # One long epoch of small synthetic batches, so that the signal surely lands mid-epoch.
    overrides = (*SYNTHETIC_RUN, "dataset.batch_size=8", "trainer.epochs=1", "loader.steps_per_epoch=20",
                 "trainer.max_steps_per_epoch=null", "trainer.log_every=1")
    process = subprocess.Popen([sys.executable, "train.py", *overrides, f"hydra.run.dir={tmp_path}"], cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = iter(process.stdout.readline, "")
        next(line for line in lines if "epoch 1/1 step 1/20" in line)
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=120)[0]
    finally:
        process.kill()
    assert process.returncode == 0, output[-3000:]
    assert "SIGTERM received: saved" in output and "Traceback" not in output
    progress = checkpoint(tmp_path)["progress"]
    assert progress["epoch"] == 0 and 1 <= progress["step_in_epoch"] < 20
    assert not (tmp_path / "results.json").exists()

    # Re-attaching to the run folder continues it to the end.
    results = train(compose_train(*overrides, "trainer.resume=auto"), str(tmp_path))
    assert results["epoch_reached"] == 1 and (tmp_path / "results.json").is_file()


# --------------------------------------------------------------------------- failures
def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(compose_train, tmp_path, monkeypatch):
    train(compose_train(*SYNTHETIC_RUN, "trainer.epochs=1"), str(tmp_path))
    results_before = (tmp_path / "results.json").read_bytes()
    good = checkpoint(tmp_path)

    forward = torch.nn.CrossEntropyLoss.forward
    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", lambda self, *args: forward(self, *args) * float("nan"))
    with pytest.raises(
        RunAborted,
        match=r"non-finite training loss \(nan\) at epoch 2 step 2: stopped; the last good checkpoint .*last\.pt is "
              r"kept",
    ):
        train(compose_train(*SYNTHETIC_RUN, "trainer.resume=auto"), str(tmp_path))
    kept = checkpoint(tmp_path)
    assert kept["progress"]["epoch"] == 1
    assert_same_tensors(kept["model"], good["model"])
    # A failed run never writes results.json: the completed run's file is untouched.
    assert (tmp_path / "results.json").read_bytes() == results_before


def test_an_image_that_fails_mid_run_is_one_line(compose_train, tmp_path, monkeypatch):
    from emca.data import DatasetError
    from emca.data.torch_loader import ImageListDataset

    getitem, served = ImageListDataset.__getitem__, itertools.count()

    def fail_later(self, key):
        if next(served) == 100:  # in the first epoch's fourth batch: screened fine, gone now
            raise DatasetError(f"cannot decode image {self.images.paths[key[0]]} (removed); remove or replace the file")
        return getitem(self, key)

    monkeypatch.setattr(ImageListDataset, "__getitem__", fail_later)
    with pytest.raises(RunAborted, match=r"cannot decode image .*; .*last\.pt is kept, continue with "
                                         rf"hydra\.run\.dir={tmp_path} trainer\.resume=auto$"):
        train(compose_train(*QUICK_RUN, "trainer.max_steps_per_epoch=null"), str(tmp_path))


def test_startup_errors_abort_before_any_checkpoint_is_touched(compose_train, tmp_path):
    train(compose_train(*SYNTHETIC_RUN, "trainer.epochs=1", "trainer.max_steps_per_epoch=1"), str(tmp_path))
    last = tmp_path / "checkpoints" / "last.pt"
    before = last.read_bytes()

    # A different architecture, from the run folder or from an explicit path.
    for resume in ("auto", str(last)):
        with pytest.raises(RunAborted, match="refusing checkpoint .* it holds resnet18 / attention emca_eca") as error:
            train(compose_train(*SYNTHETIC_RUN, "attention=se", f"trainer.resume={resume}"), str(tmp_path))
        assert "\n" not in str(error.value)
    # A fresh start must not overwrite a run.
    with pytest.raises(RunAborted, match="already holds a run .*checkpoints.*: pass trainer.resume=auto"):
        train(compose_train(*SYNTHETIC_RUN), str(tmp_path))
    # A dataset problem.
    with pytest.raises(RunAborted, match=str(tmp_path / "nowhere")):
        train(
            compose_train(*QUICK_RUN, "dataset=imagefolder", f"dataset.root={tmp_path / 'nowhere'}"),
            str(tmp_path / "other"),
        )
    assert last.read_bytes() == before
