"""Real faults, not mocks: a locked or read-only tracker store, W&B online without a login, a full
disk, a process limit, an impossible image size, a second pack_shards.py writer. Training outlives
its observers, limits are named in one line, and nothing already saved is damaged.

Mounts (a read-only bind mount, a small tmpfs) and a pids cgroup need root; those tests skip elsewhere.
"""

import contextlib
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import emca.config  # noqa: F401  (registers the resolvers the saved config uses)
from emca.engine.trainer import Preempted, RunAborted, train

from conftest import QUICK_RUN, REPO_ROOT, SYNTHETIC_RUN, preempt_after_step

RUN = (*SYNTHETIC_RUN, "trainer.log_every=2")


# --- real faults -------------------------------------------------------------------------------

@contextlib.contextmanager
def locked_sqlite(database: Path):
    """Another process holds an exclusive transaction on `database` (created if missing) until the block ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys\n"
         f"db = sqlite3.connect({str(database)!r}, isolation_level=None)\n"
         "db.execute('BEGIN EXCLUSIVE')\nprint('locked', flush=True)\nsys.stdin.read()\ndb.execute('COMMIT')\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount here (mount {' '.join(args)}: {done.stderr.strip()})")


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` as a read-only bind mount of itself: read-only for root too (chmod is not)."""
    _mount("--bind", str(folder), str(folder))
    try:
        _mount("-o", "remount,bind,ro", str(folder), str(folder))
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@contextlib.contextmanager
def small_disk(folder: Path, size: str):
    """A tmpfs of `size` at `folder` (mount -o remount,size=... grows it)."""
    folder.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder))
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(folder: Path, leave_bytes: int) -> Path:
    """A file taking all but `leave_bytes` of the free space of folder's filesystem."""
    stats = os.statvfs(folder)
    filler = folder / "filler"
    with open(filler, "wb") as file:
        file.truncate(0)
        file.write(b"\0" * max(0, stats.f_bavail * stats.f_frsize - leave_bytes))
    return filler


@contextlib.contextmanager
def process_limit(tasks: int):
    """A pids cgroup allowing `tasks` processes and threads; yields the cgroup.procs file to join."""
    for base in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")):
        group = base / f"emca-test-{uuid.uuid4().hex[:8]}"
        try:
            group.mkdir()
        except OSError:
            continue
        try:
            (group / "pids.max").write_text(str(tasks))
        except OSError:
            group.rmdir()
            continue
        try:
            yield group / "cgroup.procs"
        finally:
            with contextlib.suppress(OSError):
                group.rmdir()
        return
    pytest.skip("no pids cgroup can be created here (needs root and a writable cgroup filesystem)")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def progress_of(run_dir: Path) -> tuple[int, int]:
    progress = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["progress"]
    return progress["epoch"], progress["step_in_epoch"]


def tracker_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("emca.engine.trackers")
            and r.levelno >= logging.WARNING]


# --- trackers ----------------------------------------------------------------------------------

def test_a_locked_mlflow_store_costs_one_line_not_the_run_and_a_resume_sends_what_it_missed(
        compose_train, tmp_path, monkeypatch, caplog, capfd):
    store = tmp_path / "mlflow.db"
    options = (*RUN, "logger=mlflow", f"logger.mlflow.tracking_uri=sqlite:///{store}")
    run_dir = tmp_path / "run"
    caplog.set_level(logging.INFO)
    with locked_sqlite(store):
        # Pre-empted in epoch 2: the MLflow store is locked the whole time (SQLite waits 20 s, then fails).
        preempt_after_step(monkeypatch, 4)
        started = time.monotonic()
        with pytest.raises(Preempted):
            train(compose_train(*options, "logger.timeout_s=2"), str(run_dir))
        monkeypatch.undo()
        assert time.monotonic() - started < 60
        warnings = tracker_warnings(caplog)
        assert len(warnings) == 1 and warnings[0].startswith("MLflow: ") and "disabled for the rest of this run" \
            in warnings[0], warnings
        assert progress_of(run_dir) == (1, 1)  # the checkpoint did not wait for, nor lose to, the tracker
    # The call that was blocked returns once the lock is gone; wait for it before MLflow is used again.
    for thread in threading.enumerate():
        if thread.name == "tracker MLflow":
            thread.join(timeout=120)
    assert "Traceback" not in capfd.readouterr().err
    caplog.clear()
    train(compose_train(*options, "trainer.resume=auto"), str(run_dir))
    assert tracker_warnings(caplog) == []
    client = MlflowClient(f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("emca-train").experiment_id])
    assert run.info.status == "FINISHED"
    events = EventAccumulator(str(run_dir))
    events.Reload()
    for tag in ("top1/val", "loss/train"):  # epoch 1 re-sent once, epoch 2 logged as it completed
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag)] == [
            (event.step, pytest.approx(event.value)) for event in events.Scalars(tag)], tag


