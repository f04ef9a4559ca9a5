"""A run folder written by v0.2 (commit eb4e51f, the landed state before issue 24) still resumes,
evaluates and loads with today's code.

v0.2's own code makes it: the commit's tree is extracted into a temporary folder and its train.py runs
with that package first on PYTHONPATH (checked: `import emca` resolves there), on the digits set, and is
stopped by SIGTERM early in epoch 2 of 2, as a preempted run is. Today's train.py then continues it to
the end with trainer.resume=auto, today's eval.py evaluates its best.pt, and emca.load_model loads it.
Skipped where the repository holds no history of eb4e51f (a shallow clone).
"""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import emca
from emca.engine.compatibility import check_resume_config

from conftest import REPO_ROOT, compose_train_config

pytestmark = pytest.mark.slow

V02 = "eb4e51f"
STEPS = 4  # per epoch: SIGTERM after epoch 2's first step leaves the run mid-epoch however loaded the machine
# v0.2's quickstart run on real digits files (an EMCA model, its coverage region and an SE excitation,
# whose se_ratio is named se_reduction today), small enough for a loaded 2-core machine.
RUN = ("+experiment=digits_quick", f"trainer.max_steps_per_epoch={STEPS}", "trainer.epochs=2", "trainer.log_every=1",
       "attention=emca_se", "coverage=prev_stage_all")


@pytest.fixture(scope="module")
def v02_tree(tmp_path_factory) -> Path:
    """eb4e51f's files in a temporary folder, or a skip where the clone lacks that commit."""
    destination = tmp_path_factory.mktemp("v0.2")
    found = subprocess.run(["git", "cat-file", "-e", f"{V02}^{{commit}}"], cwd=REPO_ROOT, capture_output=True)
    if found.returncode != 0:
        pytest.skip(f"the repository holds no history of v0.2 ({V02}): a shallow clone")
    archive = subprocess.run(["git", "archive", V02], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(destination, filter="data")
    return destination


def run(args, cwd: Path, env: dict, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    command = [sys.executable, *map(str, args)]
    if popen:  # a process of its own session, so that SIGTERM reaches it as a launcher sends it
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def train_v02_until_stopped(tree: Path, folder: Path, env: dict) -> str:
    """v0.2's train.py, stopped by SIGTERM once epoch 2 has logged its first step."""
    process = run(["train.py", *RUN, f"hydra.run.dir={folder}"], tree, env, popen=True)
    lines = []
    try:
        for line in iter(process.stdout.readline, ""):
            lines.append(line)
            if f"epoch 2/2 step 1/{STEPS}" in line:
                os.killpg(process.pid, signal.SIGTERM)
                break
        lines.append(process.communicate(timeout=300)[0])
    finally:
        process.kill()
    output = "".join(lines)
    assert process.returncode == 0 and "SIGTERM received: saved" in output, output[-3000:]
    return output


def test_a_v02_run_folder_resumes_evaluates_and_loads(v02_tree, tmp_path):
    tree = v02_tree
    folder = tmp_path / "run"
    # One intra-op thread per process: the machine is shared. The digits files are generated once, by v0.2.
    today = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    today.update(EMCA_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    old = {**today, "PYTHONPATH": str(tree)}
    which = run(["-c", "import emca; print(emca.__file__)"], tree, old)
    assert Path(which.stdout.strip()) == tree / "emca" / "__init__.py", which.stdout + which.stderr

    train_v02_until_stopped(tree, folder, old)
    checkpoints = folder / "checkpoints"
    progress = torch.load(checkpoints / "last.pt", map_location="cpu", weights_only=True)["progress"]
    assert progress["epoch"] == 1 and 1 <= progress["step_in_epoch"] < STEPS, progress
    stopped_at = f"epoch 1 completed, step {progress['step_in_epoch']} of the next"
    assert not (folder / "results.json").exists()
    model, _ = emca.load_model(checkpoints / "best.pt")  # v0.2's checkpoint, as v0.2 left it
    assert model.describe() == "resnet18 / attention emca_se / coverage stages=1 blocks=all / 10 classes"

    resumed = run(["train.py", f"hydra.run.dir={folder}", "trainer.resume=auto"], REPO_ROOT, today)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert f"resumed from {checkpoints / 'last.pt'}: {stopped_at}" in resumed.stdout + resumed.stderr
    results = json.loads((folder / "results.json").read_text())
    assert results["epoch_reached"] == 2 and [record["epoch"] for record in results["history"]] == [1, 2]
    assert results["history"][0] == progress["history"][0]  # epoch 1 as v0.2 measured it

    evaluated = run(["eval.py", f"checkpoint={checkpoints / 'best.pt'}", "accuracy_only=true"], REPO_ROOT, today)
    assert evaluated.returncode == 0, (evaluated.stdout + evaluated.stderr)[-3000:]
    report = json.loads((folder / "eval.json").read_text())
    assert report["accuracy_only"] is True and report["val"]["top1"] == results["best"]["val_top1"]

    model, transform = emca.load_model(checkpoints / "best.pt")
    assert model.describe() == "resnet18 / attention emca_se / coverage stages=1 blocks=all / 10 classes"
    assert model.pretrained_cfg["label_names"] == tuple(str(digit) for digit in range(10))
    image = next((tmp_path / "cache" / "digits" / "val" / "0").iterdir())
    with torch.no_grad():
        assert model(transform(image)[None]).shape == (1, 10)


# v0.2's presets: every dataset under every recipe, each other group's choices, every experiment.
PRESETS = [
    *([f"dataset={dataset}", f"recipe={recipe}"] for dataset in ("digits", "imagenet", "imagefolder", "tiny_imagenet")
      for recipe in ("paper", "tv_new", "rsb_a3")),
    *([choice] for choice in ("optimizer=sgd_cosine", "loader=torchvision", "loader=synthetic", "trainer=gpu",
                              "backbone=resnet50", "attention=se", "attention=emca_srm", "attention=bam",
                              "attention=gc", "attention=fca", "attention=epsa", "attention=none")),
    *([f"+experiment={name}"] for name in ("digits_quick", "table2", "table3", "table4", "table5")),
]
COMPOSE = """
import json, os, sys
import emca.config
assert emca.config.__file__.startswith(os.getcwd()), emca.config.__file__  # v0.2's package, not today's
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
    print(json.dumps([OmegaConf.to_container(compose("train", overrides=overrides), resolve=True, enum_to_str=True)
                      for overrides in json.loads(sys.argv[2])]))
"""


def test_v02_presets_compose_to_the_options_their_runs_recorded(v02_tree):
    """A continued run composes its recorded overrides with today's defaults and refuses any change
    outside RESUME_FREE: every v0.2 preset must compose today to the options v0.2 recorded for it."""
    presets = [[*overrides, "dataset.root=/data"] for overrides in PRESETS]
    composed = run(["-c", COMPOSE, v02_tree / "configs", json.dumps(presets)], v02_tree,
                   {**os.environ, "PYTHONPATH": str(v02_tree)})
    assert composed.returncode == 0, composed.stderr[-3000:]
    for overrides, recorded in zip(presets, json.loads(composed.stdout), strict=True):
        today = compose_train_config(*overrides)
        check_resume_config(recorded, today, Path("last.pt"), {"epoch": 1, "step_in_epoch": 1}, Path("run"))
