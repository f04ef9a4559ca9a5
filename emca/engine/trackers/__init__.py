"""Experiment trackers (the `logger` config group): TensorBoard by default, MLflow and Weights &
Biases on request. Rank 0 writes; every tracker gets the same scalars, parameters and final metrics.

Scalars come in two series: per optimizer step (STEP_PREFIX tags, every trainer.log_every steps)
and per epoch (loss/*, top1/*, top5/*, lr/epoch), so train and validation curves share the epoch axis.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from .config import LoggerConfig

log = logging.getLogger(__name__)

STEP_PREFIX = "train_step/"


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
        split, _, metric = key.rpartition("_")
        if split in ("train", "val", "ema_val") and metric in ("loss", "top1", "top5"):
            scalars[f"{metric}/{split}"] = value
    return scalars


class Trackers:
    """The run's trackers as one: each call goes to every one of them."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def log_step(self, step: int, scalars: Mapping[str, float]) -> None:
        scalars = {f"{STEP_PREFIX}{key}": value for key, value in scalars.items()}
        for tracker in self.trackers:
            tracker.log_step(step, scalars)

    def log_epoch(self, epoch: int, scalars: Mapping[str, float]) -> None:
        for tracker in self.trackers:
            tracker.log_epoch(epoch, scalars)

    def log_histograms(self, epoch: int, histograms) -> None:
        for tracker in self.trackers:
            tracker.log_histograms(epoch, histograms)

    def finish(self, params: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        for tracker in self.trackers:
            tracker.finish(params, metrics)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def build_trackers(cfg: LoggerConfig, run_dir: Path, run_id: str, params: Mapping[str, Any],
                   global_step: int) -> Trackers:
    """`params`: the run's flattened parameters; `global_step`: the optimizer steps already trained
    (a resumed run), after which TensorBoard drops what a pre-empted process wrote."""
    trackers, shown = [], []
    run_name = f"{run_dir.parent.name}/{run_dir.name}"  # e.g. <sweep time>/0_attention-emca_se
    if cfg.tensorboard:
        from .tensorboard import TensorBoardTracker

        # Events written after the checkpoint this run resumes from have a larger step.
        trackers.append(TensorBoardTracker(run_dir, purge_step=global_step + 1 if global_step else None))
        shown.append("TensorBoard (event files beside train.log)")
    if cfg.mlflow.enabled:
        from .mlflow import MlflowTracker, tracking_uri

        trackers.append(MlflowTracker(cfg.mlflow, run_id, run_name, params))
        shown.append(f"MLflow ({tracking_uri(cfg.mlflow)}, experiment {cfg.mlflow.experiment})")
    if cfg.wandb.enabled:
        from .wandb import WandbTracker

        trackers.append(WandbTracker(cfg.wandb, run_dir, run_id, run_name, params, STEP_PREFIX))
        shown.append(f"W&B {cfg.wandb.mode.value} (project {cfg.wandb.project}, {run_dir / 'wandb'})")
    log.info(f"tracking to {', '.join(shown)}" if shown else "no experiment tracker (logger.tensorboard=false)")
    return Trackers(trackers)
