"""Weights & Biases (rank 0), offline by default: the run is written under <run folder>/wandb/ and
`wandb sync` uploads it later, so no account or network is needed to train.

The W&B run id is the training run's id, so a resumed run continues its W&B run. Step series are
plotted against `optimizer_step`, epoch series against `epoch` (W&B's own step must only grow,
which the two axes of one run would break).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from emca.engine.trackers.config import WandbConfig, WandbMode

STEP_AXIS, EPOCH_AXIS = "optimizer_step", "epoch"


def check_login(cfg: WandbConfig) -> None:
    """logger.wandb.mode=online needs credentials (WANDB_API_KEY, `wandb login`'s netrc entry): without
    them wandb.init stops the run with a UsageError. Found without a network call (raises TrackerError)."""
    if cfg.mode != WandbMode.online:
        return
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib.wbauth import authenticate_session

    from emca.engine.trackers import TrackerError

    host = wandb_setup.singleton().settings.base_url
    try:
        found = authenticate_session(host=host, source="emca-train", prompt=False, update_session=False)
    except Exception as error:  # a malformed key or identity-token file, in W&B's own words
        raise TrackerError(f"logger.wandb.mode=online: the W&B credentials for {host} are unusable ({error}); "
                           "fix them (`wandb login --relogin`), or use logger.wandb.mode=offline") from None
    if found is None:
        raise TrackerError(f"logger.wandb.mode=online needs a W&B login for {host} and none is configured: run "
                           "`wandb login` or set WANDB_API_KEY, or use logger.wandb.mode=offline (then `wandb sync`)")


class WandbTracker:
    def __init__(self, cfg: WandbConfig, run_dir: Path, run_id: str, run_name: str, params: Mapping[str, Any],
                 step_prefix: str):
        import wandb

        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, mode=cfg.mode.value, dir=str(run_dir), id=run_id,
            resume="allow", name=run_name, tags=list(cfg.tags), config=dict(params),
            settings=wandb.Settings(console="off", silent=True),
        )
        self.run.define_metric(STEP_AXIS)
        self.run.define_metric(f"{step_prefix}*", step_metric=STEP_AXIS)
        self.run.define_metric(EPOCH_AXIS)
        self.epoch_tags: set[str] = set()

    def log_step(self, step: int, scalars: Mapping[str, float]) -> None:
        self.run.log({**scalars, STEP_AXIS: step})

    def log_epoch(self, epoch: int, scalars: Mapping[str, float]) -> None:
        for tag in scalars.keys() - self.epoch_tags:  # each tag put on the epoch axis once
            self.run.define_metric(tag, step_metric=EPOCH_AXIS)
            self.epoch_tags.add(tag)
        self.run.log({**scalars, EPOCH_AXIS: epoch})

    def log_histograms(self, epoch: int, histograms) -> None:
        import wandb

        edges = [0.0, *histograms.bucket_limits()]
        charts = {
            f"scales/{name}": wandb.Histogram(np_histogram=(histograms.counts[index].tolist(), edges))
            for index, name in enumerate(histograms.names) if histograms.moments[index, 0] > 0
        }
        self.log_epoch(epoch, charts)

    def finish(self, params: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        self.run.summary.update(dict(metrics))
        self.run.finish()
        self.run = None

    def close(self) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1)
