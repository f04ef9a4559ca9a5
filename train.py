"""Train an EMCA-ResNet.

    python train.py                                   # digits on CPU, the defaults in configs/train.yaml
    python train.py dataset=imagenet backbone=resnet50 attention=emca_se trainer=gpu
    python -m emca.launch --nproc_per_node=8 train.py dataset=imagenet ...   # DDP (torchrun with a clean stop)
    python train.py -m attention=emca_se,emca_eca coverage=none,prev_stage_all   # a sweep
    python train.py hydra.run.dir=outputs/run1 trainer.resume=auto                # continue a run

Options: configs/ and their schema in emca/config.py. Exit status: 0 when the run completed (or had
already completed) or was stopped by SIGTERM / SIGUSR1 after saving checkpoints/last.pt; 130 when
stopped by SIGINT (Ctrl-C); 1 on an error, reported in one line.
"""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import emca.config  # noqa: F401  (registers the config schema and resolvers)
from emca.cli import OVERRIDES_RECORD, check_command_line, continued_overrides
from emca.engine.tasks import TASKS
from emca.engine.trainer import Preempted, RunAborted, train

log = logging.getLogger("train")


def hydra_records(cfg: DictConfig, overrides: list[str]) -> dict[str, str]:
    """What Hydra itself would write to <run folder>/.hydra/, for the trainer to write once the run
    is accepted (configs/train.yaml turns Hydra's own writes off)."""
    return {
        "config.yaml": OmegaConf.to_yaml(cfg),
        "hydra.yaml": OmegaConf.to_yaml({"hydra": HydraConfig.get()}),
        "overrides.yaml": OmegaConf.to_yaml(overrides),
    }


def run_config(cfg: DictConfig) -> tuple[DictConfig, list[str]]:
    """The config this job trains and its overrides: a continued run (trainer.resume set, in a folder
    that recorded its overrides) composes the recorded ones under the command line's."""
    hydra_cfg = HydraConfig.get()
    given = list(hydra_cfg.overrides.task)
    merged = continued_overrides(Path(hydra_cfg.runtime.output_dir), given) if cfg.trainer.resume else None
    if merged is None:
        return cfg, given
    log.info("continuing the run in %s with its recorded overrides, the command line's last: %s",
             hydra_cfg.runtime.output_dir, " ".join(merged))
    try:
        return hydra.compose(hydra_cfg.job.config_name, overrides=merged), merged
    except HydraException as error:  # an override this version no longer has
        first = str(error).splitlines()[0]
        raise RunAborted(f"cannot compose the overrides the run recorded in {OVERRIDES_RECORD} ({first}); correct "
                         "that file or start a new run in another hydra.run.dir") from None


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    try:
        cfg, overrides = run_config(cfg)
        results = train(cfg, hydra_cfg.runtime.output_dir, hydra_records(cfg, overrides))
        # What a sweeper optimises: the best epoch's validation figure of the task (top-1, box AP).
        return results["best"][f"val_{TASKS[results['task']].best}"]
    except Preempted as stopped:
        sys.exit(stopped.exit_status)
    except RunAborted as error:
        log.error("%s", error)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise  # the sweep goes on with its other jobs; Hydra reports this line when it ends
        sys.exit(1)


if __name__ == "__main__":
    check_command_line(Path(__file__).parent / "configs", "train")
    main()