def test_trackers_turned_on_at_a_resume_get_the_epochs_trained_without_them(compose_train, tmp_path, monkeypatch):
    store, run_dir = tmp_path / "mlflow.db", tmp_path / "run"
    preempt_after_step(monkeypatch, 4)
    with pytest.raises(Preempted):  # epoch 1 trained with no tracker at all
        train(compose_train(*RUN, "logger.tensorboard=false"), str(run_dir))
    monkeypatch.undo()
    assert not list(run_dir.glob("events.out.tfevents.*"))
    train(compose_train(*RUN, "trainer.resume=auto", "logger=mlflow", f"logger.mlflow.tracking_uri=sqlite:///{store}"),
          str(run_dir))
    history = json.loads((run_dir / "results.json").read_text())["history"]
    events = EventAccumulator(str(run_dir))
    events.Reload()
    client = MlflowClient(f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("emca-train").experiment_id])
    for tag, key in (("top1/val", "val_top1"), ("loss/train", "train_loss")):
        expected = [(record["epoch"], pytest.approx(record[key])) for record in history]
        assert [(event.step, event.value) for event in events.Scalars(tag)] == expected, tag
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag)] == expected, tag


def test_a_read_only_mlflow_store_is_refused_before_anything_is_written_and_the_advice_works(
        compose_train, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "mlflow.db").write_bytes(b"")
    run_dir = tmp_path / "run"
    options = (*RUN, "logger=mlflow", f"logger.mlflow.tracking_uri=sqlite:///{store / 'mlflow.db'}")
    with read_only(store):
        with pytest.raises(RunAborted) as refused:
            train(compose_train(*options), str(run_dir))
        message = str(refused.value)
        assert "\n" not in message
        assert "cannot be opened for writing (Read-only file system" in message
        assert "logger.mlflow.enabled=false" in message
        assert not run_dir.exists()
        train(compose_train(*options, "logger.mlflow.enabled=false"), str(run_dir))  # as the line advises
    assert json.loads((run_dir / "results.json").read_text())["status"] == "completed"


def test_wandb_online_without_a_login_is_refused_before_anything_is_written(compose_train, tmp_path, monkeypatch):
    for variable in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    run_dir = tmp_path / "run"
    with pytest.raises(RunAborted, match=r"^logger\.wandb\.mode=online needs a W&B login .* "
                                         r"logger\.wandb\.mode=offline") as refused:
        train(compose_train(*RUN, "logger=wandb", "logger.wandb.mode=online"), str(run_dir))
    assert "\n" not in str(refused.value)
    assert not run_dir.exists()


# --- disks, memory, processes ------------------------------------------------------------------

def test_a_full_disk_is_one_line_the_last_checkpoint_survives_and_the_run_continues(
        compose_train, tmp_path, monkeypatch, caplog, capfd):
    disk = tmp_path / "disk"
    with small_disk(disk, "1g"):
        run_dir = disk / "run"
        preempt_after_step(monkeypatch, 4)
        with pytest.raises(Preempted):
            train(compose_train(*RUN), str(run_dir))
        monkeypatch.undo()
        kept = digest(run_dir / "checkpoints" / "last.pt")
        filler = fill(disk, leave_bytes=0)  # train.log and the event file fail too, as their pages fill
        caplog.set_level(logging.INFO)
        with pytest.raises(RunAborted) as full:
            train(compose_train(*RUN, "trainer.resume=auto"), str(run_dir))
        message = str(full.value)
        assert "No space left on device" in message and "enforce fail" not in message and "\n" not in message
        assert f"continue with hydra.run.dir={run_dir} trainer.resume=auto" in message
        assert digest(run_dir / "checkpoints" / "last.pt") == kept and progress_of(run_dir) == (1, 1)
        err = capfd.readouterr().err
        assert "Traceback" not in err and "Logging error" not in err
        assert err.count("train.log can no longer be written (No space left on device)") <= 1
        filler.unlink()
        train(compose_train(*RUN, "trainer.resume=auto"), str(run_dir))  # as the line advises
        assert progress_of(run_dir) == (2, 0)


