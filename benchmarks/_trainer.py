"""The EMCA-Train trainer driven without train.py's Hydra entry point, for the benchmark scripts:
compose configs/train.yaml with overrides, build the Trainer, time one epoch at a time."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

import emca.config  # noqa: F401  (registers the config schema and resolvers)
from emca.engine.checkpoint import CheckpointStore
from emca.engine.distributed import setup_distributed
from emca.engine.preemption import StopRequest
from emca.engine.trainer import Trainer

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def build_trainer(overrides: list[str], run_dir: Path) -> Trainer:
    """The Trainer `python train.py *overrides` would build (nothing is written to run_dir until a
    checkpoint is saved, which the benchmarks never do)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return Trainer(cfg, setup_distributed(cfg.trainer.device), CheckpointStore(Path(run_dir)), source=None)


def trainer_epoch(trainer: Trainer):
    """A callable that trains one (capped) epoch from its first step, as Trainer.fit does."""
    stop = StopRequest()  # never entered: no handler installed, never requested

    def epoch():
        trainer.progress.step_in_epoch = 0
        trainer.train_one_epoch(0, stop, trackers=None, epoch_sums=trainer.task.sums(trainer.ctx.device))

    return epoch
