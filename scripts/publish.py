"""Publish a completed run as a model timm and the Hugging Face Hub read, with its model card.

    python eval.py checkpoint=outputs/DATE/TIME/checkpoints/best.pt accuracy_only=true     # the card's figures
    python scripts/publish.py run=outputs/DATE/TIME out=published/emca_eca_r50
    python scripts/publish.py run=RUN out=DIR ema=true                 # the EMA weights (eval.py ... ema=true first)
    python scripts/publish.py run=RUN out=DIR checkpoint=last.pt license=cc-by-nc-4.0
    python scripts/publish.py run=RUN out=DIR push=USER/emca-eca-r50   # and upload it (a token and the network)

The folder (emca/analysis/publish.py says what each file holds): model.safetensors, config.json,
README.md, training_curve.png, and the run's config.yaml, results.json and train.log. It loads back
offline with timm (`import emca.models` registers the architectures):

    timm.create_model("local-dir:DIR", pretrained=True)
    timm.create_model(NAME, pretrained=True, **model_args, pretrained_cfg_overlay=dict(file="DIR/model.safetensors",
                      num_classes=N))
    emca.load_model("DIR")                                              # with the run's validation transform

Refused in one line: a folder without a completed run (no results.json), a task=detection run (its
detector is no timm classifier), ema=true for a run without EMA weights, weights eval.py has not
measured (unless require_eval=false), an eval.json of another epoch or dataset, an output folder holding
other files. push= without a token, or without the network, writes the folder and says so in one line.
Options: PublishConfig in emca/config.py. Exit status 0, or 1 with a one-line error.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import hydra
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python scripts/publish.py` from anywhere, without an installed package
    sys.path.insert(0, str(REPO))

import emca.config  # noqa: E402, F401  (registers publish_schema)
from emca.analysis.publish import PublishError, publish_run, push_folder  # noqa: E402
from emca.cli import check_command_line  # noqa: E402
from emca.common.checkpoint_file import CheckpointError  # noqa: E402
from emca.data import DatasetError  # noqa: E402

USAGE = "python scripts/publish.py run=RUN_FOLDER out=DIR"


def publish(cfg: DictConfig) -> list[str]:
    """Write the folder; the lines to print."""
    for option in ("run", "out"):
        if not cfg[option]:
            raise PublishError(f"give the run folder and the folder to write: {USAGE}")
    return publish_run(Path(cfg.run).expanduser(), Path(cfg.out).expanduser(), cfg.checkpoint, cfg.ema,
                       cfg.require_eval, cfg.license, cfg.datasets, cfg.push)


def fail(error: Exception) -> NoReturn:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)


@hydra.main(version_base="1.3", config_path="../configs", config_name="publish")
def main(cfg: DictConfig) -> None:
    try:
        print("\n".join(publish(cfg)), flush=True)
        if cfg.push:  # after the folder's lines: a failed upload leaves the folder written
            print(push_folder(Path(cfg.out).expanduser(), cfg.push, cfg.private))
    except (PublishError, CheckpointError, DatasetError) as error:
        fail(error)


if __name__ == "__main__":
    check_command_line(REPO / "configs", "publish")
    main()
