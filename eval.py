"""Evaluate a trained checkpoint: what the paper reports about a model, in one eval.json.

    python eval.py checkpoint=outputs/2026-01-01/10-00-00/checkpoints/best.pt
    python eval.py checkpoint=PATH dataset.root=/data/imagenet loader=torchvision gradcam.images=8
    python eval.py checkpoint=PATH accuracy_only=true                       # top-1/top-5/loss alone, fastest
    python eval.py checkpoint=PATH gradcam.classes=[3,7] gradcam.layer=layer3.1
    torchrun --nproc_per_node=8 eval.py checkpoint=PATH                     # each val image once
    python eval.py checkpoint=DETECTION_RUN/checkpoints/best.pt dataset.root=/data/coco   # COCO box (mask) AP

Measures top-1 / top-5 / loss, top-1 on the validation images rotated 90/180/270 degrees clockwise
(Table 9), parameters and GFLOPs, the paper's three speeds (FPS, FPS-dagger, FPS-double-dagger;
FPS on a fixed number of images, speed.single_images, whatever the validation set's size),
the learned-scale statistics of Figure 6 (with a plot) and optional Grad-CAM maps (Figures 7-8;
scripts/gradcam_grid.py lays several runs' maps of the same images side by side).
A task=detection run's checkpoint is scored as its run validated it: COCO's box AP, AP50, AP75 and
AP small / medium / large (and mask AP for Mask R-CNN) on the validation split alone
(emca/analysis/detection_eval.py); the classification measurements do not apply to it.
Options: emca/analysis/eval_config.py (EvalConfig, the schema of configs/eval.yaml); the output
policy: configs/eval.yaml. Exit status 0, or 1 with a one-line error (a wrong option too, before
anything runs: emca/cli.py).
"""

import sys
from pathlib import Path
from typing import NoReturn

import hydra
from omegaconf import DictConfig

import emca.analysis.eval_config  # noqa: F401  (registers eval_schema, which configs/eval.yaml names)
from emca.cli import check_command_line


def fail(error: Exception) -> NoReturn:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    # Imported here, after Hydra has composed the config: `eval.py --help` loads neither torch nor the models.
    from emca.analysis.checkpoint_eval import EvalError, evaluate_checkpoint, format_summary
    from emca.common.checkpoint_file import CheckpointError
    from emca.data import DatasetError
    from emca.engine.distributed import setup_distributed, silence_non_main_logging

    user_errors = (EvalError, CheckpointError, DatasetError)
    silence_non_main_logging()
    try:
        ctx = setup_distributed(cfg.device, device_option="device")
    except ValueError as error:  # an unusable device option
        fail(error)
    try:
        report = evaluate_checkpoint(cfg, ctx)
    except user_errors as error:
        fail(error)
    if report is not None:
        print(format_summary(report))


if __name__ == "__main__":
    check_command_line(Path(__file__).resolve().parent / "configs", "eval")
    main()