def test_train_py_on_a_full_disk_is_one_line_and_the_advice_works(tmp_path):
    disk, env = tmp_path / "disk", {**os.environ}
    with small_disk(disk, "1g"):
        run_dir = disk / "run"

        def train_py(*options: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "train.py", *RUN, f"hydra.run.dir={run_dir}", *options],
                                  cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)

        assert train_py("trainer.epochs=1").returncode == 0
        kept = digest(run_dir / "checkpoints" / "last.pt")
        filler = fill(disk, leave_bytes=0)
        failed = train_py("trainer.epochs=2", "trainer.resume=auto")
        assert failed.returncode == 1
        (line,) = [line for line in (failed.stdout + failed.stderr).splitlines() if "[ERROR]" in line]
        assert "(No space left on device)" in line
        assert line.endswith(f"free space there, then run with hydra.run.dir={run_dir} trainer.resume=auto")
        assert "Traceback" not in failed.stderr and "Logging error" not in failed.stderr
        assert digest(run_dir / "checkpoints" / "last.pt") == kept
        filler.unlink()
        assert train_py("trainer.epochs=2", "trainer.resume=auto").returncode == 0  # as the line advises
        assert progress_of(run_dir) == (2, 0)


def test_a_read_only_run_folder_is_one_line_before_anything_and_the_advice_continues_the_run(
        compose_train, tmp_path, monkeypatch):
    disk = tmp_path / "disk"
    disk.mkdir()
    run_dir = disk / "run"
    preempt_after_step(monkeypatch, 4)
    with pytest.raises(Preempted):
        train(compose_train(*RUN), str(run_dir))
    monkeypatch.undo()
    before = {path: digest(path) for path in run_dir.rglob("*") if path.is_file()}
    with read_only(disk):
        with pytest.raises(RunAborted) as refused:
            train(compose_train(*RUN, "trainer.resume=auto"), str(run_dir))
    message = str(refused.value)
    assert message.startswith(f"cannot write the run folder {run_dir} (Read-only file system); make it writable, or "
                              f"copy it (cp -a {run_dir} NEW) and continue there with hydra.run.dir=NEW "
                              "trainer.resume=auto")
    assert {path: digest(path) for path in run_dir.rglob("*") if path.is_file()} == before
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(run_dir), str(copy)], check=True)  # as the line advises
    results = train(compose_train(*RUN, "trainer.resume=auto"), str(copy))
    assert results["epoch_reached"] == 2
    assert results["run_id"] == torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["run_id"]


def test_a_first_checkpoint_that_does_not_fit_is_one_line(compose_train, tmp_path):
    with small_disk(tmp_path / "disk", "2m") as disk:
        with pytest.raises(RunAborted) as full:
            train(compose_train(*RUN), str(disk / "run"))
    message = str(full.value)
    assert "No space left on device" in message and "no earlier checkpoint exists" in message
    assert "enforce fail" not in message and "inline_container" not in message


def test_an_impossible_image_size_names_memory_and_the_setting(compose_train, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(RunAborted) as refused:
        train(compose_train(*RUN, "dataset.image_size=100000", "dataset.val_resize=100000"), str(run_dir))
    message = str(refused.value)
    assert message.startswith("out of memory on cpu with dataset.image_size=100000, dataset.batch_size=32")
    assert "enforce fail" not in message and "nothing was written" in message
    assert not run_dir.exists()


def test_more_loader_workers_than_the_process_limit_is_one_line_and_the_advice_works(tmp_path):
    run_dir = tmp_path / "run"

    def train_py(*options: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "train.py", *QUICK_RUN, f"hydra.run.dir={run_dir}", *options]
        return subprocess.run(["sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh", *command], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=300)

    with process_limit(24) as procs:
        failed = train_py("dataset.workers=64")
        assert failed.returncode == 1
        (line,) = [line for line in (failed.stdout + failed.stderr).splitlines() if "[ERROR]" in line]
        assert "process limit" in line and "dataset.workers=64" in line
        assert "Traceback" not in failed.stderr
        assert f"start again with hydra.run.dir={run_dir} trainer.resume=auto" in line
        done = train_py("dataset.workers=0", "trainer.resume=auto")  # as the line advises
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run_dir / "results.json").read_text())["status"] == "completed"


