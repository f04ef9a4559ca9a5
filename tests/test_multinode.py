"""Two nodes simulated on localhost: two torchrun launches (--nnodes=2, --node_rank 0 and 1) meeting
through the c10d rendezvous, gloo on CPU. They must end with one run folder and exactly what a
two-process single-node run gives: the same metrics, and with trainer.deterministic=true the same
weights to the last bit."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT

# Real digits images, so that each rank trains on its own shard: a rank mix-up would show.
RUN = ("backbone=resnet18", "attention=emca_eca", "dataset=digits", "loader=torchvision", "dataset.image_size=16",
       "dataset.val_resize=16", "dataset.batch_size=32", "dataset.workers=0", "trainer.epochs=2",
       "trainer.max_steps_per_epoch=3", "trainer.device=cpu", "trainer.deterministic=true", "trainer.log_every=1")
# What a run's results.json must repeat; the rest is timing, paths and versions.
SAME_RESULTS = ("history", "final", "best", "epoch_reached", "world_size", "params", "gflops", "val_top1_per_epoch")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(*args: str, cwd: Path) -> subprocess.Popen:
    # One thread per process in every launch: oneDNN's reductions depend on the thread count.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(cwd / "tmp")}
    (cwd / "tmp").mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args, str(REPO_ROOT / "train.py"), *RUN],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> str:
    try:
        output = process.communicate(timeout=400)[0]
    finally:
        process.kill()
    assert process.returncode == 0, output[-3000:]
    return output


def only_run_folder(cwd: Path) -> Path:
    runs = list((cwd / "outputs").glob("*/*"))
    assert len(runs) == 1, runs
    assert list((cwd / "tmp").glob("emca-rank*")) == []  # the other rank's scratch Hydra folder is gone
    return runs[0]


@pytest.mark.slow
def test_two_nodes_with_c10d_rendezvous_match_one_node_with_two_processes(tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [torchrun("--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}", "--rdzv_backend=c10d",
                      f"--rdzv_endpoint={endpoint}", "--rdzv_id=emca-multinode-test", cwd=tmp_path / "two_nodes")
             for rank in (0, 1)]
    single = torchrun(
        "--nnodes=1",
        "--nproc_per_node=2",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{free_port()}",
        cwd=tmp_path / "one_node",
    )
    for process in (*nodes, single):
        finish(process)

    two_nodes, one_node = only_run_folder(tmp_path / "two_nodes"), only_run_folder(tmp_path / "one_node")
    results = [json.loads((run / "results.json").read_text()) for run in (two_nodes, one_node)]
    assert results[0]["world_size"] == 2
    for key in SAME_RESULTS:
        assert results[0][key] == results[1][key], key

    checkpoints = [torch.load(run / "checkpoints" / "last.pt", weights_only=True) for run in (two_nodes, one_node)]
    assert checkpoints[0]["model"].keys() == checkpoints[1]["model"].keys()
    for name, tensor in checkpoints[0]["model"].items():
        assert torch.equal(tensor, checkpoints[1]["model"][name]), name
    momenta = [[state["momentum_buffer"] for state in c["optimizer"]["state"].values()] for c in checkpoints]
    assert all(torch.equal(a, b) for a, b in zip(*momenta, strict=True))
