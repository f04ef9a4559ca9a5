"""What a run shows while it trains and records for later: step lines (train.log and console alike,
with or without a terminal bar), TensorBoard's shared epoch axis and HParams, MLflow and W&B."""

import json
import logging
import os
import re
import struct
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

import emca.config  # noqa: F401  (registers the resolvers the saved config uses)
from emca.engine import progress as progress_module
from emca.engine.metrics import Metrics
from emca.engine.progress import EpochProgress, RunClock, StepTimes
from emca.engine.trainer import Preempted, train

from conftest import SYNTHETIC_RUN, preempt_after_step

STEP_LINE = r"epoch 1/2 step 2/3  loss \S+  top1 \S+%  lr \S+  \d+ img/s  step \S+ s  data \S+ s  mem \S+ GiB  eta \S+"
# Overridden fields of a preset coverage: the derived name must follow them.
RUN = (*SYNTHETIC_RUN, "trainer.log_every=2", "coverage.stages=all", "coverage.blocks=2", "dataset.batch_size=16")


def run_lines(run_dir: Path) -> list[str]:
    return (run_dir / "train.log").read_text().splitlines()


def test_step_lines_reach_train_log_with_timing_memory_and_run_eta(compose_train, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO)  # what train.py's logging config sets
    asked = []  # the work left each ETA counts (its seconds round to 0 on a fast machine, so the work is checked)
    eta_s = RunClock.eta_s
    monkeypatch.setattr(RunClock, "eta_s", lambda self, *left, **kw: asked.append(left) or eta_s(self, *left, **kw))
    train(compose_train(*RUN), str(tmp_path))
    lines = run_lines(tmp_path)
    steps = [line for line in lines if re.search(STEP_LINE, line)]
    assert len(steps) == 1, lines
    # The line of epoch 1's step 2 (the second ETA asked; step 1's first-line is the first): the rest of
    # the run, not of the epoch, is ahead: 1 step of epoch 1, 3 of epoch 2 and both validations.
    assert asked[1] == (4, 2), asked
    assert any("epoch 2/2 step 3/3" in line for line in lines)


@pytest.mark.parametrize("columns, bar", [(120, True), (39, False), (0, False)])
def test_the_bar_needs_a_terminal_wide_enough_and_the_lines_never_do(monkeypatch, caplog, columns, bar):
    monkeypatch.setattr(progress_module.sys.stdout, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(progress_module.shutil, "get_terminal_size", lambda fallback: os.terminal_size((columns, 24)))
    with caplog.at_level(logging.INFO, logger=progress_module.__name__):
        with EpochProgress(1, 3, 10, 0, enabled=True, every_s=30.0) as shown:
            assert (shown.bar is not None) is bar
            shown.advance()
            shown.report(Metrics(1.5, 25.0, 50.0, 8), 0.1, 100.0, StepTimes(1.0, 0.5, 0.01), 1.25, 3725.0)
    assert caplog.messages == [
        "epoch 1/3 step 1/10  loss 1.5000  top1 25.00%  lr 0.1  100 img/s  step 0.500 s  data 0.010 s  mem 1.25 GiB  "
        "eta 1:02:05"
    ]


def test_run_eta_counts_the_steps_and_validations_left():
    clock = RunClock()
    clock.add_window(StepTimes(seconds=10.0, step_s=1.0, data_s=0.0), steps=10)
    clock.add_validation(30.0)
    assert clock.eta_s(steps_left=100, validations_left=2) == pytest.approx(160.0)


def hparams_of(run_dir: Path) -> dict:
    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {key: value.string_value or value.number_value for key, value in start.hparams.items()}


def test_tensorboard_overlays_train_and_val_and_hparams_hold_what_the_run_used(compose_train, tmp_path):
    train(compose_train(*RUN), str(tmp_path))
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    for tag in ("loss/train", "loss/val", "top1/train", "top1/val"):
        assert [event.step for event in events.Scalars(tag)] == [1, 2], tag
    layout = events.PluginTagToContent("custom_scalars")
    assert layout  # the Custom Scalars tab's overlay of train, val and EMA
    hparams = hparams_of(tmp_path)
    # digits_quick: lr 0.1 for a batch of 256, trained with 16: the rate used is 0.1 * 16 / 256.
    assert hparams["optimizer.lr"] == pytest.approx(0.00625) and hparams["optimizer.lr_configured"] == 0.1
    assert hparams["coverage.name"] == "stages=all,blocks=2" == hparams["model.coverage"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["coverage"]["name"] == "stages=all,blocks=2"


def test_the_saved_config_derives_the_coverage_name_from_the_fields(compose_train):
    # .hydra/config.yaml is OmegaConf.to_yaml of the composed config (train.py's hydra_records).
    saved = OmegaConf.create(OmegaConf.to_yaml(compose_train(*RUN)))
    assert saved.coverage.name == "stages=all,blocks=2"
    assert OmegaConf.create(OmegaConf.to_yaml(compose_train(*SYNTHETIC_RUN, "coverage=none"))).coverage.name == "none"


def mlflow_run(store: Path):
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("emca-train")
    runs = client.search_runs([experiment.experiment_id])
    return client, runs


def test_mlflow_gets_the_same_scalars_params_and_final_metrics_and_resume_continues_its_run(
        compose_train, tmp_path, monkeypatch):
    store = tmp_path / "mlflow.db"
    options = (*RUN, "logger=mlflow", f"logger.mlflow.tracking_uri=sqlite:///{store}")
    run_dir = tmp_path / "run"
    # Stopped mid-epoch 2 (SIGTERM), then resumed: one MLflow run, continued.
    preempt_after_step(monkeypatch, 4)
    with pytest.raises(Preempted):
        train(compose_train(*options), str(run_dir))
    monkeypatch.undo()
    client, runs = mlflow_run(store)
    assert len(runs) == 1 and runs[0].info.status == "KILLED"
    train(compose_train(*options, "trainer.resume=auto"), str(run_dir))
    client, runs = mlflow_run(store)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert set(run.data.metrics) == set(events.Tags()["scalars"])
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "top1/val")] == [
        (event.step, pytest.approx(event.value)) for event in events.Scalars("top1/val")
    ]
    results = json.loads((run_dir / "results.json").read_text())
    assert run.data.metrics["hparams/best_val_top1"] == pytest.approx(results["best"]["val_top1"])
    assert run.data.params["optimizer.lr"] == str(0.00625)
    assert run.data.params["model.coverage"] == "stages=all,blocks=2"
    assert run.data.tags["emca.run_id"] == results["run_id"]


