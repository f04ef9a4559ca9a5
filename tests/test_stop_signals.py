"""Every way a run is stopped saves it: SIGTERM, SIGUSR1 and SIGINT, sent to the process or to its
whole process group (as torchrun and SLURM do), with either file loader and DataLoader workers;
under torchrun too; and a stopped rank becomes a clean failure of the others (trainer.dist_timeout_s)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from emca.engine.trainer import train

from conftest import QUICK_RUN, REPO_ROOT
from test_ddp import torchrun_args

# Digits files through a real loader, 45 steps in one epoch: the signal, sent after step 2, surely lands
# mid-epoch, and a resumed run has half as many steps left to train as at batch 16.
LONG_EPOCH = (*QUICK_RUN, "dataset.batch_size=32", "trainer.epochs=1", "trainer.max_steps_per_epoch=null",
              "trainer.log_every=1")


def start(args, cwd=REPO_ROOT):
    """A training process in a session of its own (so that it can be signalled as a group)."""
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(process, text: str) -> list[str]:
    lines = []
    for line in iter(process.stdout.readline, ""):
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"the run ended before printing {text!r}:\n{''.join(lines)[-3000:]}")


def last_progress(run_dir) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["progress"]


@pytest.mark.parametrize("loader, workers, signum, target, resume", [
    ("torchvision", 2, signal.SIGTERM, "group", True),
    ("torchvision", 2, signal.SIGINT, "group", False),  # Ctrl-C in a terminal
    ("torchvision", 0, signal.SIGUSR1, "process", False),
    ("dali", 2, signal.SIGTERM, "group", False),
])
def test_a_stop_signal_saves_and_exits_cleanly(compose_train, tmp_path, loader, workers, signum, target, resume):
    overrides = (*LONG_EPOCH, f"loader={loader}", f"dataset.workers={workers}")
    process = start(["train.py", *overrides, f"hydra.run.dir={tmp_path}"])
    try:
        wait_for(process, "epoch 1/1 step 2/")
        (os.killpg if target == "group" else os.kill)(process.pid, signum)
        output = process.communicate(timeout=120)[0]
    finally:
        process.kill()
    name = signal.Signals(signum).name
    assert process.returncode == (130 if signum == signal.SIGINT else 0), output[-3000:]
    assert "Traceback" not in output
    assert [line for line in output.splitlines() if "received: saved" in line] == [
        next(line for line in output.splitlines() if f"{name} received: saved" in line)]
    progress = last_progress(tmp_path)
    assert progress["epoch"] == 0 and progress["step_in_epoch"] >= 2
    assert not (tmp_path / "results.json").exists()
    if resume:  # re-attaching to the run folder continues it to the end (exactness: tests/test_train.py)
        results = train(compose_train(*overrides, "dataset.workers=0", "trainer.resume=auto"), str(tmp_path))
        assert results["epoch_reached"] == 1


def launch_args(*args) -> list[str]:
    """torchrun's arguments (a free port, two ranks) for `python -m emca.launch`, torchrun with a clean stop."""
    return ["-m", "emca.launch", *torchrun_args(*args)[2:]]


# Plain torchrun (`torchrun_args`) forwards the signal and waits for its ranks just the same, but then raises
# its own SignalException: a traceback and status 1 after the ranks' clean stop (README, "Nothing lost").
@pytest.mark.parametrize("signum, target, resume", [
    (signal.SIGINT, "group", False),  # Ctrl-C in a terminal
    (signal.SIGTERM, "group", True),  # torchrun's own launcher, Kubernetes, SLURM at the time limit
    (signal.SIGUSR1, "process", False),  # SLURM's warning, which torchrun does not forward by default
])
def test_torchrun_ranks_save_and_the_launcher_exits_cleanly(compose_train, tmp_path, signum, target, resume):
    overrides = (*LONG_EPOCH, "dataset.workers=1")
    process = start(launch_args(REPO_ROOT / "train.py", *overrides, f"hydra.run.dir={tmp_path}"))
    try:
        wait_for(process, "epoch 1/1 step 2/")
        (os.killpg if target == "group" else os.kill)(process.pid, signum)
        output = process.communicate(timeout=120)[0]
    finally:
        process.kill()
    name, status = signal.Signals(signum).name, 130 if signum == signal.SIGINT else 0
    assert process.returncode == status, output[-3000:]
    assert "Traceback" not in output and "closing signal" not in output, output[-3000:]
    assert [line for line in output.splitlines() if "emca.launch" in line] == [
        f"emca.launch: {name} forwarded to this node's 2 ranks, which stopped cleanly (exit status {status}, "
        f"{status}); their log above says what was saved, how to continue"]
    assert output.count(f"{name} received: saved") == 1  # rank 0 logs for both
    progress = last_progress(tmp_path)
    assert progress["epoch"] == 0 and progress["step_in_epoch"] >= 2
    if resume:  # the folder continues to the end as a single process (exactness: tests/test_train.py)
        results = train(compose_train(*overrides, "dataset.workers=0", "trainer.resume=auto"), str(tmp_path))
        assert results["epoch_reached"] == 1


def rank_pid(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker process with RANK=rank."""
    for child in open(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read().split():
        environ = open(f"/proc/{child}/environ", "rb").read().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"no worker with RANK={rank}")


def test_a_stopped_rank_fails_the_others_after_the_timeout(tmp_path):
    process = start(
        torchrun_args(REPO_ROOT / "train.py", *LONG_EPOCH, "trainer.dist_timeout_s=5", f"hydra.run.dir={tmp_path}")
    )
    stopped = None
    try:
        wait_for(process, "epoch 1/1 step 2/")
        stopped = rank_pid(process.pid, 1)
        os.kill(stopped, signal.SIGSTOP)
        began = time.monotonic()
        lines = wait_for(process, "a collective failed")
        waited = time.monotonic() - began
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGKILL)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    error = lines[-1]
    assert "ERROR" in error and "rank 0: a collective failed" in error and "trainer.dist_timeout_s=5" in error
    assert error.rstrip().endswith(" trainer.resume=auto") and "continue with hydra.run.dir=" in error
    assert waited < 120  # a hang guard, not a timing claim: PyTorch's default would wait 30 minutes


def test_a_stop_signal_before_training_starts_stops_at_once(compose_train, tmp_path, monkeypatch):
    from emca.engine.trainer import Preempted, Trainer

    build = Trainer._build

    def build_then_signal(self, cfg, ctx):
        signal.raise_signal(signal.SIGINT)  # e.g. while a large dataset is being listed
        build(self, cfg, ctx)  # never reached

    monkeypatch.setattr(Trainer, "_build", build_then_signal)
    with pytest.raises(Preempted) as stopped:
        train(compose_train(*QUICK_RUN), str(tmp_path / "run"))
    assert stopped.value.exit_status == 130
    assert not (tmp_path / "run").exists()  # nothing was trained, so nothing was written


@pytest.mark.parametrize("message", ["[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1",
                                     "Application timeout caused pair closure",
                                     "[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1000ms for recv"])
def test_gloos_timeout_and_lost_rank_messages_are_collective_failures(message):
    from emca.engine.distributed import is_collective_failure

    assert is_collective_failure(RuntimeError(message))
    assert not is_collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
