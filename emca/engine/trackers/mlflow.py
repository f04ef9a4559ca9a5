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
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from emca.engine.trackers.config import MlflowConfig

RUN_ID_TAG = "emca.run_id"
_BATCH = 100  # MLflow's limit on params per log_batch call
_PARAM_VALUE_MAX = 6000  # and on the length of a param value


def tracking_uri(cfg: MlflowConfig) -> str:
    if cfg.tracking_uri:
        return cfg.tracking_uri
    return f"sqlite:///{Path.cwd() / 'mlruns' / 'mlflow.db'}"


def _local_store(uri: str) -> Optional[Path]:
    """The SQLite file of a sqlite:/// URI (None: a server or another database)."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):].split("?", 1)[0])
    return None


def check_store(cfg: MlflowConfig) -> None:
    """A local SQLite store must be one that can be written: its folder (SQLite writes its journal
    beside the file) and the file itself if it exists (raises TrackerError, one line). Creates the
    default store's folder mlruns/."""
    from emca.engine.trackers import TrackerError

    uri = tracking_uri(cfg)
    database = _local_store(uri)
    if database is None or database == Path(":memory:"):
        return
    setting = f"logger.mlflow.tracking_uri={uri}" if cfg.tracking_uri else f"the default MLflow store {uri}"
    fix = "point logger.mlflow.tracking_uri at a writable store, or train without MLflow: logger.mlflow.enabled=false"
    try:
        database.parent.mkdir(parents=True, exist_ok=True)
        probe = database.parent / f".{database.name}.write-probe-{uuid.uuid4().hex}"
        probe.touch()
        probe.unlink()
        if database.exists():
            with open(database, "r+b") as file:  # opened for writing, nothing written
                header = file.read(16)
            if header and header != b"SQLite format 3\x00":
                raise TrackerError(f"{setting} cannot be opened: {database} is not an SQLite database; {fix}")
    except OSError as error:
        raise TrackerError(f"{setting} cannot be opened for writing ({error.strerror}: "
                           f"{error.filename or database}); {fix}") from None


class MlflowTracker:
    def __init__(self, cfg: MlflowConfig, run_id: str, run_name: str, params: Mapping[str, Any],
                 epochs: Sequence[tuple[int, Mapping[str, float]]] = ()):
        """`epochs`: the (epoch, scalars) of the epochs trained so far (a resumed run): those the
        MLflow run lacks, because MLflow failed or was off meanwhile, are sent again."""
        from mlflow.tracking import MlflowClient

        # Their INFO lines (creating the database tables, migrations) are noise in train.log; after the
        # import, which sets mlflow's own level.
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # A database error is logged there with its traceback and then raised: the tracker's channel
        # reports it in one line (emca.engine.trackers.channel).
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

        uri = tracking_uri(cfg)
        database = _local_store(uri)
        if database is not None:
            database.parent.mkdir(parents=True, exist_ok=True)  # SQLite creates the file, not its folder
        self.client = MlflowClient(uri)
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
        if epochs:
            self._resend(epochs)

    def _resend(self, epochs: Sequence[tuple[int, Mapping[str, float]]]) -> None:
        """The epoch series' points the run lacks (MLflow keeps every value logged: none twice)."""
        tags = {tag for _, scalars in epochs for tag in scalars}
        present = {tag: {metric.step for metric in self.client.get_metric_history(self.run_id, tag)} for tag in tags}
        for epoch, scalars in epochs:
            missing = {tag: value for tag, value in scalars.items() if epoch not in present[tag]}
            if missing:
                self._log_metrics(missing, epoch)

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
