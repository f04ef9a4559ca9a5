"""scripts/publish.py: a run trained here (the Quickstart's digits, 2 epochs of 3 steps) and measured
by eval.py (accuracy_only=true) is published; the folder holds what timm and the Hub read, and it
loads back offline through timm (local-dir:, and the weights file with pretrained_cfg_overlay) and
emca.load_model, each giving eval.json's top-1 on the same validation images, exactly. Then the card
without eval.py's figures (the script's options, composed by Hydra), one-line refusals, and push=
with huggingface_hub's HfApi replaced by a recorder (no network here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from emca.analysis.publish import PublishError, publish_run, push_folder

from conftest import QUICK_RUN, REPO_ROOT

spec = importlib.util.spec_from_file_location("publish_script", REPO_ROOT / "scripts" / "publish.py")
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def run(tmp_path_factory, compose_train, run_script, one_torch_thread) -> Path:
    """The run folder, with the .hydra records train.py writes and eval.py's eval.json of best.pt."""
    from emca.engine.trainer import train

    folder = tmp_path_factory.mktemp("run")
    cfg = compose_train(*QUICK_RUN)
    records = {"config.yaml": OmegaConf.to_yaml(cfg), "overrides.yaml": OmegaConf.to_yaml(list(QUICK_RUN))}
    train(cfg, str(folder), records)
    result = run_script("eval.py", f"checkpoint={folder}/checkpoints/best.pt", "accuracy_only=true", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-2000:]
    return folder


