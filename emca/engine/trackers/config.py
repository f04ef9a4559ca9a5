"""The `logger` config group's schema: which experiment trackers a run writes to (rank 0)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import List, Optional


class WandbMode(str, Enum):
    offline = "offline"  # written under <run folder>/wandb/; upload later with `wandb sync <that folder>`
    online = "online"  # streamed to the W&B server (needs `wandb login` or WANDB_API_KEY)
    disabled = "disabled"


@dataclass
class MlflowConfig:
    enabled: bool = False
    # null: a local store, sqlite:///<launch folder>/mlruns/mlflow.db, shared by every run launched from
    # there (MLflow's plain-file store is in maintenance mode). Many concurrent SLURM jobs should point
    # at a tracking server instead (http://host:5000): SQLite on a network filesystem does not lock well.
    tracking_uri: Optional[str] = None
    experiment: str = "emca-train"


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "emca-train"
    entity: Optional[str] = None  # null: the logged-in user's default
    mode: WandbMode = WandbMode.offline
    tags: List[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    # TensorBoard event files in the run folder, also the attention-scale histograms only it shows.
    tensorboard: bool = True
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # How long one tracker call may take (a locked or unreachable store) before that tracker is
    # disabled for the rest of the run; also the most the end of a run waits for the trackers'
    # queued records. Training never waits on a tracker meanwhile.
    timeout_s: float = 60.0
