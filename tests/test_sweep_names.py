"""Sweep job folders: `<job number>_<the job's values of the swept keys>` (emca.config.sweep_job_name,
configs/train.yaml's hydra.sweep.subdir), and make_tables finds the runs in them."""

from omegaconf import OmegaConf

from emca.analysis.runs import find_runs
from emca.config import SWEEP_NAME_MAX, _swept_keys, sweep_job_name

from conftest import SYNTHETIC_RUN


def test_name_keeps_the_swept_keys_safe_and_short():
    job = ["+experiment=digits_quick", "attention=emca_se", "coverage=none", "trainer.resume=auto"]
    assert sweep_job_name(0, job, {"trainer.resume"}, {"attention", "coverage"}) == "0_attention-emca_se__coverage-none"
    assert sweep_job_name(4, job, {"trainer.resume"}, set()) == "4"  # nothing varies: the number alone
    # Swept keys unknown: every override but the excluded ones; '+' dropped, '/' and other unsafe characters replaced.
    name = sweep_job_name(3, ["+experiment/table3=eca_all", "optimizer.milestones=[0.3,0.6]", "dataset.root=/d"],
                          {"dataset.root"})
    assert name == "3_experiment.table3-eca_all__optimizer.milestones--0.3-0.6-"
    long = sweep_job_name(12, [f"trainer.{'x' * 60}={i}" for i in range(3)])
    assert len(long) == SWEEP_NAME_MAX and long.startswith("12_trainer.xxx")
    assert long != sweep_job_name(12, [f"trainer.{'x' * 60}={i}" for i in range(4)])  # the hash tells them apart


def test_swept_keys_come_from_multirun_yaml(tmp_path):
    assert _swept_keys(str(tmp_path)) is None
    OmegaConf.save({"hydra": {"overrides": {"task": ["+experiment=table5", "trainer.epochs=2", "seed=1,2"]},
                              "sweeper": {"params": {"backbone": "resnet50", "attention": "${emca.attentions:}",
                                                     "+experiment/table3": "glob(*)"}}}},
                   tmp_path / "multirun.yaml")
    assert _swept_keys(str(tmp_path)) == {"seed", "attention", "experiment/table3"}
    # A command-line value replaces the preset's list for its key (tests/test_eval.py's sweep: backbone=resnet18).
    OmegaConf.save({"hydra": {"overrides": {"task": ["backbone=resnet18", "attention=none,emca_se"]},
                              "sweeper": {"params": {"backbone": "resnet18,resnet34", "attention": "none,se"}}}},
                   tmp_path / "multirun.yaml")
    assert _swept_keys(str(tmp_path)) == {"attention"}


def test_sweep_folders_are_named_and_make_tables_finds_them(run_script, tmp_path):
    sweep = tmp_path / "sweep"
    done = run_script("train.py", "-m", *SYNTHETIC_RUN, "trainer.epochs=1", "trainer.max_steps_per_epoch=1",
                      "attention=emca_se,emca_eca", f"hydra.sweep.dir={sweep}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0_attention-emca_se", "1_attention-emca_eca"]
    tables = run_script("scripts/make_tables.py", sweep, "--out", tmp_path / "tables")
    assert tables.returncode == 0, tables.stderr[-3000:]
    assert "ignoring" not in tables.stderr and (tmp_path / "tables" / "tables.md").is_file()
    runs = find_runs([sweep])
    assert [run.path.name for run in runs] == ["0_attention-emca_se", "1_attention-emca_eca"]
    assert all(run.results and run.variant for run in runs)


def test_swept_keys_of_a_sweeper_without_multirun_yaml_come_from_its_params(tmp_path):
    """Optuna's sweeper writes no multirun.yaml: the job's hydra.sweeper.params say what is searched, in the
    plugin's syntax; a fixed value or a one-choice list is no sweep."""
    sweeper = OmegaConf.create({"params": {"optimizer.lr": "tag(log, interval(0.005, 0.2))",
                                           "optimizer.weight_decay": "interval(1e-5, 1e-3)",
                                           "attention": "choice(emca_eca, emca_se)", "trainer.seed": "range(0, 3)",
                                           "backbone": "choice(resnet18)", "trainer.epochs": "30"}})
    assert _swept_keys(str(tmp_path), sweeper) == {"optimizer.lr", "optimizer.weight_decay", "attention",
                                                   "trainer.seed"}
    assert _swept_keys(str(tmp_path), OmegaConf.create({"params": None})) is None  # every override names it
    assert _swept_keys(str(tmp_path), OmegaConf.create({"params": {"x": "interval(1"}})) is None  # unparsable


def test_sampled_floats_are_named_in_four_significant_digits():
    trial = ["optimizer.lr=0.05111023492152638", "optimizer.weight_decay=1.2345678e-05", "+experiment=search_lr_wd"]
    name = sweep_job_name(7, trial, (), {"optimizer.lr", "optimizer.weight_decay"})
    assert name == "7_optimizer.lr-0.05111__optimizer.weight_decay-1.235e-05"
    # Values as typed where 4 digits hold them: a grid sweep's names are unchanged.
    assert sweep_job_name(0, ["optimizer.lr=0.1", "trainer.epochs=10"]) == "0_optimizer.lr-0.1__trainer.epochs-10"
