"""Slim checkpoints and the history: best.pt and history/epoch-NNNN.pt hold what evaluation,
model.init_from and weight averaging read, not the optimizer; trainer.keep_last_n keeps the last
N epochs, pruned in the same rename that commits a save, whatever moment a kill comes at."""

import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import emca
from emca.engine.checkpoint import BEST, GENERATIONS, HISTORY, LAST, RESUME_ONLY, CheckpointStore, describe_history
from emca.engine.trainer import RunAborted, train

from conftest import SYNTHETIC_RUN


def full_state(epoch: int, best: int, megabytes: int = 1) -> dict:
    """What the trainer saves at the end of `epoch`: weights equal to the epoch, and resume's entries."""
    weights = torch.full((megabytes << 18,), float(epoch))
    return {"progress": {"epoch": epoch, "best": {"epoch": best}}, "weights": weights,
            **{key: {"resume_only": weights.clone()} for key in RESUME_ONLY}}


def history_epochs(store: CheckpointStore) -> list[int]:
    """The committed history's epochs, each entry checked whole and slim."""
    epochs = []
    for path in sorted((store.link / HISTORY).glob("*.pt")):
        entry = torch.load(path, weights_only=True)
        epoch = entry["progress"]["epoch"]
        assert path.name == f"epoch-{epoch:04d}.pt" and not set(RESUME_ONLY) & entry.keys()
        assert torch.equal(entry["weights"], torch.full_like(entry["weights"], float(epoch)))
        epochs.append(epoch)
    return epochs


def test_best_and_history_are_slim_and_the_history_keeps_the_last_n(tmp_path):
    store = CheckpointStore(tmp_path)
    store.prepare()
    for epoch, best in ((1, 1), (2, 1), (3, 3), (4, 3)):
        store.save(full_state(epoch, best), improved=epoch == best, epoch=epoch, keep_last_n=2)
    assert history_epochs(store) == [3, 4]
    last, best = torch.load(store.last, weights_only=True), torch.load(store.best, weights_only=True)
    assert set(RESUME_ONLY) <= last.keys() and not set(RESUME_ONLY) & best.keys() and best["progress"]["epoch"] == 3
    assert store.best.stat().st_size < store.last.stat().st_size
    # Epoch 3 improved: its entry is best.pt's file under a second name.
    assert (store.link / HISTORY / "epoch-0003.pt").stat().st_ino == store.best.stat().st_ino
    # A save within epoch 5 (a stop) adds no entry; a resumed older last.pt drops the entries it never reached.
    store.save(full_state(4, 3), improved=False, keep_last_n=2)
    assert history_epochs(store) == [3, 4]
    store.save(full_state(4, 3), improved=False, epoch=4, keep_last_n=3)
    assert history_epochs(store) == [3, 4]
    store.save(full_state(3, 3), improved=False, epoch=3, keep_last_n=2)
    assert history_epochs(store) == [3]
    store.save(full_state(4, 3), improved=False, epoch=4, keep_last_n=0)
    assert not (store.link / HISTORY).exists() and len(list((tmp_path / GENERATIONS).iterdir())) == 1


def test_keep_last_n_is_described_once_and_refused_below_zero():
    assert describe_history(0) is None
    assert describe_history(2).startswith("the last 2 epochs' weights kept in checkpoints/history/")
    with pytest.raises(ValueError, match=r"^trainer.keep_last_n=-1 must be an integer >= 0$"):
        describe_history(-1)


KILLED_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from emca.engine.checkpoint import CheckpointStore, RESUME_ONLY
    store = CheckpointStore(Path(sys.argv[1]))
    store.prepare()
    progress = torch.load(store.last, weights_only=True)["progress"] if store.last.exists() else None
    epoch, best = (progress["epoch"], progress["best"]["epoch"]) if progress else (0, 0)
    while True:
        epoch += 1
        improved = epoch % 3 != 2
        best = epoch if improved else best
        weights = torch.full((1 << 20,), float(epoch))  # 4 MB, and as much again for resume's entries
        state = {"progress": {"epoch": epoch, "best": {"epoch": best}}, "weights": weights,
                 **{key: (weights if key == "optimizer" else {}) for key in RESUME_ONLY}}
        store.save(state, improved=improved, epoch=epoch, keep_last_n=2)
        print(epoch, flush=True)
    """
)


def test_a_kill_at_any_instant_leaves_a_consistent_history(tmp_path):
    store = CheckpointStore(tmp_path)
    for _ in range(5):  # each writer continues from what the previous one left
        writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE,
                                  text=True)
        try:
            writer.stdout.readline()  # one save complete
            time.sleep(random.uniform(0.0, 0.2))  # somewhere inside a later one
            writer.send_signal(signal.SIGKILL)
            writer.wait(timeout=30)
        finally:
            writer.kill()
        last = torch.load(store.last, weights_only=True)
        epoch = last["progress"]["epoch"]
        assert torch.equal(last["optimizer"], torch.full_like(last["optimizer"], float(epoch)))
        assert torch.load(store.best, weights_only=True)["progress"]["epoch"] == last["progress"]["best"]["epoch"]
        assert history_epochs(store) == [e for e in (epoch - 1, epoch) if e >= 1]
    store.prepare()  # what a killed writer left uncommitted is cleared
    assert [p.name for p in (tmp_path / GENERATIONS).iterdir()] == [store.current().name]


def test_a_real_run_keeps_slim_best_and_history_that_load_and_refuse_resume(compose_train, tmp_path):
    run = tmp_path / "run"
    options = (*SYNTHETIC_RUN, "trainer.epochs=4", "trainer.max_steps_per_epoch=1", "trainer.ema.decay=0.5")
    train(compose_train(*options, "trainer.keep_last_n=2"), str(run))
    checkpoints = run / "checkpoints"
    assert sorted(path.name for path in (checkpoints / HISTORY).iterdir()) == ["epoch-0003.pt", "epoch-0004.pt"]
    best = torch.load(checkpoints / BEST, weights_only=True)
    assert not set(RESUME_ONLY) & best.keys() and {"model", "ema", "config", "fingerprint", "classes"} <= best.keys()
    assert (checkpoints / BEST).stat().st_size < (checkpoints / LAST).stat().st_size
    for entry, epoch in ((checkpoints / HISTORY / "epoch-0003.pt", 3), (checkpoints / HISTORY / "epoch-0004.pt", 4)):
        assert torch.load(entry, weights_only=True)["progress"]["epoch"] == epoch
        model, _ = emca.load_model(entry, ema=True)
        assert model.pretrained_cfg["num_classes"] == 10
    # Weights only: a new run may start from them, a resume is refused in one line naming last.pt.
    started = train(compose_train(*options, "trainer.epochs=1", f"model.init_from={checkpoints / BEST}"),
                    str(tmp_path / "new"))
    assert started["init_from"]["unused"] == 0
    with pytest.raises(RunAborted) as error:
        train(compose_train(*options, "trainer.epochs=5", f"trainer.resume={checkpoints / BEST}"), str(tmp_path / "r"))
    assert "\n" not in str(error.value) and f"trainer.resume={checkpoints / LAST}" in str(error.value)
    assert not (tmp_path / "r").exists()