@pytest.fixture(scope="module")
def published(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("published") / "model"
    lines = publish_run(run, out)
    assert lines[0].startswith(f"wrote     {out}") and "emca_eca_resnet18" in lines[1]
    return out


def eval_top1(model: torch.nn.Module, checkpoint: Path) -> tuple[float, torch.Tensor]:
    """Top-1 of `model` on the validation images as eval.py reads them for `checkpoint` (its data and
    precision options, composed from configs/eval.yaml), and its logits of the first batch."""
    from emca.analysis.checkpoint_eval import data_configs, precision, read_checkpoint, validation_data
    from emca.engine.distributed import setup_distributed
    from emca.engine.tasks.classification import evaluate

    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        cfg = compose("eval", overrides=[f"checkpoint={checkpoint}"])
    state = read_checkpoint(checkpoint)
    _, amp_dtype, channels_last = precision(cfg, state["config"]["trainer"])
    ctx = setup_distributed("cpu", device_option="device")
    seed = state["config"]["trainer"]["seed"]
    data = validation_data(state, *data_configs(state["config"], cfg), ctx, channels_last, seed)
    images = next(iter(data.val))[0]
    with torch.no_grad():
        logits = model.eval()(images)
    return evaluate(model, data.val, ctx, [0], amp_dtype)[0].top1, logits


def test_the_folder_holds_timms_layout_and_the_card(run, published):
    import timm
    from huggingface_hub import ModelCard
    from safetensors import safe_open
    from timm.models._hub import load_model_config_from_path

    assert {path.name for path in published.iterdir()} == {
        "model.safetensors", "config.json", "README.md", "training_curve.png", "config.yaml", "results.json",
        "train.log"}
    config = json.loads((published / "config.json").read_text())
    # As timm reads it back for local-dir: (and hf-hub:): the run's validation transform and model options.
    pretrained_cfg, name, model_args = load_model_config_from_path(published)
    assert name == "emca_eca_resnet18" and timm.is_model(name)
    assert model_args == config["model_args"] and model_args["num_classes"] == 10
    assert model_args["coverage"] == {"stages": 1, "blocks": "all"} and model_args["eca_kernel"] == "adaptive"
    assert pretrained_cfg["input_size"] == [3, 16, 16] and pretrained_cfg["crop_pct"] == 1.0
    assert pretrained_cfg["interpolation"] == "bilinear" and pretrained_cfg["crop_mode"] == "center"
    assert pretrained_cfg["mean"] == [77.9 / 255] * 3 and pretrained_cfg["std"] == [82.5 / 255] * 3
    assert pretrained_cfg["label_names"] == [str(digit) for digit in range(10)]
    assert config["emca"]["weights"] == "trained" and config["emca"]["epoch"] == 1
    with safe_open(published / "model.safetensors", "pt") as weights:
        assert weights.metadata() == {"format": "pt"}
        stored = {key: weights.get_tensor(key) for key in weights.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    trained = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert stored.keys() == trained.keys() and all(torch.equal(stored[key], trained[key]) for key in trained)

    card = ModelCard.load(published / "README.md")
    assert card.data.library_name == "timm" and card.data.license == "apache-2.0"
    assert card.data.datasets == ["digits"] and "emca_eca" in card.data.tags
    evaluation = json.loads((run / "eval.json").read_text())
    assert f"| top-1 (%) | {evaluation['val']['top1']:.2f} |" in card.text
    assert "python train.py +experiment=digits_quick trainer.max_steps_per_epoch=3" in card.text
    assert "Table 4, R-18 EMCA-ECA" in card.text and "not set beside a run on digits at 16 px" in card.text
    assert (published / "config.yaml").read_text() == (run / ".hydra" / "config.yaml").read_text()
    # The copy keeps the run's time: make_tables, finding the run twice, reads it from the run folder.
    assert (published / "results.json").stat().st_mtime == (run / "results.json").stat().st_mtime
    assert (published / "training_curve.png").read_bytes().startswith(b"\x89PNG")


def test_timm_and_emca_load_it_back_with_eval_jsons_top1(run, published):
    import timm

    import emca.models  # registers emca_* with timm (and binds emca, whose load_model is tested too)
    from emca.analysis.checkpoint_eval import read_checkpoint, restore_model
    from emca.common.checkpoint_file import CheckpointError

    expected = json.loads((run / "eval.json").read_text())["val"]["top1"]
    checkpoint = run / "checkpoints" / "best.pt"
    # The digits run's 6 steps leave top-1 near chance: the logits, the same to the bit, say more.
    reference = eval_top1(restore_model(checkpoint, read_checkpoint(checkpoint)), checkpoint)[1]
    config = json.loads((published / "config.json").read_text())
    by_folder = timm.create_model(f"local-dir:{published}", pretrained=True)
    by_file = timm.create_model(config["architecture"], pretrained=True, **config["model_args"],
                                pretrained_cfg_overlay=dict(file=str(published / "model.safetensors"), num_classes=10))
    model, transform = emca.load_model(published)
    labels = list("0123456789")
    assert list(by_folder.pretrained_cfg["label_names"]) == list(model.pretrained_cfg["label_names"]) == labels
    assert model.pretrained_cfg["crop_pct"] == by_folder.pretrained_cfg["crop_pct"] == 1.0
    assert transform.prep.val_image_size == 16 and transform.prep.mean == (77.9,) * 3
    for loaded in (by_folder, by_file, model):
        top1, logits = eval_top1(loaded, checkpoint)
        assert top1 == expected and torch.equal(logits, reference)
    with pytest.raises(CheckpointError, match="holds the trained weights of its run .* drop ema=True"):
        emca.load_model(published, ema=True)


def test_published_without_eval_py_figures_through_the_scripts_options(run, tmp_path):
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        cfg = compose("publish", overrides=[f"run={run}", f"out={tmp_path / 'last'}", "checkpoint=last.pt",
                                            "require_eval=false", "license=mit", "datasets=[sklearn-digits]"])
    script.publish(cfg)
    card = (tmp_path / "last" / "README.md").read_text()
    assert "license: mit" in card and "- sklearn-digits" in card
    assert "Not measured by `eval.py` (published with `require_eval=false`)" in card
    epoch = json.loads((run / "results.json").read_text())["final"]
    assert f"| top-1 (%) | {epoch['val_top1']:.2f} |" in card
    assert json.loads((tmp_path / "last" / "config.json").read_text())["emca"]["epoch"] == 2


def refusal(**options) -> str:
    with pytest.raises(PublishError) as raised:
        publish_run(**options)
    assert "\n" not in str(raised.value)
    return str(raised.value)


def test_what_cannot_be_published_is_refused_in_one_line(run, tmp_path):
    assert "no completed run (no results.json" in refusal(run_dir=tmp_path, out=tmp_path / "out")
    detection = tmp_path / "detection"
    detection.mkdir()
    (detection / "results.json").write_text(json.dumps({"task": "detection"}))
    assert "not a timm classifier" in refusal(run_dir=detection, out=tmp_path / "out")
    assert "holds no EMA weights" in refusal(run_dir=run, out=tmp_path / "out", ema=True)
    assert "drop ema=true" in refusal(run_dir=run, out=tmp_path / "out", ema=True)
    message = refusal(run_dir=run, out=tmp_path / "out", checkpoint="last.pt")
    assert f"has no eval_last.json: run `python eval.py checkpoint={run}/checkpoints/last.pt`" in message
    assert "require_eval=false" in message
    stale = run / "eval_last.json"  # best.pt's report under last.pt's name: of epoch 1, last.pt holds 2
    stale.write_text((run / "eval.json").read_text())
    try:
        assert "measured epoch 1's last.pt, which now holds epoch 2" in refusal(
            run_dir=run, out=tmp_path / "out", checkpoint="last.pt")
    finally:
        stale.unlink()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert "holds files scripts/publish.py does not write (notes.txt)" in refusal(run_dir=run, out=tmp_path / "busy")
    assert "is the run folder" in refusal(run_dir=run, out=run)


class RecordingHub:
    """huggingface_hub.HfApi's two calls that push_folder makes, recorded; `fail`: the upload raises it."""

    calls: list = []
    fail: Exception | None = None

    def __init__(self, **kwargs):
        self.calls.append(("HfApi", kwargs))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return type("RepoUrl", (), {"repo_id": repo_id, "url": f"https://huggingface.co/{repo_id}"})()

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        if self.fail is not None:
            raise self.fail
        return type("CommitInfo", (), {"commit_url": "https://huggingface.co/commit/1"})()


def test_push_uploads_the_folder_or_says_why_not_in_one_line(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHub)
    monkeypatch.setattr(RecordingHub, "calls", [])
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    line = push_folder(tmp_path, "someone/emca-eca-r18", private=True)
    assert line == f"pushed    {tmp_path} to https://huggingface.co/someone/emca-eca-r18 (https://huggingface.co/commit/1)"
    assert RecordingHub.calls == [
        ("HfApi", {"token": "hf_test", "library_name": "emca-train"}),
        ("create_repo", "someone/emca-eca-r18", {"private": True, "exist_ok": True}),
        ("upload_folder", {"repo_id": "someone/emca-eca-r18", "folder_path": str(tmp_path),
                           "commit_message": "Publish an EMCA-Train run"}),
    ]
    later = f"upload it later with `hf upload someone/emca-eca-r18 {tmp_path}`"
    monkeypatch.setattr(RecordingHub, "fail", ConnectionError("Name or service not known"))
    with pytest.raises(PublishError, match="the upload failed .ConnectionError: Name or service not known.") as raised:
        push_folder(tmp_path, "someone/emca-eca-r18")
    assert str(raised.value).endswith(later)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(PublishError, match="no Hugging Face token .set HF_TOKEN or run `hf auth login`.") as raised:
        push_folder(tmp_path, "someone/emca-eca-r18")
    assert str(raised.value).endswith(later) and "\n" not in str(raised.value)


def test_a_run_measured_as_the_papers_were_is_set_beside_its_row(run, published):
    """The card of the same model trained on ImageNet at 224 px (its records edited so): the paper's
    Table 4 column beside ours, where the figures compare."""
    from emca.analysis.model_card import Card, model_card
    from emca.analysis.publish import paper_row

    config = json.loads((published / "config.json").read_text())
    config["pretrained_cfg"].update(input_size=[3, 224, 224], crop_pct=0.875)
    results = {**json.loads((run / "results.json").read_text()), "dataset": "imagenet", "image_size": 224}
    evaluation = {"created": "today", "dataset": {"num_val": 50000}, "device": "cuda (NVIDIA H100)", "params": 11690000,
                  "speed": {"device": "NVIDIA H100"}}
    figures = {"top1": 71.1, "top5": 90.0, "top1_rot90": 40.0, "params": 11.148, "gflops": 1.695, "fps": 400.0}
    text = model_card(Card(config, results, evaluation, "eval.json", figures, paper_row(results["config"]), (), None,
                           "backbone: {}\n", None, "apache-2.0", ["imagenet-1k"], "someone/emca-eca-r18"))
    assert "| metric | this run | paper: Table 4, R-18 EMCA-ECA |" in text
    assert "| top-1 (%) | 71.10 | 71.04 |" in text and "| top-1 90° (%) | 40.00 | – |" in text
    assert "| #P (M) | 11.148 | 11.148 |" in text and "| FPS (batch 1) | 400 | 170 |" in text
    assert "Speeds on NVIDIA H100; the paper's on the authors' Titan XP machines." in text
    assert 'timm.create_model("hf-hub:someone/emca-eca-r18", pretrained=True)' in text
