"""Impossible option values: each refused in one line that names the option, the value and what is
accepted, where the option is read; never a traceback, never a message that blames another option."""

import io

import pytest
import torch

from emca.common.checkpoint_file import BEST, LAST, CheckpointError, load_checkpoint
from emca.engine.trainer import RunAborted, train
from emca.models.config import check_model_options
from emca.options import require, require_int, shown

from conftest import SYNTHETIC_RUN

# Every option of the train schema that has impossible values, with the whole line it gets. The
# synthetic run trains 2 epochs (digits_quick), so a warm-up of 2 epochs leaves none to train.
TRAIN_OPTION_ERRORS = {
    # trainer (schedule.py for trainer.epochs; the rest checked at the top of Trainer._build)
    ("trainer.epochs=0",): "trainer.epochs=0 must be an integer >= 1",
    ("trainer.eval_every=0",): "trainer.eval_every=0 must be at least 1",
    ("trainer.log_every=0",): "trainer.log_every=0 must be at least 1",
    ("trainer.max_steps_per_epoch=0",): "trainer.max_steps_per_epoch=0 must be at least 1",
    ("trainer.seed=-1",): "trainer.seed=-1 must be an integer in [0, 2**32)",  # was numpy's traceback
    (
        "trainer.dist_timeout_s=0",
    ): "trainer.dist_timeout_s=0.0 must be > 0 (seconds a collective waits for the other ranks)",
    (
        "trainer.resume=/",
    ): "trainer.resume=/ is a folder, not a checkpoint file; give the file, e.g. /checkpoints/last.pt",
    # optimizer (optim.py, schedule.py)
    ("optimizer.lr=-1",): "optimizer.lr=-1.0 must be > 0",
    ("optimizer.lr=0",): "optimizer.lr=0.0 must be > 0",
    ("optimizer.lr_scale_batch=0",): "optimizer.lr_scale_batch=0 must be an integer >= 1 or null",
    ("optimizer.momentum=1",): "optimizer.momentum=1.0 must be in [0, 1)",
    ("optimizer.momentum=-0.5",): "optimizer.momentum=-0.5 must be in [0, 1)",
    (
        "optimizer.nesterov=true",
        "optimizer.momentum=0",
    ): "optimizer.momentum=0.0 must be > 0 with optimizer.nesterov=true",
    ("optimizer.weight_decay=-1",): "optimizer.weight_decay=-1.0 must be >= 0",
    (
        "optimizer.milestones=[0.6,0.3]",
    ): "optimizer.milestones=[0.6, 0.3] must be increasing fractions of trainer.epochs in (0, 1], e.g. [0.3, 0.6, 0.9]",
    (
        "optimizer.milestones=[0.5,30]",
    ): "optimizer.milestones=[0.5, 30.0] must be increasing fractions of trainer.epochs in (0, 1], "
    "e.g. [0.3, 0.6, 0.9]",
    ("optimizer.gamma=0",): "optimizer.gamma=0.0 must be > 0",
    ("optimizer.warmup_epochs=-1",): "optimizer.warmup_epochs=-1 must be an integer >= 0",
    ("optimizer.label_smoothing=1",): "optimizer.label_smoothing=1.0 must be in [0, 1)",
    ("optimizer.label_smoothing=-0.1",): "optimizer.label_smoothing=-0.1 must be in [0, 1)",
    (
        "optimizer.name=adamw",
        "optimizer.betas=[0.9,1]",
    ): "optimizer.betas=[0.9, 1.0] must be two values in [0, 1), e.g. [0.9, 0.999]",
    ("optimizer.name=lamb", "optimizer.eps=0"): "optimizer.eps=0.0 must be > 0",
    (
        "optimizer.loss=bce",
        "optimizer.bce_target_threshold=1",
    ): "optimizer.bce_target_threshold=1.0 must be in (0, 1) or null",
    # dataset and loader (emca/data/config.py, and the data layer's own checks)
    ("dataset.num_classes=0",): "dataset.num_classes=0 must be an integer >= 1 or null",
    ("dataset.workers=-1",): "dataset.workers=-1 must be an integer >= 0 or null",
    ("dataset.epochs=0",): "dataset.epochs=0 must be an integer >= 1",
    ("dataset.image_size=0",): "dataset.image_size=0 must be positive",
    ("dataset.crop_padding=-1",): "dataset.crop_padding=-1 must be >= 0",
    (
        "dataset.batch_size=0",
    ): "dataset.batch_size=0 is the global batch and must be a positive multiple of the number of "
    "processes (1); set dataset.batch_size to a multiple of 1",
    ("loader.prefetch_queue_depth=0",): "loader.prefetch_queue_depth=0 must be an integer >= 1",
    ("loader.prefetch_factor=0",): "loader.prefetch_factor=0 must be an integer >= 1",
    ("loader.steps_per_epoch=0",): "loader.steps_per_epoch=0 must be an integer >= 1",
    ("loader.val_steps=0",): "loader.val_steps=0 must be an integer >= 1",
    # model (emca/models/config.py)
    (
        "backbone.name=resnet7",
    ): "backbone.name='resnet7' must be one of resnet18, resnet34, resnet50, resnet101, resnet152",
    ("attention=se", "attention.se_reduction=0"): "attention.se_reduction=0 must be an integer >= 1",
    (
        "attention=eca",
        "attention.eca_kernel=big",
    ): "attention.eca_kernel='big' must be 'adaptive', one value for every stage or a list of one per stage",
    ("attention=bam", "attention.bam_combine=prod"): "attention=bam: BAM's combine must be one of ('sum', 'product'), "
    "got 'prod' (with attention.bam_reduction=16, attention.bam_dilation=4, attention.bam_combine='prod')",
    ("attention=epsa", "attention.integration=first"): "integration=first applies to branch attention, but epsa "
    "sits at block (see its table entry): leave attention.integration unset",
}


