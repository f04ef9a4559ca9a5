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

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import emca.config  # noqa: F401  (registers the config schema and resolvers)
from emca.engine.trainer import Preempted, RunAborted, train

log = logging.getLogger("train")


def hydra_records(cfg: DictConfig) -> dict[str, str]:
    """What Hydra itself would write to <run folder>/.hydra/, for the trainer to write once the run
    is accepted (configs/train.yaml turns Hydra's own writes off)."""
    hydra_cfg = HydraConfig.get()
    return {
        "config.yaml": OmegaConf.to_yaml(cfg),
        "hydra.yaml": OmegaConf.to_yaml({"hydra": hydra_cfg}),
        "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.overrides.task),
    }


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    try:
        return train(cfg, hydra_cfg.runtime.output_dir, hydra_records(cfg))["best"]["val_top1"]
    except Preempted as stopped:
        sys.exit(stopped.exit_status)
    except RunAborted as error:
        log.error("%s", error)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise  # the sweep goes on with its other jobs; Hydra reports this line when it ends
        sys.exit(1)


if __name__ == "__main__":
    main()
