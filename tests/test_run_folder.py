"""A run folder is written only by the run that owns it: the lock, refusals that leave the folder
byte for byte, a completed run left alone, runs started from another run's checkpoint, unwritable
folders and failed saves."""

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from emca.engine.trainer import RunAborted, train

from conftest import REPO_ROOT, SYNTHETIC_RUN

ONE_EPOCH = (*SYNTHETIC_RUN, "trainer.epochs=1", "trainer.max_steps_per_epoch=1")


def snapshot(folder) -> dict:
    """Every entry below `folder` (itself included): kind, size, modification time, content digest."""
    entries = {}
    for path in [folder, *sorted(folder.rglob("*"))]:
        stat = os.lstat(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not path.is_symlink() else None
        target = os.readlink(path) if path.is_symlink() else None
        entries[str(path.relative_to(folder))] = (stat.st_mode, stat.st_size, stat.st_mtime_ns, digest, target)
    return entries


def run_train(*overrides, run_dir, prefix=(), timeout=300):
    return subprocess.run([*prefix, sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def error_lines(done) -> list[str]:
    return [line for line in (done.stdout + done.stderr).splitlines() if "ERROR" in line]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A completed one-epoch run made by train.py (so with Hydra's records), and a second one."""
    runs = tmp_path_factory.mktemp("runs")
    for name in ("run", "other"):
        done = run_train(*ONE_EPOCH, run_dir=runs / name)
        assert done.returncode == 0, done.stderr[-2000:]
    return runs / "run", runs / "other"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ((), "already holds a run .*pass trainer.resume=auto"),  # a fresh start over a run
        (("trainer.resume={other}/checkpoints/last.pt",), "holds another run .* choose a new hydra.run.dir"),
        (
            ("attention=se", "trainer.resume=auto", "trainer.epochs=2"),
            "refusing checkpoint .* it holds resnet18 / attention emca_eca",
        ),
        (("trainer.resume=auto", "trainer.epochs=2", "optimizer.warmup_epochs=3"), "warmup_epochs"),
    ],
)
def test_a_refused_command_leaves_the_folder_byte_for_byte(finished_run, overrides, message):
    run, other = finished_run
    before = snapshot(run)
    done = run_train(*ONE_EPOCH, *(o.format(other=other) for o in overrides), run_dir=run)
    assert done.returncode == 1, done.stdout[-2000:]
    assert "Traceback" not in done.stderr
    errors = error_lines(done)
    assert len(errors) == 1
    assert re.search(message, errors[0]), errors[0]
    assert snapshot(run) == before


def test_resuming_a_completed_run_says_so_and_changes_nothing(finished_run):
    run, _ = finished_run
    before = snapshot(run)
    done = run_train(*ONE_EPOCH, "trainer.resume=auto", run_dir=run)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "has already completed 1 epochs" in done.stdout and "nothing to do" in done.stdout
    assert snapshot(run) == before


def test_a_refused_start_in_a_new_folder_leaves_no_folder(tmp_path):
    done = run_train(*ONE_EPOCH, "trainer.resume=/nowhere/last.pt", run_dir=tmp_path / "new")
    assert done.returncode == 1 and len(error_lines(done)) == 1
    assert not (tmp_path / "new").exists()


def test_a_folder_in_use_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    long_epoch = (*SYNTHETIC_RUN, "dataset.batch_size=8", "trainer.epochs=1", "loader.steps_per_epoch=400",
                  "trainer.max_steps_per_epoch=null", "trainer.log_every=1")
    first = subprocess.Popen([sys.executable, "train.py", *long_epoch, f"hydra.run.dir={run}"], cwd=REPO_ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        next(line for line in iter(first.stdout.readline, "") if "epoch 1/1 step 1/400" in line)
        before = snapshot(run)
        second = run_train(*long_epoch, "trainer.resume=auto", run_dir=run)
        errors = error_lines(second)
        assert second.returncode == 1 and len(errors) == 1 and f"is in use by pid {first.pid} on " in errors[0]
        # The first run goes on writing its log and events; the second one added and rewrote nothing.
        after = snapshot(run)
        assert after.keys() == before.keys() and after[".hydra/config.yaml"] == before[".hydra/config.yaml"]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    # The killed run saved nothing: its folder is continued from scratch, its stale lock taken over.
    third = run_train(*ONE_EPOCH, "trainer.resume=auto", run_dir=run)
    assert third.returncode == 0, third.stdout[-2000:]
    assert json.loads((run / "results.json").read_text())["epoch_reached"] == 1
    assert (run / ".lock").read_text().startswith("pid ")


def test_an_unwritable_run_folder_is_one_line_before_any_work(tmp_path, unprivileged):
    run = tmp_path / "locked"
    run.mkdir()
    run.chmod(0o555)
    done = run_train(*ONE_EPOCH, run_dir=run, prefix=unprivileged)
    assert done.returncode == 1, done.stdout[-2000:]
    assert "Traceback" not in done.stderr
    errors = error_lines(done)
    assert len(errors) == 1 and "cannot write the run folder" in errors[0] and "Permission denied" in errors[0]
    assert list(run.iterdir()) == []


def test_a_run_may_start_from_another_runs_checkpoint_in_a_new_folder(compose_train, tmp_path):
    first = tmp_path / "first"
    results = train(compose_train(*ONE_EPOCH), str(first))
    resumed = train(compose_train(*ONE_EPOCH, "trainer.epochs=2", f"trainer.resume={first}/checkpoints/last.pt"),
                    str(tmp_path / "second"))
    assert resumed["epoch_reached"] == 2 and resumed["run_id"] != results["run_id"]
    # Continued in its own folder, a run keeps its identity.
    again = train(compose_train(*ONE_EPOCH, "trainer.epochs=3", "trainer.resume=auto"), str(tmp_path / "second"))
    assert again["run_id"] == resumed["run_id"] and again["epoch_reached"] == 3


def test_a_failed_save_is_one_line_and_keeps_the_previous_checkpoint(compose_train, tmp_path, monkeypatch):
    train(compose_train(*ONE_EPOCH), str(tmp_path))
    kept = (tmp_path / "checkpoints" / "last.pt").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(RunAborted) as error:
        train(compose_train(*ONE_EPOCH, "trainer.epochs=2", "trainer.resume=auto"), str(tmp_path))
    message = str(error.value)
    assert "\n" not in message and "No space left on device" in message and "last.pt is kept" in message
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == kept


def test_a_folder_with_checkpoints_but_no_last_pt_is_never_restarted_silently(compose_train, tmp_path):
    """The `checkpoints` link removed (or pointing to a removed generation): trainer.resume=auto stops
    in one line with the way on, which works when followed as written."""
    run = tmp_path / "run"
    done = run_train(*ONE_EPOCH, run_dir=run)
    assert done.returncode == 0, done.stderr[-2000:]
    (run / "checkpoints").unlink()
    before = snapshot(run)
    done = run_train(*ONE_EPOCH, "trainer.epochs=2", "trainer.resume=auto", run_dir=run)
    assert done.returncode == 1 and snapshot(run) == before
    [error] = error_lines(done)
    assert f"run folder {run} has checkpoints but no {run}/checkpoints/last.pt (it is missing); continue from the " \
           f"newest one left, {run}/.checkpoints/" in error
    assert error.endswith("or start a new run in another hydra.run.dir")
    repair = error.split(": ln ", 1)[1].split(", then rerun", 1)[0]
    subprocess.run(f"ln {repair}", shell=True, check=True)
    done = run_train(*ONE_EPOCH, "trainer.epochs=2", "trainer.resume=auto", run_dir=run)
    assert done.returncode == 0, done.stdout[-2000:]
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["progress"]["epoch"] == 2

    for generation in (run / ".checkpoints").iterdir():  # the link now dangles, no generation is left
        subprocess.run(["rm", "-r", str(generation)], check=True)
    done = run_train(*ONE_EPOCH, "trainer.epochs=3", "trainer.resume=auto", run_dir=run)
    assert done.returncode == 1
    [error] = error_lines(done)
    assert f"no {run}/checkpoints/last.pt (it points to a missing folder); no checkpoint is left under " in error
