"""Checkpoints: atomic under a crash or a kill, refused for another architecture, RNG round trip."""

import errno
import io
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from emca.common.checkpoint_file import (
    BEST,
    CHECKPOINT_DIR,
    LAST,
    CheckpointError,
    architecture_fingerprint,
    load_checkpoint,
)
from emca.engine.checkpoint import GENERATIONS, HISTORY, RESUME_ONLY, CheckpointStore
from emca.engine.reproducibility import rng_state, set_rng_state
from emca.models import build_model


def tiny_model(attention="emca_eca", coverage=None, num_classes=10):
    coverage = coverage or {"stages": 1, "blocks": "all"}
    return build_model(
        {"name": "resnet18"}, {"name": attention, "integration": "first"}, coverage, num_classes=num_classes
    )


def epoch_state(epoch: int, best: int, megabytes: int = 1) -> dict:
    """A checkpoint of `epoch` that names `best` as its best epoch; every weight equals the epoch."""
    return {
        "progress": {"epoch": epoch, "best": {"epoch": best}},
        "weights": torch.full((megabytes << 18,), float(epoch)),
    }


def assert_consistent(store: CheckpointStore) -> int:
    """last.pt is whole, and what it says about best.pt is true of the best.pt beside it; its epoch."""
    last = torch.load(store.last, weights_only=True)
    assert torch.equal(last["weights"], torch.full_like(last["weights"], float(last["progress"]["epoch"])))
    best = torch.load(store.best, weights_only=True)
    assert best["progress"]["epoch"] == last["progress"]["best"]["epoch"]
    assert torch.equal(best["weights"], torch.full_like(best["weights"], float(best["progress"]["epoch"])))
    return last["progress"]["epoch"]


def history_epochs(store: CheckpointStore) -> list[int]:
    """The committed history's epochs, each entry checked whole and slim (no resume-only entries)."""
    epochs = []
    for path in sorted((store.link / HISTORY).glob("*.pt")):
        entry = torch.load(path, weights_only=True)
        epoch = entry["progress"]["epoch"]
        assert path.name == f"epoch-{epoch:04d}.pt" and not set(RESUME_ONLY) & entry.keys()
        assert torch.equal(entry["weights"], torch.full_like(entry["weights"], float(epoch)))
        epochs.append(epoch)
    return epochs


def test_last_and_best_are_replaced_together(tmp_path):
    store = CheckpointStore(tmp_path)
    store.prepare()
    inodes = {}
    for epoch, improved in ((1, True), (2, False), (3, True), (4, False)):
        best = epoch if improved else {2: 1, 4: 3}[epoch]
        store.save(epoch_state(epoch, best), improved=improved)
        assert assert_consistent(store) == epoch
        inodes[epoch] = store.best.stat().st_ino
    # An unimproved epoch links the previous best.pt into its generation rather than copying it.
    assert inodes[2] == inodes[1] and inodes[4] == inodes[3] != inodes[2]
    # One generation on disk, behind the symlink.
    assert [p.name for p in (tmp_path / GENERATIONS).iterdir()] == [store.current().name]
    assert (tmp_path / CHECKPOINT_DIR).is_symlink()


