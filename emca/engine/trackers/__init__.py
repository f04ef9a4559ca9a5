"""Experiment trackers (the `logger` config group): TensorBoard by default, MLflow and Weights &
Biases on request. Rank 0 writes; every tracker gets the same scalars, parameters and final metrics.

Scalars come in two series: per optimizer step (STEP_PREFIX tags, every trainer.log_every steps)
and per epoch (loss/*, top1/*, top5/*, lr/epoch), so train and validation curves share the epoch axis.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from emca.engine.trackers.channel import Channel
from emca.engine.trackers.config import LoggerConfig

log = logging.getLogger(__name__)

STEP_PREFIX = "train_step/"
# What a tracker that failed gets back (the epoch series, from the checkpoint's history; W&B offline
# cannot be asked what it holds, so it keeps its gap).
RESENT = "; a resume of this run sends it the epoch records it missed"


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys with the scalar types every tracker understands (lists and None as text)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def epoch_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """An epoch's record (train_loss, val_top1, ema_val_top5, lr, ...) as per-epoch tags:
    <metric>/<split> (loss/train, top1/val, top5/ema_val) and lr/epoch."""
    scalars = {"lr/epoch": record["lr"]}
    for key, value in record.items():
        # ema_val before val: "ema_val_top1" is the EMA's; a metric may hold "_" (bbox_ap50, loss_mask).
        split = next((split for split in ("ema_val", "val", "train") if key.startswith(f"{split}_")), None)
        if split is not None and value is not None:
            scalars[f"{key[len(split) + 1:]}/{split}"] = value
    return scalars


class TrackerError(ValueError):
    """A tracker that cannot start (an unwritable store, no login): one line, before anything is written."""


def check_trackers(cfg: LoggerConfig) -> None:
    """What can be known about the trackers before the run folder is written: a local store that
    cannot be opened for writing, W&B online without credentials (raises TrackerError). A tracker
    server that does not answer is found by its first call instead, and disabled."""
    if cfg.timeout_s <= 0:
        raise TrackerError(f"logger.timeout_s={cfg.timeout_s} must be positive (seconds a tracker may take)")
    if cfg.mlflow.enabled:
        from emca.engine.trackers.mlflow import check_store

        check_store(cfg.mlflow)
    if cfg.wandb.enabled:
        from emca.engine.trackers.wandb import check_login

        check_login(cfg.wandb)


@dataclass(frozen=True)
class HistogramSnapshot:
    """An epoch's attention-scale histograms copied to the CPU: the channels read them on their own
    threads, after the trainer has moved on."""

    names: list[str]
    limits: list[float]
    counts: torch.Tensor
    moments: torch.Tensor
    minimum: torch.Tensor
    maximum: torch.Tensor

    @classmethod
    def of(cls, histograms) -> "HistogramSnapshot":
        copies = [getattr(histograms, name).detach().cpu().clone() for name in ("counts", "moments", "minimum",
                                                                               "maximum")]
        return cls(list(histograms.names), histograms.bucket_limits(), *copies)

    def bucket_limits(self) -> list[float]:
        return self.limits


class Trackers:
    """The run's trackers as one: each call goes to every tracker's channel (emca.engine.trackers.channel),
    so a tracker that fails or hangs is disabled in one line and the run goes on."""

    def __init__(self, channels: list[Channel], timeout_s: float):
        self.channels, self.timeout_s = channels, timeout_s

    def log_step(self, step: int, scalars: Mapping[str, float]) -> None:
        scalars = {f"{STEP_PREFIX}{key}": value for key, value in scalars.items()}
        for channel in self.channels:
            channel.call("log_step", step, scalars)

    def log_epoch(self, epoch: int, scalars: Mapping[str, float]) -> None:
        for channel in self.channels:
            channel.call("log_epoch", epoch, dict(scalars))

    def log_histograms(self, epoch: int, histograms) -> None:
        snapshot = HistogramSnapshot.of(histograms)
        for channel in self.channels:
            channel.call("log_histograms", epoch, snapshot)

    def finish(self, params: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        for channel in self.channels:
            channel.call("finish", dict(params), dict(metrics))

    def close(self) -> None:
        """Wait for what is queued, all trackers together at most logger.timeout_s."""
        deadline = time.monotonic() + self.timeout_s
        for channel in self.channels:
            channel.close(deadline)


def build_trackers(cfg: LoggerConfig, run_dir: Path, run_id: str, params: Mapping[str, Any],
                   global_step: int, history: Sequence[Mapping[str, Any]] = ()) -> Trackers:
    """`params`: the run's flattened parameters; `global_step`: the optimizer steps already trained
    (a resumed run), after which TensorBoard drops what a pre-empted process wrote; `history`: the
    epoch records so far, which MLflow and TensorBoard get again where they lack them. Each tracker starts on
    its own thread: one that cannot start is reported and disabled, and the run goes on."""
    channels, shown = [], []
    run_name = f"{run_dir.parent.name}/{run_dir.name}"  # e.g. <sweep time>/0_attention-emca_se
    params = dict(params)
    epochs = [(record["epoch"], epoch_scalars(record)) for record in history]
    if cfg.tensorboard:
        from emca.engine.trackers.tensorboard import TensorBoardTracker

        # Events written after the checkpoint this run resumes from have a larger step.
        purge_step = global_step + 1 if global_step else None
        channels.append(Channel("TensorBoard", lambda: TensorBoardTracker(run_dir, purge_step, epochs),
                                cfg.timeout_s, after_failure=RESENT))
        shown.append("TensorBoard (event files beside train.log)")
    if cfg.mlflow.enabled:
        from emca.engine.trackers.mlflow import MlflowTracker, tracking_uri

        channels.append(Channel("MLflow", lambda: MlflowTracker(cfg.mlflow, run_id, run_name, params, epochs),
                                cfg.timeout_s, after_failure=RESENT))
        shown.append(f"MLflow ({tracking_uri(cfg.mlflow)}, experiment {cfg.mlflow.experiment})")
    if cfg.wandb.enabled:
        from emca.engine.trackers.wandb import WandbTracker

        channels.append(Channel("W&B", lambda: WandbTracker(cfg.wandb, run_dir, run_id, run_name, params,
                                                             STEP_PREFIX), cfg.timeout_s))
        shown.append(f"W&B {cfg.wandb.mode.value} (project {cfg.wandb.project}, {run_dir / 'wandb'})")
    log.info(f"tracking to {', '.join(shown)}" if shown else "no experiment tracker (logger.tensorboard=false)")
    return Trackers(channels, cfg.timeout_s)
