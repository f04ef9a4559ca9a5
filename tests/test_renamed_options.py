"""v0.2's reduction options (se_ratio, gc_ratio) are today's se_reduction / gc_reduction: a checkpoint,
a run folder or a recorded override in the old names still loads, resumes and composes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import emca
import emca.config  # noqa: F401  (registers the schema)
from emca.analysis.variants import variant_from_config
from emca.cli import continued_overrides
from emca.common.checkpoint_file import architecture_fingerprint
from emca.common.renamed_options import upgrade_config, upgrade_override
from emca.engine.compatibility import check_resume_config
from emca.models import build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# A GC model whose bottleneck is not the default's, so that a lost value shows in the weights' shapes.
OVERRIDES = ["backbone=resnet18", "attention=gc", "attention.gc_reduction=8", "dataset.num_classes=10"]


def composed(overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return compose("train", overrides=overrides)


def as_v02(config: dict) -> dict:
    """A resolved config as v0.2 saved it: se_ratio (the same divisor), gc_ratio (its inverse)."""
    attention = dict(config["attention"])
    attention["se_ratio"] = attention.pop("se_reduction")
    attention["gc_ratio"] = 1 / attention.pop("gc_reduction")
    return {**config, "attention": attention}


@pytest.fixture(scope="module")
def current():
    return composed(OVERRIDES)


@pytest.fixture(scope="module")
def v02_config(current) -> dict:
    return as_v02(OmegaConf.to_container(current, resolve=True, enum_to_str=True))


def test_old_names_map_to_the_new_ones():
    old = {"attention": {"name": "gc", "se_ratio": 4, "gc_ratio": 0.0625}, "trainer": {"seed": 1}}
    assert upgrade_config(old) == {"attention": {"name": "gc", "se_reduction": 4, "gc_reduction": 16},
                                   "trainer": {"seed": 1}}
    assert old["attention"]["gc_ratio"] == 0.0625  # the input is left as it was
    assert upgrade_config({"attention": {"gc_ratio": 0.5, "gc_reduction": 8}})["attention"] == {"gc_reduction": 8}
    with pytest.raises(ValueError, match=r"^attention\.gc_ratio=0\.3 \(v0\.2\) has no attention\.gc_reduction"):
        upgrade_config({"attention": {"gc_ratio": 0.3}})
    assert upgrade_override("attention.gc_ratio=0.125") == "attention.gc_reduction=8"
    assert upgrade_override("+attention.se_ratio=8") == "+attention.se_reduction=8"
    assert upgrade_override("attention=gc") == "attention=gc"


def test_a_v02_checkpoint_loads_the_model_it_trained(tmp_path, current, v02_config):
    model = build_model(current.backbone, current.attention, current.coverage, 10)
    assert model.layer2[0].attn.fc1.out_features == 128 // 8
    path = tmp_path / "best.pt"
    torch.save({"config": v02_config, "fingerprint": architecture_fingerprint(model),
                "model": model.state_dict(), "ema": None}, path)
    loaded, _ = emca.load_model(path)
    assert loaded.layer2[0].attn.fc1.out_features == 128 // 8
    for (name, expected), got in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(expected, got), name


def test_a_v02_run_resumes_and_a_real_change_is_still_refused(tmp_path, current, v02_config):
    progress = {"epoch": 1, "step_in_epoch": 0}
    check_resume_config(v02_config, current, tmp_path / "last.pt", progress, tmp_path)
    changed = composed([*OVERRIDES[:-2], "attention.gc_reduction=4", "dataset.num_classes=10"])
    with pytest.raises(ValueError, match=r"attention\.gc_reduction=4 \(the run's: 8\)"):
        check_resume_config(v02_config, changed, tmp_path / "last.pt", progress, tmp_path)


def test_a_v02_run_folders_recorded_overrides_compose(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- attention=gc\n- attention.gc_ratio=0.125\n")
    merged = continued_overrides(tmp_path, ["trainer.resume=auto"])
    assert merged == ["attention=gc", "attention.gc_reduction=8", "trainer.resume=auto"]
    assert composed(merged).attention.gc_reduction == 8


def test_a_v02_run_is_the_same_table_cell(current, v02_config):
    assert variant_from_config(v02_config) == variant_from_config(current)
