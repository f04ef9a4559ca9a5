"""Grad-CAM of several runs side by side, as the paper's Figures 7-8: a row per validation image,
the input then each run's heat map of it.

    python scripts/gradcam_grid.py outputs/resnet outputs/emca_se --out figure7.png
    python scripts/gradcam_grid.py RUN_A RUN_B RUN_C --classes n01440764 n02102040 --names ResNet SE EMCA-SE
    python scripts/gradcam_grid.py RUN_A/checkpoints/last.pt RUN_B --indices 0 120 300 --layer layer4.1

A RUN is a run folder (its checkpoints/best.pt) or a checkpoint file. Every run is shown the same
images, chosen and prepared with the first run's dataset settings (--dataset-root to read them
elsewhere); the runs must share its class list. Images and layer are chosen as eval.py's gradcam.*
options choose them (emca/analysis/gradcam.py): by default 4 images from 4 different classes and,
in each model, the deepest residual block whose output is at least 2x2. Exit status 0, or 1 with a
one-line error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from emca.analysis.checkpoint_eval import EvalError, read_checkpoint, restore_model
from emca.analysis.gradcam import AUTO, GradcamError, choose_images, heat_maps, save_grid
from emca.common.checkpoint_file import BEST, CHECKPOINT_DIR, CheckpointError
from emca.data import DatasetError
from emca.models import coverage_name

USER_ERRORS = (EvalError, CheckpointError, DatasetError)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run folders or checkpoint files, one column each")
    parser.add_argument(
        "--out", type=Path, default=Path("gradcam_grid.png"), help="the figure's PNG (default: gradcam_grid.png)"
    )
    chooser = parser.add_mutually_exclusive_group()
    chooser.add_argument("--images", type=int, default=4, help="N images from N different classes (default 4)")
    chooser.add_argument(
        "--classes", nargs="+", help="the first validation image of each of these classes (folder names)"
    )
    chooser.add_argument("--indices", nargs="+", type=int, help="these positions in val/'s sorted listing")
    parser.add_argument("--layer", default=AUTO, help="auto (default) or a module name, e.g. layer3.1")
    parser.add_argument("--names", nargs="+", help="column titles, one per run (default: backbone and attention)")
    parser.add_argument(
        "--dataset-root", type=Path, help="where the first run's dataset is now (default: where it trained)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error(f"--images={args.images} must be >= 1")
    if args.names and len(args.names) != len(args.runs):
        parser.error(f"--names gives {len(args.names)} titles for {len(args.runs)} runs; give one per run")
    if args.out.is_dir():
        parser.error(f"--out={args.out} is a folder; give the figure's file, e.g. {args.out / 'gradcam_grid.png'}")
    return args


def checkpoint_of(run: Path) -> Path:
    """A run folder's best.pt, or the checkpoint given."""
    return run / CHECKPOINT_DIR / BEST if run.is_dir() and (run / CHECKPOINT_DIR).is_dir() else run


def column_title(state: dict) -> str:
    arch = state["fingerprint"]["architecture"]
    coverage = arch.get("coverage")
    return f"{arch['backbone']} {arch['attention']}" + (
        f" {coverage_name(coverage['stages'], coverage['blocks'])}" if coverage else ""
    )


def draw(args: argparse.Namespace) -> tuple[int, int]:
    """Read every run, choose the images once, map them in each model, write the grid."""
    device = torch.device(args.device)
    runs = []
    for run in args.runs:
        checkpoint = checkpoint_of(run)
        state = read_checkpoint(checkpoint)
        runs.append((checkpoint, state, restore_model(checkpoint.resolve(), state).to(device).eval()))
    first, first_state, _ = runs[0]
    for checkpoint, state, _ in runs[1:]:
        if state.get("classes") != first_state.get("classes"):
            raise EvalError(f"{checkpoint} was trained on other classes than {first}; compare runs of one dataset")
    dataset_cfg = dict(first_state["config"]["dataset"])
    if args.dataset_root:
        dataset_cfg["root"] = str(args.dataset_root)
    chosen = choose_images(
        dataset_cfg,
        first_state.get("classes"),
        device,
        count=args.images,
        wanted_classes=args.classes,
        indices=args.indices,
    )
    names = args.names or [column_title(state) for _, state, _ in runs]
    columns = [(name, heat_maps(model, chosen, args.layer)) for name, (_, _, model) in zip(names, runs, strict=True)]
    return save_grid(chosen, columns, args.out)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        rows, columns = draw(args)
    except GradcamError as error:
        print(f"error: {error.spelled('--', ' ')}", file=sys.stderr)
        return 1
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {rows} images x (input + {columns - 1} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
