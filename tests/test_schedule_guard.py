"""What a resumed run may change (emca/engine/compatibility.py) and the model options an attention ignores."""

import logging
import signal
from pathlib import Path

import pytest

from emca.engine.compatibility import RESUME_FREE, check_resume_config
from emca.engine.trainer import Preempted, RunAborted, Trainer, train
from emca.models.config import ignored_model_options

from conftest import SYNTHETIC_RUN

SAVED = {
    "trainer": {"epochs": 4, "accumulate": 1, "max_steps_per_epoch": 3, "seed": 0},
    "optimizer": {"name": "sgd", "lr": 0.1, "milestones": [0.3, 0.6, 0.9], "gamma": 0.1, "warmup_epochs": 0},
    "dataset": {"batch_size": 64, "workers": 2},
}
RUN = Path("/runs/a")
PATH = RUN / "checkpoints" / "last.pt"
FIX = f"drop them to continue with the run's own values (hydra.run.dir={RUN} trainer.resume=auto applies them), " \
      f"or start a new run from its weights with model.init_from={PATH}"


def check_resume_schedule(saved, current, path, progress):
    check_resume_config(saved, current, path, progress, RUN)


def changed(**options):
    config = {group: dict(values) for group, values in SAVED.items()}
    for key, value in options.items():
        group, name = key.split("__")
        config[group][name] = value
    return config


def test_an_unchanged_run_or_one_read_or_watched_otherwise_resumes():
    check_resume_schedule(SAVED, SAVED, PATH, {"epoch": 2, "step_in_epoch": 1})
    check_resume_schedule(SAVED, changed(dataset__workers=0, dataset__root="/moved"), PATH, {"epoch": 2})
    check_resume_schedule(SAVED, {**changed(trainer__device="cuda", trainer__log_every=1),
                                  "logger": {"tensorboard": False}}, PATH, {"epoch": 2})
    # How often DDP ranks agree on a stop signal changes when a stop is seen, not what is computed.
    check_resume_schedule(changed(trainer__stop_check_every=10), changed(trainer__stop_check_every=50), PATH,
                          {"epoch": 2})
    check_resume_schedule(None, changed(trainer__epochs=9), PATH, {"epoch": 2})  # no saved config: nothing to compare
    # An option that the checkpoint's (older) config lacks is not compared.
    check_resume_schedule(SAVED, {**changed(), "optimizer": {**SAVED["optimizer"], "new_option": 1}}, PATH, {})


def test_a_changed_schedule_is_refused_in_one_line_naming_each_change():
    with pytest.raises(ValueError) as error:
        check_resume_schedule(SAVED, changed(trainer__epochs=6, optimizer__milestones=[0.5], dataset__batch_size=32),
                              PATH, {"epoch": 2, "step_in_epoch": 0})
    message = str(error.value)
    assert "\n" not in message
    assert message == (
        f"refusing to resume {PATH} with another schedule: trainer.epochs=6 (the checkpoint's: 4), "
        "optimizer.milestones=[0.5] (the checkpoint's: [0.3, 0.6, 0.9]), dataset.batch_size=32 (the checkpoint's: "
        f"64); {FIX}"
    )
    for option in ("optimizer__lr", "optimizer__name", "trainer__accumulate", "trainer__max_steps_per_epoch"):
        with pytest.raises(ValueError, match=option.replace("__", r"\.")):
            check_resume_schedule(SAVED, changed(**{option: None}), PATH, {"epoch": 1})


@pytest.mark.parametrize("options, named", [
    ({"trainer__seed": 5}, "trainer.seed=5 (the run's: 0)"),
    ({"dataset__image_size": 16}, "dataset.image_size=16 (the run's: 32)"),
    ({"attention__name": "se"}, "attention.name='se' (the run's: 'emca_eca')"),
    ({"dataset__image_size": 16, "trainer__epochs": 6}, "trainer.epochs=6 (the run's: 4), dataset.image_size=16"),
])
def test_a_change_of_data_geometry_seed_or_model_is_refused_naming_each_key(options, named):
    saved = {**SAVED, "dataset": {**SAVED["dataset"], "image_size": 32}, "attention": {"name": "emca_eca"}}
    current = {group: dict(values) for group, values in saved.items()}
    for key, value in options.items():
        group, name = key.split("__")
        current[group][name] = value
    with pytest.raises(ValueError) as error:
        check_resume_schedule(saved, current, PATH, {"epoch": 4, "step_in_epoch": 0})
    assert str(error.value).startswith(f"refusing to resume {PATH} with options that change what the run computes: "
                                       f"{named}")
    assert str(error.value).endswith(FIX) and "\n" not in str(error.value)


