"""MLflow (rank 0), through the client API rather than mlflow's process-global active run, so
that runs in one process (a sweep, the tests) never write into each other.

One MLflow run per training run, found again by its `emca.run_id` tag when the run resumes, so a
pre-empted run continues its MLflow run. Params: the run's parameters (the effective learning rate
and the derived coverage name included); metrics: the same tags as TensorBoard, step series at
the optimizer step, epoch series at the epoch; final/best metrics at the end.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping

from .config import MlflowConfig

RUN_ID_TAG = "emca.run_id"
_BATCH = 100  # MLflow's limit on params per log_batch call
_PARAM_VALUE_MAX = 6000  # and on the length of a param value


def tracking_uri(cfg: MlflowConfig) -> str:
    if cfg.tracking_uri:
        return cfg.tracking_uri
    store = Path.cwd() / "mlruns"
    store.mkdir(exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


class MlflowTracker:
    def __init__(self, cfg: MlflowConfig, run_id: str, run_name: str, params: Mapping[str, Any]):
        from mlflow.tracking import MlflowClient

        # Their INFO lines (creating the database tables, migrations) are noise in train.log; after the
        # import, which sets mlflow's own level.
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)

        self.client = MlflowClient(tracking_uri(cfg))
        experiment = self.client.get_experiment_by_name(cfg.experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(cfg.experiment)
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'")
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            logged = found[0].data.params
        else:
            created = self.client.create_run(experiment_id, run_name=run_name, tags={RUN_ID_TAG: run_id})
            self.run_id = created.info.run_id
            logged = {}
        self._log_params({key: value for key, value in params.items() if key not in logged})

    def _log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        entries = [Param(key, str(value)[:_PARAM_VALUE_MAX]) for key, value in params.items()]
        for start in range(0, len(entries), _BATCH):
            self.client.log_batch(self.run_id, params=entries[start:start + _BATCH])

    def _log_metrics(self, scalars: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_step(self, step: int, scalars: Mapping[str, float]) -> None:
        self._log_metrics(scalars, step)

    def log_epoch(self, epoch: int, scalars: Mapping[str, float]) -> None:
        self._log_metrics(scalars, epoch)

    def log_histograms(self, epoch: int, histograms) -> None:
        """MLflow has no histograms: TensorBoard keeps the attention scales."""

    def finish(self, params: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        self._log_metrics(metrics, 0)
        self.client.set_terminated(self.run_id, status="FINISHED")
        self.run_id = None

    def close(self) -> None:
        if self.run_id is not None:  # stopped or failed before the end: resumable, not finished
            self.client.set_terminated(self.run_id, status="KILLED")
