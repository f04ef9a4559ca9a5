"""hydra/launcher=slurm: the composed submission, and a real job on a fake one-machine SLURM
(tests/fake_slurm.py) that is warned with SIGUSR1, saves, is requeued and finishes the run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import emca.config  # noqa: F401  (registers the schema and resolvers)
from emca.engine.slurm import with_resume_auto

from conftest import REPO_ROOT

# hydra_plugins/ sits in the repository root, which `python train.py` has on sys.path (pytest may not).
sys.path.insert(0, str(REPO_ROOT))

# Two DDP processes on CPU, each "on its own node", 2 epochs of a few small synthetic steps.
JOB = ("backbone=resnet18", "attention=emca_eca", "dataset=digits", "loader=synthetic", "dataset.image_size=16",
       "dataset.batch_size=8", "loader.steps_per_epoch=6", "loader.val_steps=1", "trainer.epochs=2",
       "trainer.device=cpu", "trainer.log_every=3")
LAUNCHER = ("hydra/launcher=slurm", "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=1",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.partition=debug", "hydra.launcher.timeout_min=30",
            "hydra.launcher.signal_delay_s=60")


def compose_launcher(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True).hydra.launcher


def test_launcher_options_and_defaults():
    launcher_cfg = compose_launcher("hydra.launcher.nodes=4", "hydra.launcher.gpus_per_node=8",
                                    "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=1440")
    assert (launcher_cfg.nodes, launcher_cfg.gpus_per_node, launcher_cfg.tasks_per_node) == (4, 8, 8)
    assert (launcher_cfg.partition, launcher_cfg.timeout_min) == ("gpu", 1440)
    assert launcher_cfg.max_num_timeout > 0  # a timed-out job is requeued
    launcher = instantiate(launcher_cfg)
    assert type(launcher).__name__ == "EMCASlurmLauncher"
    assert launcher.params["additional_parameters"] == {
        "signal": f"USR1@{launcher_cfg.signal_delay_s}",
        "requeue": True,
    }
    # Extra sbatch flags are kept next to ours.
    launcher = instantiate(compose_launcher("+hydra.launcher.additional_parameters.mail-type=END"))
    assert launcher.params["additional_parameters"]["mail-type"] == "END"


def test_resume_auto_is_added_unless_set_and_forced_on_requeue():
    assert with_resume_auto(["a=1"], replace=False) == ["a=1", "trainer.resume=auto"]
    assert with_resume_auto(["trainer.resume=/x.pt"], replace=False) == ["trainer.resume=/x.pt"]
    assert with_resume_auto(["trainer.resume=/x.pt", "a=1"], replace=True) == ["a=1", "trainer.resume=auto"]
    assert with_resume_auto(["++trainer.resume=null"], replace=True) == ["trainer.resume=auto"]


def test_checkpoint_requeues_the_same_job_with_resume_auto():
    launcher = instantiate(compose_launcher())
    delayed = launcher.checkpoint(["attention=emca_se"], "hydra.sweep.dir", 0, "job_id_for_0", {})
    assert delayed.function is launcher
    assert delayed.args == (["attention=emca_se", "trainer.resume=auto"], "hydra.sweep.dir", 0, "job_id_for_0", {})


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """PATH with sbatch / srun / scontrol / sacct from tests/fake_slurm.py; returns its record folder."""
    bin_dir, record = tmp_path / "bin", tmp_path / "slurm"
    bin_dir.mkdir()
    record.mkdir()
    for command in ("sbatch", "srun", "scontrol", "sacct"):
        wrapper = bin_dir / command
        wrapper.write_text(
            f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).parent / "fake_slurm.py"}" {command} "$@"\n'
        )
        wrapper.chmod(0o755)
    with socket.socket() as probe:  # submitit takes MASTER_PORT from the environment when it is set
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(record))
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two tasks share this machine's cores
    return record


def wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(
                f"the submitting process ended (status {process.returncode}) before "
                f"{what}:\n{process.stdout.read()[-3000:]}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_slurm_job_is_warned_saves_requeues_and_finishes_the_run(fake_slurm, tmp_path):
    sweep = tmp_path / "sweep"
    # Submitted from outside the repository: the job must not need the repository root on sys.path.
    submit = subprocess.Popen(
        [sys.executable, REPO_ROOT / "train.py", "-m", *LAUNCHER, *JOB, f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    run = sweep / "0"
    try:
        # SLURM's time-limit warning reaches every task once epoch 1 is saved (the trainer acts on
        # it at its next step boundary: the end of epoch 1 or a step of epoch 2).
        wait_for(lambda: (run / "checkpoints" / "last.pt").exists(), "epoch 1 was saved", submit)
        for pid in (fake_slurm / "pids.1").read_text().split():
            os.kill(int(pid), signal.SIGUSR1)
        output = submit.communicate(timeout=240)[0]
    finally:
        submit.kill()
    assert submit.returncode == 0, output[-3000:]

    script = (fake_slurm / "sbatch.sh").read_text()
    for line in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1", "--partition=debug",
                 "--time=30", "--signal=USR1@60", "--requeue"):
        assert f"#SBATCH {line}\n" in script, line
    # Rank 0 saved mid-run, submitit requeued the job with trainer.resume=auto, the rerun finished it.
    assert (fake_slurm / "requeued").read_text().split() == ["4242"]
    assert (fake_slurm / "runs").read_text() == "2"
    log = (run / "train.log").read_text()
    assert "SIGUSR1 received: saved" in log and "resumed from" in log, log[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["epoch_reached"] == 2 and results["world_size"] == 2
    assert results["config"]["trainer"]["resume"] == "auto"
    submitted = next((sweep / ".submitit").glob("*/*_submitted.pkl"))
    assert "trainer.resume=auto" in submitit.helpers.DelayedSubmission.load(submitted).args[0]