@pytest.mark.parametrize("overrides", list(TRAIN_OPTION_ERRORS), ids=" ".join)
def test_train_refuses_each_impossible_option_in_its_own_words(overrides, compose_train, tmp_path):
    with pytest.raises(RunAborted) as error:
        train(compose_train(*SYNTHETIC_RUN, *overrides), str(tmp_path))
    assert str(error.value) == TRAIN_OPTION_ERRORS[overrides]
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "override, line",
    [
        ("trainer.epochs=0", "trainer.epochs=0 must be an integer >= 1"),  # was blamed on warmup_epochs
        ("optimizer.lr=-1", "optimizer.lr=-1.0 must be > 0"),  # was torch's 'Invalid learning rate: -0.25'
        ("optimizer.weight_decay=-1", "optimizer.weight_decay=-1.0 must be >= 0"),  # was accepted
        ("optimizer.label_smoothing=2", "optimizer.label_smoothing=2.0 must be in [0, 1)"),  # was a traceback
    ],
)
def test_train_py_exits_1_with_one_line_naming_the_option(override, line, run_script, tmp_path):
    run_dir = tmp_path / "run"
    done = run_script("train.py", *SYNTHETIC_RUN, override, f"hydra.run.dir={run_dir}", env={"OMP_NUM_THREADS": "1"})
    output = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in output
    option = override.split("=")[0]
    naming = [text for text in output.splitlines() if option in text]
    assert len(naming) == 1 and naming[0].endswith(f"[ERROR] - {line}"), output[-2000:]
    assert "warmup_epochs" not in output and not (run_dir / "checkpoints").exists()


def test_train_py_resuming_from_a_folder_says_so_and_names_the_file(run_script, tmp_path):
    done = run_script("train.py", *SYNTHETIC_RUN, f"trainer.resume={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}",
                      env={"OMP_NUM_THREADS": "1"})
    output = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in output and "does not exist" not in output
    [line] = [text for text in output.splitlines() if "ERROR" in text]
    assert line.endswith(f"trainer.resume={tmp_path} is a folder, not a checkpoint file; give the file, e.g. "
                         f"{tmp_path / 'checkpoints' / LAST}")


