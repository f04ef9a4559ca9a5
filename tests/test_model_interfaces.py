"""A trained model outside the framework: timm's conventions (features_only, forward_intermediates,
in_chans, drop_rate / drop_path_rate, global_pool, reset_classifier, grad checkpointing,
group_matcher, one-line errors, checkpoints of ours through timm's loaders) and emca.load_model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import emca
from emca.common.checkpoint_file import CheckpointError
from emca.models import WeightsMismatchError

from conftest import QUICK_RUN

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def seeded(name: str, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


def stage_outputs(model, x: torch.Tensor, modules: list[str]) -> list[torch.Tensor]:
    """The classification model's activations at the named modules (forward hooks)."""
    taken = {}
    handles = [model.get_submodule(name).register_forward_hook(lambda m, i, out, name=name: taken.update({name: out}))
               for name in modules]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return [taken[name] for name in modules]


# ----------------------------------------------------------------------------- features
@pytest.mark.parametrize("name, channels, modules", [
    ("emca_se_resnet50", [256, 512, 1024, 2048], ["layer1", "layer2", "layer3", "layer4"]),
    ("emca_eca_resnet18", [64, 128, 256, 512], ["layer1", "layer2", "layer3", "layer4"]),
    ("emca_resnet18", [64, 128, 256, 512], ["layer1", "layer2", "layer3", "layer4"]),
    # BAM sits after stages 1-3: those features are taken after it.
    ("emca_resnet18_bam", [64, 128, 256, 512], ["stage_attn.0", "stage_attn.1", "stage_attn.2", "layer4"]),
])
def test_features_only_gives_the_classification_models_stage_outputs(name, channels, modules):
    model = seeded(name)
    features = seeded(name, features_only=True, out_indices=(1, 2, 3, 4))
    trained = {key: value for key, value in model.state_dict().items() if not key.startswith("fc.")}
    features.model.load_state_dict(trained)  # the same weights whatever the seed did
    info = features.feature_info
    assert info.channels() == channels and info.reduction() == [4, 8, 16, 32] and info.module_name() == modules
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = features(x)
    expected_shapes = [(2, c, 64 // r, 64 // r) for c, r in zip(channels, [4, 8, 16, 32], strict=True)]
    assert [tuple(m.shape) for m in maps] == expected_shapes
    for got, expected in zip(maps, stage_outputs(model, x, modules), strict=True):
        assert torch.equal(got, expected)


def test_forward_intermediates_mirror_timms_resnet():
    model = seeded("emca_se_resnet18")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert [t.shape[1] for t in intermediates] == [64, 64, 128, 256, 512]  # the stem, then each stage
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        early = model.forward_intermediates(x, indices=[1, 2], stop_early=True, intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(last_two, intermediates[3:], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(early, intermediates[1:3], strict=True))
    # timm's other feature wrapper runs the whole model with hooks: the same maps.
    hooked = seeded("emca_se_resnet18", features_only=True, out_indices=(1, 2, 3, 4), feature_cls="hook")
    hooked.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(hooked(x), intermediates[1:], strict=True))


def test_feature_wrappers_that_would_miss_emcas_links_are_refused_in_one_line():
    # ('fx' traces the whole forward, and serves every model: tests/test_fx.py)
    for name, missed in (("emca_se_resnet18", "EMCA's descriptors"), ("emca_resnet18_bam", "BAM's stage_end")):
        for feature_cls in ("list", "dict"):
            with pytest.raises(ValueError, match=f"feature_cls='{feature_cls}' runs the children .*{missed}") as error:
                timm.create_model(name, features_only=True, feature_cls=feature_cls)
            assert "\n" not in str(error.value)
    # A plain ResNet is a chain of its children: timm's FeatureListNet gives the same maps.
    listed, plain = seeded("emca_resnet18", features_only=True, feature_cls="list"), seeded("emca_resnet18")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = plain.forward_intermediates(x, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(listed(x), expected, strict=True))


# ----------------------------------------------------------------------------- training options
def test_drop_path_changes_training_outputs_but_not_eval_outputs():
    base, dropped = seeded("emca_se_resnet18"), seeded("emca_se_resnet18", drop_path_rate=0.3)
    rates = [block.drop_path.drop_prob if block.drop_path is not None else 0.0
             for stage in dropped._stages for block in stage]
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.3) and rates == sorted(rates)  # timm's linear rule
    assert all(block.drop_path is None for stage in base._stages for block in stage)  # off by default
    with_dropout = seeded("emca_se_resnet18", drop_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(base(x), dropped(x)) and torch.equal(base(x), with_dropout(x))
        base.train(), dropped.train()
        torch.manual_seed(1)
        assert not torch.allclose(base(x), dropped(x))


@pytest.mark.parametrize("attention", ["emca_se", "se"])  # per-block checkpoints | timm's checkpoint_seq
def test_grad_checkpointing_gives_the_same_gradients(attention, monkeypatch):
    model = seeded("emca_resnet18", attention=attention).train()
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing()
    segments = []
    recompute = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda function, *args, **kwargs: segments.append(1) or recompute(function, *args, **kwargs))
    x = torch.randn(2, 3, 32, 32)
    for net in (model, checkpointed):
        net(x).square().sum().backward()
    assert len(segments) == 8  # one per block
    for (name, a), b in zip(model.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_head_and_input_options():
    model = seeded("emca_se_resnet18", num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    assert model.num_features == 512 and model.get_classifier() is model.fc
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_classifier(0)
        assert model(x).shape == (2, 512) and torch.equal(model(x), pooled)
        model.reset_classifier(7, "catavgmax")
        assert model(x).shape == (2, 7) and model.fc.in_features == 1024
    assert model.architecture()["num_classes"] == 7
    assert seeded("emca_se_resnet18", num_classes=0, global_pool="max")(x).shape == (2, 512)
    grey = seeded("emca_se_resnet18", in_chans=1, num_classes=3)
    assert grey.conv1.weight.shape == (64, 1, 7, 7) and grey(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    assert model.pretrained_cfg["classifier"] == "fc" and model.default_cfg is model.pretrained_cfg


def test_group_matcher_orders_stem_blocks_and_head():
    from timm.models import group_parameters

    model = seeded("emca_resnet18_bam", num_classes=3)
    groups = group_parameters(model, model.group_matcher(coarse=True))
    assert len(groups) == 6 and groups[0][0] == "conv1.weight" and groups[5] == ["fc.weight", "fc.bias"]
    assert any(name.startswith("stage_attn.0.") for name in groups[1])  # BAM with the stage it follows
    assert len(group_parameters(model, model.group_matcher())) == 1 + 8 + 1


def test_unknown_keyword_and_pretrained_are_one_line_errors():
    with pytest.raises(TypeError) as error:
        timm.create_model("emca_se_resnet18", drop_path=0.1)
    message = str(error.value)
    assert "\n" not in message and "'drop_path'" in message
    assert all(name in message for name in ("drop_path_rate", "in_chans", "se_reduction", "features_only"))
    with pytest.raises(ValueError, match="no pretrained EMCA-ResNet weights") as error:
        timm.create_model("emca_se_resnet18", pretrained=True)
    assert "\n" not in str(error.value)
    assert timm.models.get_pretrained_cfg("emca_se_resnet50").input_size == (3, 224, 224)


# ----------------------------------------------------------------------------- a trained run
@pytest.fixture(scope="module")
def trained(tmp_path_factory, compose_train):
    """An EMCA-SE ResNet-18 trained a step on an ImageFolder tree of non-square images (validation
    resizes and crops them), and its best.pt."""
    from emca.engine.trainer import train

    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (30, 41, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    run = tmp_path_factory.mktemp("run")
    train(compose_train(*QUICK_RUN, "attention=emca_se", "dataset=imagefolder", f"dataset.root={root}",
                        "dataset.image_size=16", "dataset.val_resize=20", "dataset.batch_size=4",
                        "trainer.epochs=1", "trainer.max_steps_per_epoch=1"), str(run))
    return run / "checkpoints" / "best.pt"


def test_load_model_builds_the_runs_model_and_its_validation_transform(trained):
    from emca.analysis.checkpoint_eval import read_checkpoint, restore_model
    from emca.analysis.gradcam import validation_images
    from emca.data import build_loaders

    model, transform = emca.load_model(trained)
    state = read_checkpoint(trained)
    reference = restore_model(trained, state).eval()
    assert not model.training and model.architecture() == reference.architecture()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert model.pretrained_cfg["label_names"] == ("a", "b") and model.pretrained_cfg["input_size"] == (3, 16, 16)

    # The transform of each validation file is the torchvision loader's tensor for it.
    dataset = state["config"]["dataset"]
    data = build_loaders({**dataset, "batch_size": 8, "workers": 0}, {"name": "torchvision"}, train=False,
                         classes=state["classes"])
    data.val.set_epoch(0)
    batch = torch.cat([images for images, _ in data.val])
    paths = validation_images(dataset, state["classes"]).paths
    assert batch.shape == (4, 3, 16, 16)
    assert torch.equal(torch.stack([transform(path) for path in paths]), batch)
    with Image.open(paths[0]) as image:
        assert torch.equal(transform(image), batch[0])


def test_timms_loaders_read_a_checkpoint_of_ours(trained):
    model, _ = emca.load_model(trained)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        by_file = timm.create_model("emca_se_resnet18", pretrained=True, pretrained_cfg_overlay=dict(file=str(trained)))
        assert by_file.num_classes == 2 and torch.equal(by_file.eval()(x), expected)  # its classes by default
        by_path = timm.create_model("emca_se_resnet18", num_classes=2, checkpoint_path=str(trained)).eval()
        assert torch.equal(by_path(x), expected)
        features = timm.create_model("emca_se_resnet18", features_only=True, pretrained=True,
                                     pretrained_cfg_overlay=dict(file=str(trained))).eval()
        assert torch.equal(features(x)[-1], model.forward_features(x))
        head = timm.create_model("emca_se_resnet18", num_classes=5, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(trained)))  # fine-tuning: a new classifier
        assert head.fc.out_features == 5 and torch.equal(head.layer4[0].conv1.weight, model.layer4[0].conv1.weight)

    ours = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(trained)))
    refusals = [
        (CheckpointError, dict(model_name="emca_eca_resnet18", **ours), "it holds resnet18 / attention emca_se"),
        (CheckpointError, dict(model_name="emca_se_resnet18", se_reduction=4, **ours), "its weights differ"),
        (WeightsMismatchError, dict(model_name="emca_eca_resnet18", num_classes=2, checkpoint_path=str(trained)),
         "these weights do not fit resnet18 / attention emca_eca"),
        (CheckpointError, dict(model_name="emca_se_resnet18", pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(trained.with_name("none.pt")))), "does not exist"),
    ]
    for error, kwargs, expected in refusals:
        with pytest.raises(error, match=expected) as raised:
            timm.create_model(**kwargs)
        assert "\n" not in str(raised.value)


def test_load_model_errors_are_one_line(trained, tmp_path):
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(trained.read_bytes()[:1000])
    weights_only = tmp_path / "weights.pt"
    torch.save({"model": {}}, weights_only)
    cases = {
        tmp_path / "missing.pt": "does not exist",
        damaged: "it is damaged",
        weights_only: "emca.load_model needs a checkpoint written by train.py",
    }
    for path, expected in cases.items():
        with pytest.raises(CheckpointError, match=expected) as raised:
            emca.load_model(path)
        assert "\n" not in str(raised.value)
    with pytest.raises(CheckpointError, match="holds no EMA weights .* use ema=False"):
        emca.load_model(trained, ema=True)