def test_the_free_options_are_options_of_the_schema(compose_train):
    """A renamed option would silently become compared (refused on resume): each free key must exist."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(compose_train(), resolve=False)
    for key in RESUME_FREE:
        node = config
        for part in key.split("."):
            assert part in node, key
            node = node[part]


def test_only_a_completed_run_is_extended_and_the_log_says_so(caplog):
    caplog.set_level(logging.INFO, logger="emca.engine.compatibility")
    check_resume_schedule(SAVED, changed(trainer__epochs=6), PATH, {"epoch": 4, "step_in_epoch": 0})
    assert f"trainer.epochs=6: extending the completed 4-epoch run of {PATH} by 2 epochs" in caplog.text
    for progress in ({"epoch": 3, "step_in_epoch": 0}, {"epoch": 4, "step_in_epoch": 2}):  # not completed
        with pytest.raises(ValueError, match=r"trainer\.epochs=6 \(the checkpoint's: 4\)"):
            check_resume_schedule(SAVED, changed(trainer__epochs=6), PATH, progress)
    with pytest.raises(ValueError, match=r"trainer\.epochs=3 \(the checkpoint's: 4\)"):  # shorter than trained
        check_resume_schedule(SAVED, changed(trainer__epochs=3), PATH, {"epoch": 4})
    with pytest.raises(ValueError, match="optimizer.lr"):  # more epochs and another rate
        check_resume_schedule(SAVED, changed(trainer__epochs=6, optimizer__lr=0.2), PATH, {"epoch": 4})


def test_resuming_a_stopped_run_with_another_schedule_is_refused(compose_train, tmp_path, monkeypatch):
    evaluate = Trainer.evaluate

    def evaluate_then_preempt(self, model, epoch, board, stop, tag="val"):
        metrics = evaluate(self, model, epoch, board, stop, tag)
        if epoch == 0:
            signal.raise_signal(signal.SIGUSR1)  # as SLURM does before the time limit
        return metrics

    monkeypatch.setattr(Trainer, "evaluate", evaluate_then_preempt)
    with pytest.raises(Preempted):
        train(compose_train(*SYNTHETIC_RUN), str(tmp_path))  # 2 epochs, stopped after the first
    monkeypatch.undo()
    last = tmp_path / "checkpoints" / "last.pt"
    with pytest.raises(RunAborted) as error:
        train(compose_train(*SYNTHETIC_RUN, "trainer.epochs=3", "trainer.resume=auto"), str(tmp_path))
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"refusing to resume {last} with another schedule: ")
    assert "trainer.epochs=3 (the checkpoint's: 2)" in message and f"model.init_from={last}" in message
    # Only trainer.resume continues a schedule: model.init_from starts a new one from the weights.
    fresh = train(compose_train(*SYNTHETIC_RUN, "trainer.epochs=1", f"model.init_from={last}"), str(tmp_path / "new"))
    assert fresh["epoch_reached"] == 1
    # Unchanged, the run continues to its end.
    results = train(compose_train(*SYNTHETIC_RUN, "trainer.resume=auto"), str(tmp_path))
    assert results["epoch_reached"] == 2


# --------------------------------------------------------------------------- options an attention ignores
@pytest.mark.parametrize(
    "attention, coverage, expected",
    [
        ({"name": "se"}, {"stages": "all", "blocks": "all"}, ["coverage=all_stages_all"]),
        ({"name": "none", "gating": "residual", "align": "linear", "include_stem": True}, {"stages": 1, "blocks": 2},
         ["coverage.stages=1, coverage.blocks=2", "attention.gating='residual'", "attention.align='linear'",
          "attention.include_stem=true"]),
        # Not chosen (the default group, set for every run) or asking for nothing: no warning.
        ({"name": "se", "gating": "multiply", "align": "repeat", "include_stem": False}, {"stages": 1, "blocks": "all"},
         []),
        ({"name": "eca"}, {"stages": 0, "blocks": 0}, []),
        # EMCA reads them all.
        ({"name": "emca_se", "gating": "residual", "include_stem": True}, {"stages": "all", "blocks": "all"}, []),
    ],
)
def test_the_options_a_non_emca_attention_ignores(attention, coverage, expected):
    assert ignored_model_options(attention, coverage) == expected


def test_a_run_warns_once_in_one_line_of_the_options_its_attention_ignores(compose_train, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="emca.models.config")
    train(compose_train(*SYNTHETIC_RUN, "trainer.epochs=1", "attention=se", "coverage=all_stages_all",
                        "attention.gating=residual"), str(tmp_path))
    warnings = [record.getMessage() for record in caplog.records if record.name == "emca.models.config"]
    assert warnings == [
        "attention=se ignores coverage=all_stages_all, attention.gating='residual': only EMCA's multi-scale "
        "aggregation reads them; drop them, or choose emca_se to use them"
    ]
    caplog.clear()
    train(compose_train(*SYNTHETIC_RUN, "trainer.epochs=1", "attention=eca"), str(tmp_path / "default"))
    assert not [record for record in caplog.records if record.name == "emca.models.config"]