@pytest.mark.parametrize("failing", ["torch.save", "os.link", "os.symlink", "os.replace"])
def test_a_failed_save_keeps_the_previous_checkpoints(tmp_path, monkeypatch, failing):
    store = CheckpointStore(tmp_path)
    store.prepare()
    store.save(epoch_state(1, 1), improved=True)
    store.save(epoch_state(2, 1), improved=False)
    module, name = failing.split(".")
    real = getattr(torch if module == "torch" else os, name)

    def disk_full(*args, **kwargs):
        if name == "save":  # half a file first, as a full disk leaves it
            buffer = io.BytesIO()
            real(args[0], buffer)
            args[1].write(buffer.getvalue()[: buffer.tell() // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch if module == "torch" else os, name, disk_full)
    improved = name != "link"  # best.pt of an improved epoch is written, of another one linked
    with pytest.raises(CheckpointError) as error:
        store.save(epoch_state(3, 3 if improved else 1), improved=improved)
    monkeypatch.undo()
    assert "\n" not in str(error.value)
    assert "No space left on device" in str(error.value) and f"{store.last} is kept" in str(error.value)
    assert assert_consistent(store) == 2
    store.save(epoch_state(3, 3), improved=True)  # the next save clears what the failed one left
    assert assert_consistent(store) == 3 and len(list((tmp_path / GENERATIONS).iterdir())) == 1


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoints(tmp_path, monkeypatch):
    import builtins

    import emca.engine.checkpoint as checkpoint_module

    store = CheckpointStore(tmp_path)
    store.prepare()
    store.save(epoch_state(1, 1), improved=True)
    # Every checkpoint write goes to /dev/full, which fails as a full disk does.
    monkeypatch.setattr(checkpoint_module, "open", lambda path, mode: builtins.open("/dev/full", mode), raising=False)
    with pytest.raises(CheckpointError, match=r"No space left on device; .*last\.pt is kept") as error:
        store.save(epoch_state(2, 2, megabytes=8), improved=True)
    assert "\n" not in str(error.value)
    monkeypatch.undo()
    assert assert_consistent(store) == 1 and len(list((tmp_path / GENERATIONS).iterdir())) == 1


KILLED_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from emca.engine.checkpoint import CheckpointStore
    store = CheckpointStore(Path(sys.argv[1]))
    keep_last_n = int(sys.argv[2])
    store.prepare()
    # Resume both counters from last.pt, as the trainer does: a reset best would name an epoch
    # the linked best.pt does not hold.
    progress = torch.load(store.last, weights_only=True)["progress"] if store.last.exists() else None
    epoch, best = (progress["epoch"], progress["best"]["epoch"]) if progress else (0, 0)
    while True:
        epoch += 1
        improved = epoch % 3 != 2
        best = epoch if improved else best
        # 8 MB per save, every value equal to the epoch: a torn file would show mixed values. The
        # "optimizer" half is what only last.pt keeps.
        weights = torch.full((1 << 20,), float(epoch))
        state = {"progress": {"epoch": epoch, "best": {"epoch": best}}, "weights": weights,
                 "optimizer": weights.clone()}
        store.save(state, improved=improved, epoch=epoch, keep_last_n=keep_last_n)
        print(epoch, flush=True)
    """
)


@pytest.mark.parametrize("keep_last_n", [0, 2])
def test_a_kill_at_any_instant_leaves_consistent_checkpoints(tmp_path, keep_last_n):
    store = CheckpointStore(tmp_path)
    epochs = []
    for _ in range(8):  # each writer resumes the numbering from what the previous one left
        writer = subprocess.Popen(
            [sys.executable, "-c", KILLED_WRITER, str(tmp_path), str(keep_last_n)], stdout=subprocess.PIPE, text=True
        )
        try:
            writer.stdout.readline()  # one save complete
            time.sleep(random.uniform(0.0, 0.2))  # somewhere inside a later one
            writer.send_signal(signal.SIGKILL)
            writer.wait(timeout=30)
        finally:
            writer.kill()
        epochs.append(assert_consistent(store))
        last = torch.load(store.last, weights_only=True)["optimizer"]
        assert torch.equal(last, torch.full_like(last, float(epochs[-1])))
        # The history is always the last N epochs, whole, never a generation missing one.
        assert history_epochs(store) == [epoch for epoch in range(epochs[-1] - keep_last_n + 1, epochs[-1] + 1)
                                         if epoch >= 1]
    assert epochs == sorted(epochs)
    store.prepare()  # what a killed writer left uncommitted is cleared
    assert [p.name for p in (tmp_path / GENERATIONS).iterdir()] == [store.current().name]


def test_a_v01_checkpoint_folder_is_adopted(tmp_path):
    legacy = tmp_path / CHECKPOINT_DIR
    legacy.mkdir()
    torch.save(epoch_state(5, 4), legacy / LAST)
    torch.save(epoch_state(4, 4), legacy / BEST)
    store = CheckpointStore(tmp_path)
    store.prepare()
    assert legacy.is_symlink() and assert_consistent(store) == 5
    store.save(epoch_state(6, 4), improved=False)
    assert assert_consistent(store) == 6


def test_a_checkpoint_of_another_architecture_is_refused_in_one_line(tmp_path):
    path = tmp_path / "last.pt"
    eca = tiny_model("emca_eca")
    torch.save({"fingerprint": architecture_fingerprint(eca), "model": eca.state_dict()}, path)
    assert (
        load_checkpoint(path, architecture_fingerprint(tiny_model("emca_eca")))["model"].keys()
        == eca.state_dict().keys()
    )

    for other in (tiny_model("emca_se"), tiny_model("emca_eca", {"stages": 1, "blocks": 1}), tiny_model(num_classes=7)):
        with pytest.raises(CheckpointError) as error:
            load_checkpoint(path, architecture_fingerprint(other))
        message = str(error.value)
        assert "\n" not in message and message.startswith(f"refusing checkpoint {path}")
        assert "emca_eca" in message


def test_unreadable_or_missing_checkpoints_are_one_line_errors(tmp_path):
    fingerprint = architecture_fingerprint(tiny_model())
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt", fingerprint)
    truncated = tmp_path / "truncated.pt"
    buffer = io.BytesIO()
    torch.save({"fingerprint": fingerprint, "x": torch.zeros(1000)}, buffer)
    truncated.write_bytes(buffer.getvalue()[:500])
    with pytest.raises(CheckpointError, match="cannot be read") as error:
        load_checkpoint(truncated, fingerprint)
    assert "\n" not in str(error.value)


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = tmp_path / "rng.pt"
    torch.save({"rng": rng_state()}, path)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(path, weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
