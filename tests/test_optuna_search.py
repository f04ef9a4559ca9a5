"""Hyperparameter search through Hydra's Optuna sweeper (`hydra/sweeper=optuna`, configs/experiment/search_lr_wd.yaml):
trials sample the search space, their folders are named by the sampled values, the study's best is the best
trial's figure, and the same command again continues the study stored in its database."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
from omegaconf import OmegaConf
from optuna.distributions import FloatDistribution

from emca.analysis.runs import find_runs, measurements
from emca.config import _swept_keys

PRESET = Path(__file__).resolve().parents[1] / "configs" / "experiment" / "search_lr_wd.yaml"
SEARCHED = ("optimizer.lr", "optimizer.weight_decay")


def test_preset_searches_lr_and_weight_decay_of_emca_eca_on_the_tiny_imagenet_subset(compose_train, tmp_path):
    cfg = compose_train("+experiment=search_lr_wd")
    assert (cfg.attention.name, cfg.dataset.name) == ("emca_eca", "tiny_imagenet")
    assert cfg.dataset.root.endswith("/tinyimagenet-subset") and cfg.optimizer.lr_scale_batch is None
    from hydra import compose, initialize_config_dir  # the sweeper's own config: Hydra's, composed on request

    with initialize_config_dir(config_dir=str(PRESET.parents[1]), version_base="1.3"):
        sweeper = compose("train", overrides=["+experiment=search_lr_wd"], return_hydra_config=True).hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sweeper.direction == "maximize" and sweeper.sampler.seed is not None
    assert sweeper.storage.startswith("sqlite:///") and sweeper.study_name == "search_lr_wd"
    # The plugin's own parser reads the params as log-uniform distributions; the trials' names hold both keys.
    distributions = create_params_from_overrides([f"{k}={v}" for k, v in sweeper.params.items()])[0]
    assert set(distributions) == set(SEARCHED)
    assert all(isinstance(d, FloatDistribution) and d.log for d in distributions.values())
    assert _swept_keys(str(tmp_path), sweeper) == set(SEARCHED)


# The synthetic quick run (conftest's SYNTHETIC_RUN, whose +experiment the preset takes the place of): random
# 16 px images, one step of 16 in one epoch and one validation batch per trial.
QUICK_SEARCH = ("dataset=digits", "loader=synthetic", "dataset.num_classes=10", "loader.val_steps=1",
                "dataset.image_size=16", "dataset.val_resize=16", "dataset.batch_size=16", "dataset.workers=0",
                "trainer.device=cpu", "trainer.epochs=1", "trainer.max_steps_per_epoch=1")


def search(run_script, sweep: Path, storage: str, trials: int):
    """The preset's search (its search space, sampler, direction) on the quick run, into `sweep`."""
    return run_script("train.py", "-m", "+experiment=search_lr_wd", *QUICK_SEARCH, f"hydra.sweeper.n_trials={trials}",
                      "hydra.sweeper.sampler.n_startup_trials=2", f"hydra.sweeper.storage={storage}",
                      "hydra.sweeper.study_name=tiny", f"hydra.sweep.dir={sweep}")


def trials_of(sweep: Path) -> dict[str, tuple[dict[str, float], float]]:
    """{folder name: (sampled values, best validation top-1 in results.json)} of a sweep's trial folders."""
    trials = {}
    for folder in sorted(p for p in sweep.iterdir() if p.is_dir()):
        overrides = dict(line.split("=", 1) for line in OmegaConf.load(folder / ".hydra" / "overrides.yaml"))
        results = json.loads((folder / "results.json").read_text())
        trials[folder.name] = ({key: float(overrides[key]) for key in SEARCHED}, results["best"]["val_top1"])
    return trials


@pytest.mark.slow
def test_a_search_samples_names_its_trials_and_a_rerun_continues_the_study(run_script, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    done = search(run_script, tmp_path / "first", storage, trials=2)
    assert done.returncode == 0, done.stderr[-3000:]
    first = trials_of(tmp_path / "first")
    values = [sampled for sampled, _ in first.values()]
    assert len(first) == 2 and values[0] != values[1]
    # <trial number>_<the sampled values, 4 significant digits>: the swept keys alone.
    assert sorted(first) == sorted(f"{num}_optimizer.lr-{v['optimizer.lr']:.4g}__optimizer.weight_decay-"
                                   f"{v['optimizer.weight_decay']:.4g}" for num, v in enumerate(values))
    best = OmegaConf.load(tmp_path / "first" / "optimization_results.yaml")
    assert best.best_value == max(top1 for _, top1 in first.values())
    assert dict(best.best_params) in values
    runs = find_runs([tmp_path / "first"])
    assert len(runs) == 2 and all(run.complete and run.variant for run in runs)
    measured, _ = measurements(runs)
    assert sorted(next(iter(measured.values())).values["top1"]) == sorted(top1 for _, top1 in first.values())

    # The same command again (another sweep folder): the study is loaded and told one trial more.
    again = search(run_script, tmp_path / "again", storage, trials=1)
    assert again.returncode == 0, again.stderr[-3000:]
    [(name, (sampled, _))] = trials_of(tmp_path / "again").items()
    assert name.startswith("0_") and sampled not in values  # numbered afresh, sampled knowing the two before
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert [trial.state for trial in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert [trial.params for trial in study.trials] == [*values, sampled]
    tops = [top1 for _, top1 in first.values()] + [trials_of(tmp_path / "again")[name][1]]
    assert OmegaConf.load(tmp_path / "again" / "optimization_results.yaml").best_value == max(tops)
