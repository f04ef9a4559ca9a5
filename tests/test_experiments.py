"""The experiment presets configs/experiment/table{2,3,4,5}.yaml: each composes with train.yaml and
its sweep expands, exactly as `python train.py -m +experiment=tableN` would, to the variants of
the paper table make_tables prints, with the paper's attention options (ECA's kernel as the authors'
ImageNet code sizes it: tests/test_paper_cells.py); command-line sweeps replace the preset's lists."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

import emca.config  # noqa: F401  (registers the training schema and its resolvers)
from emca.analysis.tables import TABLES
from emca.analysis.variants import emca, variant_from_config
from emca.layers.create_attn import ATTENTIONS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def hydra_configs():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        yield


def sweep_jobs(table: str, *command_line: str) -> list[list[str]]:
    """Each job's overrides, as BasicSweeper forms them: the preset's params, then the command line."""
    preset = compose("train", overrides=[f"+experiment={table}"], return_hydra_config=True)
    params = [f"{key}={value}" for key, value in preset.hydra.sweeper.params.items()]
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    [jobs] = BasicSweeper.split_arguments(
        parser.parse_overrides(params + [f"+experiment={table}", *command_line]), None
    )
    return jobs


def job_variants(jobs: list[list[str]]) -> list:
    return [variant_from_config(compose("train", overrides=job)) for job in jobs]


@pytest.mark.parametrize("table, runs", [("table2", 27), ("table3", 45), ("table4", 21), ("table5", 42)])
def test_preset_sweeps_exactly_the_tables_variants(hydra_configs, table, runs):
    variants = job_variants(sweep_jobs(table))
    assert len(variants) == runs == len(set(variants))
    assert set(variants) == set(TABLES[table].variants())
    assert all(not variant.options for variant in variants)  # the paper's attention options throughout


def test_the_every_method_preset_sweeps_every_attention_on_the_three_backbones(hydra_configs):
    """ca_all: Table 5's preset with every attention of the table; composed on one backbone (the backbone list is
    Table 5's, checked above), 30 jobs rather than 90."""
    assert len(sweep_jobs("ca_all")) == 3 * len(ATTENTIONS)
    variants = job_variants(sweep_jobs("ca_all", "backbone=resnet34"))
    assert len(variants) == len(ATTENTIONS) == len(set(variants)) and not any(v.options for v in variants)
    assert set(variants) == {v for v in TABLES["ca_all"].variants() if v.backbone == "resnet34"}


@pytest.mark.parametrize("table", ["table2", "table3", "table4", "table5"])
def test_presets_size_ecas_kernel_by_the_adaptive_rule(hydra_configs, table):
    """Written out in each preset (docs/paper.md#decisions), and what its ECA jobs build."""
    assert "\n  eca_kernel: adaptive\n" in (CONFIGS / "experiment" / f"{table}.yaml").read_text()
    eca = [job for job in sweep_jobs(table) if "attention=eca" in job or "+experiment/table3=eca_all" in job]
    assert eca and compose("train", overrides=eca[0]).attention.eca_kernel == "adaptive"


@pytest.mark.parametrize("table", ["table3", "ca_all"])
def test_preset_sweep_folder_is_named_after_the_table(hydra_configs, table):
    cfg = compose("train", overrides=[f"+experiment={table}"], return_hydra_config=True)
    assert cfg.hydra.sweep.dir.startswith(f"multirun/{table}/")


def test_command_line_sweeps_replace_the_presets_lists(hydra_configs):
    jobs = sweep_jobs("table3", "backbone=resnet18")
    assert len(jobs) == 15 and {v.backbone for v in job_variants(jobs)} == {"resnet18"}
    jobs = sweep_jobs("table3", "backbone=resnet18,resnet50", "+experiment/table3=glob(emca_se_*)")
    assert {v for v in job_variants(jobs)} == {
        emca(b, "se", c)
        for b in ("resnet18", "resnet50")
        for c in ("none", "prev_stage_last", "prev_stage_all", "all_stages_last")
    }
    jobs = sweep_jobs("table2", "attention=eca", "attention.integration=last")
    assert [(v.attention, v.integration) for v in job_variants(jobs)] == [("eca", "last")] * 3


def test_presets_leave_dataset_and_recipe_to_the_command_line(hydra_configs):
    cfg = compose("train", overrides=["+experiment=table4", "dataset=imagenet", "trainer.epochs=5"])
    assert cfg.dataset.name == "imagenet" and cfg.trainer.epochs == 5 and cfg.optimizer.schedule.value == "step"