# ----------------------------------------------------------------------------- load_checkpoint
def test_a_folder_given_as_a_checkpoint_names_the_file_inside(tmp_path):
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path, option="checkpoint")
    assert (
        str(error.value)
        == f"checkpoint={tmp_path} is a folder, not a checkpoint file; give the file, e.g. "
           f"{tmp_path / 'checkpoints' / LAST}"
    )
    torch.save({"fingerprint": {}}, tmp_path / LAST)  # the checkpoints folder itself
    with pytest.raises(CheckpointError, match=f"give the file, e.g. {tmp_path / LAST}$"):
        load_checkpoint(tmp_path)


def _damaged(path):
    buffer = io.BytesIO()
    torch.save({"fingerprint": {}, "weights": torch.zeros(1000)}, buffer)
    path.write_bytes(buffer.getvalue()[:500])


@pytest.mark.parametrize(
    "content", [None, b"", b"not a checkpoint\n", bytes(2000)], ids=["truncated", "empty", "text", "zeros"]
)
def test_a_damaged_checkpoint_says_so_and_names_the_sibling_that_may_be_intact(content, tmp_path):
    last = tmp_path / LAST
    _damaged(last) if content is None else last.write_bytes(content)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(last)
    assert (
        str(error.value) == f"checkpoint {last} cannot be read: it is damaged (truncated or not a PyTorch checkpoint)"
    )
    torch.save({"fingerprint": {}}, tmp_path / BEST)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(last)
    assert str(error.value).endswith(f"checkpoint); {tmp_path / BEST} may be intact") and "weights_only" not in str(
        error.value
    )


def test_a_damaged_best_hard_linked_to_last_is_not_called_intact(tmp_path):
    _damaged(tmp_path / LAST)
    (tmp_path / BEST).hardlink_to(tmp_path / LAST)  # the last epoch was the best: one file, two names
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path / BEST)
    assert str(error.value).endswith("(truncated or not a PyTorch checkpoint)")


def test_load_checkpoint_without_a_fingerprint_reads_any_train_py_checkpoint(tmp_path):
    def fingerprint(attention):
        return {"architecture": {"backbone": "resnet18", "attention": attention, "coverage": None, "num_classes": 10}}

    torch.save({"fingerprint": fingerprint("se"), "epoch": 3}, tmp_path / LAST)
    assert load_checkpoint(tmp_path / LAST)["epoch"] == 3  # eval.py's read, before its model exists
    with pytest.raises(CheckpointError, match="refusing checkpoint"):
        load_checkpoint(tmp_path / LAST, fingerprint("eca"))


# ----------------------------------------------------------------------------- the helpers
def test_messages_show_values_as_written_on_the_command_line():
    from omegaconf import OmegaConf

    assert shown(OmegaConf.create([0.6, 0.3])) == "[0.6, 0.3]" and shown(None) == "null" and shown(True) == "true"
    with pytest.raises(ValueError, match=r"^optimizer\.lr=-1\.0 must be > 0$"):
        require(False, "optimizer.lr", -1.0, "> 0")
    for value in (True, 2.5, "3", -1):
        with pytest.raises(ValueError, match="must be an integer >= 0"):
            require_int("speed.workers", value, 0)
    require_int("speed.single_images", None, 1, nullable=True)


def test_model_options_from_a_checkpoints_plain_config():
    check_model_options({"name": "resnet18"}, {"name": "eca", "eca_kernel": [3, 5, 5, 7], "se_reduction": 16})
    with pytest.raises(ValueError, match=r"^attention\.eca_kernel='big' must be 'adaptive'"):
        check_model_options({"name": "resnet18"}, {"eca_kernel": "big"})  # not read as the list of sizes b, i, g
