"""The config tree: every group option composes against the schema; bad keys and types fail early."""

import shutil
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from emca.config import AmpMode, TrainConfig
from emca.engine.schedule import milestone_epochs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ("backbone", "attention", "coverage", "dataset", "loader", "optimizer", "trainer")


def group_options(group: str) -> list[str]:
    """A group's choices: its YAML files; the attention group's come from the attention table."""
    if group == "attention":
        from hydra.core.config_store import ConfigStore

        import emca.config  # noqa: F401  (registers them)

        return sorted(name.removesuffix(".yaml") for name in ConfigStore.instance().list("attention"))
    return sorted(path.stem for path in (CONFIGS / group).glob("*.yaml"))


def test_the_attention_choices_are_the_tables_names():
    from emca.layers import ATTENTIONS

    assert group_options("attention") == sorted(ATTENTIONS)
    assert not (CONFIGS / "attention").exists()  # one source: no YAML file to fall out of step with the table


@pytest.mark.parametrize("group,option", [(group, option) for group in GROUPS for option in group_options(group)])
def test_every_group_option_composes_and_validates(compose_train, group, option):
    cfg = compose_train(f"{group}={option}")
    # to_object builds the dataclasses: every field present with its declared type.
    typed = OmegaConf.to_object(cfg)
    assert isinstance(typed, TrainConfig)
    assert cfg[group] is not None


def test_every_group_has_options():
    for group in GROUPS:
        assert group_options(group), f"group {group} has no choices"


def test_defaults_are_the_documented_ones(compose_train):
    cfg = compose_train()
    assert (cfg.backbone.name, cfg.attention.name, cfg.coverage.name) == ("resnet18", "emca_eca", "prev_stage_all")
    assert (cfg.dataset.name, cfg.loader.name) == ("digits", "dali")
    assert cfg.trainer.amp is AmpMode.off and cfg.trainer.resume is None
    # trainer.epochs follows the dataset's schedule length unless set.
    assert cfg.trainer.epochs == cfg.dataset.epochs
    assert compose_train("dataset=imagenet").trainer.epochs == 100
    assert compose_train("trainer.epochs=3").trainer.epochs == 3


def test_sgd_paper_is_the_papers_recipe(compose_train):
    cfg = compose_train("optimizer=sgd_paper", "dataset=imagenet")
    opt = cfg.optimizer
    assert (opt.lr, opt.momentum, opt.weight_decay, opt.gamma) == (0.1, 0.9, 1e-4, 0.1)
    assert opt.schedule.value == "step" and opt.warmup_epochs == 0 and opt.label_smoothing == 0.0
    assert list(opt.no_weight_decay) == []
    # lr 0.1 is for the paper's global batch of 256, scaled linearly for other batches.
    assert opt.lr_scale_batch == 256 and cfg.dataset.batch_size == 256
    assert milestone_epochs(opt.milestones, cfg.trainer.epochs) == [30, 60, 90]


@pytest.mark.parametrize(
    "preset",
    sorted(
        str(p.relative_to(CONFIGS / "experiment").with_suffix("")) for p in (CONFIGS / "experiment").rglob("*.yaml")
    ),
)
def test_every_experiment_preset_composes_and_validates(compose_train, preset):
    assert isinstance(OmegaConf.to_object(compose_train(f"+experiment={preset}")), TrainConfig)


def test_experiment_preset_applies_globally(compose_train):
    cfg = compose_train("+experiment=digits_quick")
    assert cfg.loader.name == "torchvision"
    assert cfg.trainer.epochs == 2 and cfg.dataset.image_size == 16


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.epochz=3", "Key 'epochz' not in 'TrainerConfig'"),
        ("optimizer.lr=fast", "could not be converted to Float"),
        ("trainer.amp=fp8", "Invalid value 'fp8'"),
        ("optimizer.no_weight_decay=[bn,everything]", "Invalid value 'everything'"),
        ("dataset.batch_size=1.5", "could not be converted to Integer"),
        ("attention.gatting=residual", "Key 'gatting' not in 'AttentionConfig'"),
    ],
)
def test_misspelt_keys_and_wrong_types_fail_at_composition(compose_train, override, message):
    with pytest.raises(ConfigCompositionException) as error:
        compose_train(override)
    assert message in str(error.value) + str(error.value.__cause__)


def test_a_misspelt_key_inside_a_group_file_fails(tmp_path):
    # A group file with a key that is not a field of its schema fails when it is merged.
    from hydra import compose, initialize_config_dir

    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS, configs)
    (configs / "optimizer" / "typo.yaml").write_text("lr: 0.1\nmomentun: 0.9\n")
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        with pytest.raises(ConfigCompositionException) as error:
            compose("train", overrides=["optimizer=typo"])
    assert "Key 'momentun' not in 'OptimizerConfig'" in str(error.value)


def test_non_zero_ranks_get_a_scratch_run_dir(monkeypatch):
    from emca.config import _run_dir
    from emca.engine.distributed import scratch_run_dir

    monkeypatch.delenv("RANK", raising=False)
    assert _run_dir("outputs/x") == "outputs/x"
    monkeypatch.setenv("RANK", "3")
    assert _run_dir("outputs/x") == scratch_run_dir() and "emca-rank3-" in scratch_run_dir()