def wandb_records(path: Path):
    """The records of an offline W&B run file: W&B's header, then a LevelDB-style log (32 KiB blocks
    of chunks with a 7-byte header: CRC, length, type) holding wandb_internal.proto Records."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, payload = 7, 32768, b""
    while position + 7 <= len(data):
        room = block - position % block
        if room < 7:  # a block's tail too short for a header is padding
            position += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        payload += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            yield record
            payload = b""
        elif kind == 0:
            break


def test_wandb_offline_gets_the_same_scalars_params_and_final_metrics(compose_train, tmp_path):
    train(compose_train(*RUN, "logger=wandb"), str(tmp_path))
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    history, config, summary = set(), {}, {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        elif kind in ("run", "config"):  # the config given to wandb.init comes with the run record
            update = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in update})
        elif kind == "summary":
            summary.update({item.key or "/".join(item.nested_key): item.value_json for item in record.summary.update})
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    scalars = {tag for tag in events.Tags()["scalars"] if not tag.startswith("hparams/")}
    assert scalars <= history
    # W&B stores a histogram as its bins and values.
    assert {f"{tag}/values" for tag in events.Tags()["histograms"]} <= history
    assert config["optimizer.lr"] == pytest.approx(0.00625)
    assert config["model.coverage"] == "stages=all,blocks=2"
    results = json.loads((tmp_path / "results.json").read_text())
    assert float(summary["hparams/best_val_top1"]) == pytest.approx(results["best"]["val_top1"])
    assert results["run_id"] in run_file.name


def test_a_resumed_run_keeps_the_step_events_up_to_its_checkpoint(compose_train, tmp_path, monkeypatch):
    # SIGTERM after the last step of epoch 1, whose report (global step 3) precedes the save at step 3:
    # the resumed run must keep that event and drop only what came after the checkpoint.
    preempt_after_step(monkeypatch, 3)
    with pytest.raises(Preempted):
        train(compose_train(*RUN), str(tmp_path))
    monkeypatch.undo()
    train(compose_train(*RUN, "trainer.resume=auto"), str(tmp_path))
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [event.step for event in events.Scalars("train_step/loss")] == [2, 3, 5, 6]
    assert [event.step for event in events.Scalars("top1/val")] == [1, 2]
