"""Slim checkpoints and the history: best.pt and history/epoch-NNNN.pt hold what evaluation,
model.init_from and weight averaging read, not the optimizer; trainer.keep_last_n keeps the last
N epochs, pruned in the same rename that commits a save (killed at any instant: test_checkpoint.py)."""

import pytest
import torch
from test_checkpoint import history_epochs

import emca
from emca.common.checkpoint_file import BEST, LAST
from emca.engine.checkpoint import GENERATIONS, HISTORY, RESUME_ONLY, CheckpointStore, describe_history
from emca.engine.trainer import RunAborted, train

from conftest import SYNTHETIC_RUN


def full_state(epoch: int, best: int) -> dict:
    """What the trainer saves at the end of `epoch`: weights equal to the epoch, and resume's entries."""
    weights = torch.full((1 << 18,), float(epoch))
    return {"progress": {"epoch": epoch, "best": {"epoch": best}}, "weights": weights,
            **{key: {"resume_only": weights.clone()} for key in RESUME_ONLY}}


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