def test_a_full_dev_shm_is_one_line_without_a_traceback_at_exit(tmp_path):
    """Loader workers hand batches over in /dev/shm: a small one (a container's default 64 MB) fills up."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("cannot make a mount namespace here (unshare -m needs root)")
    run_dir = tmp_path / "run"
    command = [sys.executable, "train.py", *QUICK_RUN, f"hydra.run.dir={run_dir}", "dataset.workers=2"]
    failed = subprocess.run(["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs /dev/shm && exec "$@"',
                             "sh", *command], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1
    (line,) = [line for line in (failed.stdout + failed.stderr).splitlines() if "[ERROR]" in line]
    assert "shared memory (/dev/shm) is full with dataset.workers=2" in line
    assert "Traceback" not in failed.stderr and "Exception ignored" not in failed.stderr


def test_the_open_file_limit_is_one_line_naming_workers(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "train.py", *QUICK_RUN, f"hydra.run.dir={run_dir}", "dataset.workers=8"]
    # 40 descriptors start the trainer; eight workers' pipes need more.
    failed = subprocess.run(["sh", "-c", 'ulimit -n 40 && exec "$@"', "sh", *command], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1
    (line,) = [line for line in (failed.stdout + failed.stderr).splitlines() if "[ERROR]" in line]
    assert "the open-file limit (ulimit -n) is reached with dataset.workers=8" in line
    assert "Traceback" not in failed.stderr


# --- pack_shards.py owns its output ------------------------------------------------------------

def test_a_second_pack_shards_writer_is_refused_and_a_killed_one_is_taken_over(
        shared_data, emca_cache, tmp_path, run_script):
    source, out = tmp_path / "source", tmp_path / "out"
    subset = shared_data / "tinyimagenet-subset"
    for split, count in (("train", 60), ("val", 6)):
        for name in sorted(os.listdir(subset / "train"))[:10]:
            (source / split / name).mkdir(parents=True)
            for file in sorted(os.listdir(subset / split / name))[:count]:
                (source / split / name / file).symlink_to(subset / split / name / file)
    args = ("scripts/pack_shards.py", source, out, "--shard-size", "50", "--workers", "1")
    env = {"EMCA_CACHE": str(emca_cache)}
    first = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO_ROOT, env={**os.environ, **env},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = out / ".pack-lock"
    try:
        # Frozen (SIGSTOP) as soon as it has taken OUT (screening 660 images comes first): a writer in flight.
        while f"pid {first.pid} " not in (lock.read_text() if lock.exists() else ""):
            assert first.poll() is None, "the first packing ended before it could be caught"
            time.sleep(0.002)
        first.send_signal(signal.SIGSTOP)
        second = run_script(*args, env=env)
        assert second.returncode == 1
        assert second.stderr.strip().splitlines() == [
            f"pack_shards: error: {out} is being packed by pid {first.pid} on {os.uname().nodename}; wait for that "
            "packing to end (or stop it, then rerun this command: it keeps the shards already complete)"]
        assert not (out / "info.json").exists()
    finally:
        first.send_signal(signal.SIGKILL)  # kill -9: its lock goes with it, its file stays
        first.wait()
    assert lock.exists()
    third = run_script(*args, env=env)
    assert third.returncode == 0, third.stderr
    assert f"use dataset.format=shards dataset.root={out}" in third.stdout
    info = json.loads((out / "info.json").read_text())
    assert info["splits"]["train"]["samples"] == 600 and info["splits"]["val"]["samples"] == 60
    assert not lock.exists()  # a finished packing leaves only its output
