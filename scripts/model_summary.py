"""Print an EMCA-ResNet's layout, R_i per EMCA module, parameters and GFLOPs.

    python scripts/model_summary.py backbone=resnet50 attention=emca_se coverage=prev_stage_all
    python scripts/model_summary.py attention=emca_eca coverage='{stages: all, blocks: 1}' image_size=160
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import emca.config  # noqa: F401  (registers the attention group's choices)
from emca.cli import check_command_line
from emca.models import build_model
from emca.models.summary import format_summary


@hydra.main(version_base="1.3", config_path="../configs", config_name="summary")
def main(cfg: DictConfig) -> None:
    try:
        model = build_model(cfg.backbone, cfg.attention, cfg.coverage, cfg.num_classes)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(format_summary(model, cfg.image_size))


if __name__ == "__main__":
    check_command_line(Path(__file__).resolve().parents[1] / "configs", "summary")
    main()
