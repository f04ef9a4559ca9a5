"""DDP through torchrun on this CPU (gloo): one run folder, identical weights on every rank, every
validation image counted exactly once.

Run as a script (`torchrun --nproc_per_node=2 tests/test_ddp.py OUT`), this file is the worker of
test_ranks_hold_identical_weights_and_count_validation_once.
"""

import json
import socket
import sys
from pathlib import Path

import pytest
import torch

from conftest import QUICK_RUN, REPO_ROOT, compose_train_config

DIGITS_VAL_IMAGES = 360


def torchrun_args(*args) -> list[str]:
    with socket.socket() as probe:  # a free port: other torchrun jobs may hold the default 29500
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", *map(str, args)]


def test_torchrun_train_py_makes_one_run_folder(run_script, tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    done = run_script(*torchrun_args(REPO_ROOT / "train.py", *QUICK_RUN, "trainer.epochs=1"),
                      cwd=tmp_path, env={"TMPDIR": str(scratch)})
    assert done.returncode == 0, done.stderr[-3000:]
    runs = list((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 1, runs
    run = runs[0]
    for name in (".hydra/config.yaml", "train.log", "results.json", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    assert json.loads((run / "results.json").read_text())["world_size"] == 2
    # Rank 1's own Hydra job folder was a scratch folder, removed once rank 0's was known.
    assert list(scratch.glob("emca-rank*")) == []
    # Only rank 0 logs.
    assert (run / "train.log").read_text().count("run folder") == 1
    # Every gradient (ECA's kernel included) arrives in its DDP bucket's layout: no copy, no warning.
    assert "Grad strides do not match bucket view strides" not in done.stderr


def test_ranks_hold_identical_weights_and_count_validation_once(run_script, tmp_path):
    done = run_script(*torchrun_args(__file__, tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    weights = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    counts = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    # Each rank sees its own slice; the reduced count is every image exactly once.
    assert counts[0]["local"] + counts[1]["local"] == DIGITS_VAL_IMAGES
    assert counts[0]["reduced"] == counts[1]["reduced"] == DIGITS_VAL_IMAGES
    assert counts[0]["top1"] == counts[1]["top1"] == counts[0]["record_top1"] == counts[1]["record_top1"]
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file() and not (tmp_path / "rank1-run").exists()


def ddp_worker(out: Path) -> None:
    from emca.engine.checkpoint import CheckpointStore
    from emca.engine.distributed import setup_distributed
    from emca.engine.preemption import StopRequest
    from emca.engine.trainer import Trainer

    cfg = compose_train_config(*QUICK_RUN, "trainer.epochs=1")
    ctx = setup_distributed("cpu")
    with StopRequest() as stop:
        trainer = Trainer(cfg, ctx, CheckpointStore(out / "run"), source=None)
        trainer.fit(stop)
    torch.save(trainer.model.state_dict(), out / f"rank{ctx.rank}.pt")
    # classification's evaluate, as the run calls it for its record (counts every image once across ranks)
    from emca.engine.tasks.classification import evaluate

    trainer.task.val_loader.set_epoch(0)
    metrics = evaluate(trainer.model, trainer.task.val_loader, ctx)[0]
    record = trainer.evaluate(trainer.model, 0, None, stop)
    trainer.task.val_loader.set_epoch(0)
    local = sum(len(labels) for _, labels in trainer.task.val_loader)
    (out / f"rank{ctx.rank}.json").write_text(
        json.dumps({"local": local, "reduced": metrics.count, "top1": metrics.top1, "record_top1": record["top1"]})
    )


if __name__ == "__main__":
    ddp_worker(Path(sys.argv[1]))


def test_device_errors_name_the_setting_that_was_wrong():
    from emca.engine.distributed import resolve_device

    with pytest.raises(ValueError, match=r"^trainer.device='gpu': expected auto, cpu or cuda"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match=r"^device='gpu'"):  # eval.py's top-level option
        resolve_device("gpu", option="device")
    assert resolve_device("cpu", option="--device") == torch.device("cpu")
