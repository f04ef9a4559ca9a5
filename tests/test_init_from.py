"""model.init_from: a new run starts from a torchvision ResNet's state_dict or from one of our
checkpoints; matching tensors are loaded, the rest keep their initialisation, mismatches are one line."""

import pytest
import torch
import torchvision

from emca.common.checkpoint_file import CheckpointError
from emca.models import build_model
from emca.models.initialisation import initialise_from

from conftest import SYNTHETIC_RUN


def emca_resnet18(num_classes=10, attention="emca_eca"):
    return build_model({"name": "resnet18"}, {"name": attention}, {"stages": 1, "blocks": "all"}, num_classes)


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tv") / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def test_a_torchvision_resnet_loads_into_an_emca_resnet_of_its_depth(torchvision_file):
    reference = torch.load(torchvision_file, weights_only=True)
    model = emca_resnet18()
    attention = {name: value.clone() for name, value in model.state_dict().items() if ".attn" in name}
    assert attention  # the EMCA modules have tensors torchvision's ResNet lacks
    done = initialise_from(model, str(torchvision_file), exclude=["fc"])
    state = model.state_dict()
    for name in done.loaded:
        assert torch.equal(state[name], reference[name]), name
    # Everything but the classifier came from the file; the attention modules kept their own.
    assert set(done.loaded) == set(reference) - {"fc.weight", "fc.bias"}
    assert set(done.kept) == set(attention) | {"fc.weight", "fc.bias"}
    assert done.unused == [] and all(torch.equal(state[name], value) for name, value in attention.items())
    assert done.summary().startswith(f"model.init_from={torchvision_file}: {len(reference) - 2} tensors loaded, "
                                     f"{len(attention) + 2} kept their initialisation (")


def test_a_shape_mismatch_is_one_line_naming_the_fix(torchvision_file):
    with pytest.raises(CheckpointError, match=r"fc.weight has shape \[1000, 512\] there but \[10, 512\] in this "
                                              r"model; add model.init_exclude=\[fc\]"):
        initialise_from(emca_resnet18(), str(torchvision_file))


def test_files_that_are_not_weights_are_one_line(tmp_path):
    with pytest.raises(CheckpointError, match=r"model.init_from=.* does not exist"):
        initialise_from(emca_resnet18(), str(tmp_path / "missing.pth"))
    torch.save({"epoch": 3}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="holds no state_dict"):
        initialise_from(emca_resnet18(), str(tmp_path / "other.pt"))
    torch.save({"head.weight": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="has no tensor this model has"):
        initialise_from(emca_resnet18(), str(tmp_path / "foreign.pt"))


def test_a_run_starts_from_another_runs_checkpoint_and_records_it(compose_train, tmp_path):
    from emca.engine.trainer import RunAborted, Trainer, train

    first = train(compose_train(*SYNTHETIC_RUN, "trainer.epochs=1"), str(tmp_path / "first"))
    source = tmp_path / "first" / "checkpoints" / "last.pt"
    weights = torch.load(source, weights_only=True)["model"]
    # Another attention over the same backbone: the backbone comes from the run, SE's modules are new.
    cfg = compose_train(*SYNTHETIC_RUN, "trainer.epochs=1", "attention=emca_se", f"model.init_from={source}")
    results = train(cfg, str(tmp_path / "second"))
    assert results["init_from"]["path"] == str(source) and results["init_from"]["loaded"] > 100
    assert results["init_from"]["kept"] > 0 and first["init_from"] is None
    assert results["config"]["model"]["init_from"] == str(source)
    # The initial weights, before any step: what the file held for every shared plain-ResNet tensor.
    from emca.engine.checkpoint import CheckpointStore
    from emca.engine.distributed import setup_distributed

    trainer = Trainer(cfg, setup_distributed("cpu"), CheckpointStore(tmp_path / "third"), None)
    state = trainer.model.state_dict()
    assert all(torch.equal(state[name], weights[name]) for name in trainer.task.initialisation.loaded)
    assert "layer1.0.conv1.weight" in trainer.task.initialisation.loaded
    with pytest.raises(RunAborted, match="model.init_from=.*missing.pt does not exist"):
        train(compose_train(*SYNTHETIC_RUN, f"model.init_from={tmp_path / 'missing.pt'}"), str(tmp_path / "fourth"))
