"""The command line (emca/cli.py, train.py): a misspelt key or an unknown choice is refused in one line
naming the closest, before anything runs; a continued run is the run it continues (its recorded
overrides apply), so the command the framework prints to continue a run works as printed, and a
change of what the run computes is refused without touching the run's record."""

import dataclasses
import os
import signal

import pytest
import torch

from emca.cli import OverrideError, check_overrides, continued_overrides
from emca.config import TrainConfig

from conftest import QUICK_RUN, REPO_ROOT
from test_stop_signals import start, wait_for

CONFIGS = REPO_ROOT / "configs"


def misspelt(name: str) -> str:
    return name[:-1] if len(name) > 3 else name + "x"  # epochs -> epoch, lr -> lrx


def first_option(group: str) -> str:
    """The dotted name of the first plain option of a group of the train schema."""
    from hydra import compose, initialize_config_dir
    from omegaconf import DictConfig

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        node = compose("train")[group]
    name = next(key for key in node if not isinstance(node[key], DictConfig))
    return f"{group}.{name}"


def groups() -> list[str]:
    """The train schema's fields that hold options (task is a plain value)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import DictConfig

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        config = compose("train")
    names = [field.name for field in dataclasses.fields(TrainConfig)]
    return [name for name in names if isinstance(config[name], DictConfig)]


@pytest.mark.parametrize("group", groups())
@pytest.mark.parametrize("prefix", ["", "+", "++"])
def test_a_misspelt_key_in_every_group_is_refused_naming_the_closest(group, prefix):
    option = first_option(group)
    wrong = f"{group}.{misspelt(option.split('.', 1)[1])}"
    with pytest.raises(OverrideError) as error:
        check_overrides(CONFIGS, "train", [f"{prefix}{wrong}=1"], "train.py")
    assert str(error.value).startswith(f"{prefix}{wrong}=1: {wrong} is not an option (did you mean {option}")
    assert "\n" not in str(error.value) and "`python train.py --cfg job` lists them all" in str(error.value)


@pytest.mark.parametrize("override, message", [
    ("trainer.lr=0.1", "trainer.lr=0.1: trainer.lr is not an option (did you mean optimizer.lr, "),
    ("tsak=classification", "tsak=classification: tsak is not an option (did you mean task"),
    ("trainr.epochs=3", "trainr.epochs=3: trainr.epochs is not an option (did you mean trainer.epochs, "),
    ("trainer.ema.decai=0.9", "trainer.ema.decai=0.9: trainer.ema.decai is not an option (did you mean "
                              "trainer.ema.decay, "),
    ("+trainer.epochs=2", "+trainer.epochs=2: trainer.epochs is an option already; set it without '+': "
                          "trainer.epochs=2"),
    ("attention=emca_foo", "attention=emca_foo is not a choice of attention (did you mean emca_se, "),
    ("attention=se,emca_foo", "attention=emca_foo is not a choice of attention (did you mean "),
    ("logger=mlfow", "logger=mlfow is not a choice of logger (did you mean mlflow?); the choices: all, mlflow, "
                     "tensorboard, wandb"),
    ("+experiment=tabel5", "experiment=tabel5 is not a choice of experiment (did you mean table5, "),
    ("experiment=table5", "experiment=table5: experiment is not chosen by default; add it with +experiment=table5"),
    ("+attention=se", "+attention=se: attention is chosen already (emca_eca); swap it without '+': attention=se"),
])
def test_wrong_keys_and_choices_get_one_line_with_the_fix(override, message):
    with pytest.raises(OverrideError) as error:
        check_overrides(CONFIGS, "train", [override], "train.py")
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


@pytest.mark.parametrize("override, message", [
    ("trainer.amp=fp8", "trainer.amp='fp8' must be one of off, bf16, fp16"),
    ("trainer.compile=1", "trainer.compile=1 must be true or false"),  # OmegaConf alone reads 1 as true
    ("trainer.resume=[a]", "trainer.resume=['a'] must be a string or null"),
    ("optimizer.lr=fast", "optimizer.lr='fast' must be a number"),
    ("dataset.batch_size=1.5", "dataset.batch_size=1.5 must be an integer"),
    ("optimizer.no_weight_decay=[bn,everything]",
     "optimizer.no_weight_decay=['bn', 'everything'] must be a list, each one of bn, bias, srm"),
])
def test_a_value_of_the_wrong_type_is_one_line_naming_what_the_option_takes(override, message):
    with pytest.raises(OverrideError) as error:
        check_overrides(CONFIGS, "train", [override], "train.py")
    assert str(error.value) == message


@pytest.mark.parametrize("overrides", [
    ["trainer.epochs=2", "attention=se,emca_eca", "attention.se_reduction=8", "coverage=none"],
    ["+experiment=table3/se_all", "hydra.run.dir=x", "hydra/launcher=slurm"],
    ["+experiment=digits_quick", "dataset.image_size=16", "optimizer.betas=[0.9,0.99]", "model.init_exclude=[fc]"],
    ["++trainer.epochs=2", "attention=glob(emca_*)", "+experiment=table5", "attention.eca_kernel=5"],
])
def test_right_overrides_pass(overrides):
    check_overrides(CONFIGS, "train", overrides, "train.py")


def test_train_py_refuses_a_misspelt_key_before_anything_runs(run_script, tmp_path):
    run_dir = tmp_path / "run"
    done = run_script("train.py", "+trainer.epoch=2", f"hydra.run.dir={run_dir}", timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == ("error: +trainer.epoch=2: trainer.epoch is not an option (did you mean "
                                   "trainer.epochs, trainer.amp?); `python train.py --cfg job` lists them all")
    assert not run_dir.exists() and "Traceback" not in done.stdout + done.stderr
    done = run_script("train.py", "attention=emca_foo", f"hydra.run.dir={run_dir}", timeout=120)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: attention=emca_foo is not a choice of attention (did you mean ")


def test_a_continued_run_takes_its_recorded_overrides_under_the_command_lines(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- trainer.epochs=3\n- +experiment=digits_quick\n"
                                                         "- attention=se\n")
    assert continued_overrides(tmp_path, ["trainer.resume=auto", "attention=eca"]) == [
        "trainer.epochs=3", "+experiment=digits_quick", "trainer.resume=auto", "attention=eca"]
    assert continued_overrides(tmp_path, ["trainer.epochs=3", "+experiment=digits_quick", "attention=se"]) is None
    assert continued_overrides(tmp_path / "elsewhere", ["trainer.resume=auto"]) is None


def test_the_printed_resume_command_works_as_printed_and_a_changed_run_is_refused(tmp_path, run_script):
    """The issue's case: a 3-epoch run stopped by Ctrl-C, continued by exactly the command it printed."""
    run_dir = tmp_path / "run"
    process = start(["train.py", *QUICK_RUN, "trainer.epochs=3", "trainer.log_every=1", "dataset.workers=0",
                     f"hydra.run.dir={run_dir}"])
    try:
        wait_for(process, "epoch 2/3 step 1/")
        os.killpg(process.pid, signal.SIGINT)
        output = process.communicate(timeout=120)[0]
    finally:
        process.kill()
    assert process.returncode == 130, output[-3000:]
    printed = next(line for line in output.splitlines() if "continue with " in line).split("continue with ", 1)[1]
    assert printed == f"hydra.run.dir={run_dir} trainer.resume=auto"
    record = (run_dir / ".hydra" / "config.yaml").read_text()

    # Another geometry and seed: refused in one line naming both, the record untouched.
    refused = run_script("train.py", *printed.split(), "dataset.image_size=12", "trainer.seed=5", timeout=300)
    assert refused.returncode == 1, refused.stdout[-3000:] + refused.stderr[-3000:]
    error = next(line for line in (refused.stdout + refused.stderr).splitlines() if "refusing to resume" in line)
    assert "dataset.image_size=12 (the run's: 16), trainer.seed=5 (the run's: 0)" in error
    assert f"hydra.run.dir={run_dir} trainer.resume=auto applies them" in error
    assert (run_dir / ".hydra" / "config.yaml").read_text() == record

    done = run_script("train.py", *printed.split(), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert state["progress"]["epoch"] == 3 and state["config"]["trainer"]["epochs"] == 3
    assert (run_dir / ".hydra" / "config.yaml").read_text().replace("resume: auto", "resume: null") == record


@pytest.mark.parametrize("config, wrong, right", [("export", "formt=onnx", "format"),
                                                  ("summary", "image_sise=160", "image_size"),
                                                  ("summary", "attention.se_reductoin=8", "attention.se_reduction")])
def test_the_other_entry_points_refuse_misspelt_keys_too(config, wrong, right):
    with pytest.raises(OverrideError, match=f"is not an option \\(did you mean {right}"):
        check_overrides(CONFIGS, config, [wrong], f"scripts/{config}.py")
