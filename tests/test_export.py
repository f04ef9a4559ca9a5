"""scripts/export.py: every attention kind exports to ONNX and the reloaded file matches PyTorch at two
batch sizes; torch.export programs and TorchScript for a representative subset; the command on a
checkpoint trained here, with its files, printed differences, EMA weights and one-line errors.

Formats x kinds: ONNX (the format the README leads with) for every kind of ATTENTIONS; the
exported_program and torchscript formats for SUBSET (plain, SE, EMCA-ECA, EMCA-SRM, A2-Nets, EPSANet:
both custom autograd poolings, EMCA's shared descriptors, the block-editing methods). An ONNX export
costs 5-10 s of CPU (torch.export, then the ONNX translation), the file about 160 s of CPU (5 min on
the shared 2-core machine). The other two formats pass for every kind too (checked once with torch
2.14.1) but would add a third to that; exported_program saves the very program that the ONNX test of
each kind translates, and the subset holds both poolings that tracing must work around.
Models are resnet18 at 32 px with the backbone's initialisation and the attention's parameters drawn
from N(0, 0.3^2) (conftest.randomise_parameters), which spreads the gates over about (0.1, 0.9): a
zero- or one-initialised gate would be a constant an export could get wrong unnoticed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from emca.analysis.checkpoint_eval import read_checkpoint, restore_model
from emca.cli import OverrideError, check_overrides
from emca.common.checkpoint_file import CheckpointError
from emca.layers import pooling
from emca.layers.create_attn import ATTENTIONS, is_emca
from emca.models import EMCAResNet, build_model

from conftest import REPO_ROOT, SYNTHETIC_RUN, randomise_parameters

spec = importlib.util.spec_from_file_location("export_script", REPO_ROOT / "scripts" / "export.py")
export = importlib.util.module_from_spec(spec)
spec.loader.exec_module(export)

SIZE = 32
TOLERANCE = 1e-4  # configs/export.yaml's
SUBSET = ("none", "se", "emca_eca", "emca_srm", "a2", "epsa")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
# Attentions without parameters of their own: nothing to randomise, their export is checked all the same.
PARAMETER_FREE = ("none", "simam", "ge_theta_minus")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_model(attention: str) -> torch.nn.Module:
    """resnet18 with `attention` (EMCA: covering every earlier block output and the stem), eval mode,
    its attention parameters random."""
    torch.manual_seed(0)
    options = {"name": attention, "include_stem": is_emca(attention)}
    model = build_model({"name": "resnet18"}, options, {"stages": "all", "blocks": "all"}, 10)
    plain = set(EMCAResNet("resnet18", num_classes=10).state_dict())
    added = [p for name, p in model.named_parameters() if name not in plain]
    assert bool(added) != (attention in PARAMETER_FREE)
    randomise_parameters(torch.nn.ParameterList(added), scale=0.3)
    return model.eval().requires_grad_(False)


def check(model, fmt: str, program=None) -> dict[int, float]:
    data = export.export_bytes(model, fmt, SIZE, program=program)
    found, scale = export.differences(model, export.load_runner(fmt, data), SIZE)
    assert sorted(found) == [2, 3]
    assert max(found.values()) <= export.limit(TOLERANCE, scale), (fmt, found, scale)
    return found


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_every_attention_exports_and_matches_pytorch_at_two_batch_sizes(attention):
    model = random_model(attention)
    program = export.export_program(model, SIZE)  # ONNX's capture; exported_program saves it as it is
    check(model, "onnx", program)
    if attention in SUBSET:
        # The same kernels run in both: nothing to differ by but a wrong graph.
        assert check(model, "exported_program", program) == {2: 0.0, 3: 0.0}
        assert check(model, "torchscript") == {2: 0.0, 3: 0.0}


def test_traceable_poolings_are_the_same_computation_and_are_put_back():
    entries = dict(pooling.POOLINGS)
    x = torch.randn(2, 8, 5, 3)
    expected = {name: pooling.pool_descriptor(x, name) for name in entries}
    with export.traceable_poolings():
        assert pooling.POOLINGS["mean"] is not entries["mean"]
        for name in entries:
            assert torch.equal(pooling.pool_descriptor(x, name), expected[name]), name
    assert pooling.POOLINGS == entries


# --------------------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, compose_train) -> Path:
    """The Quickstart's model (resnet18, EMCA-ECA) on 16 px random tensors, 2 epochs of 3 steps, with an EMA."""
    from emca.engine.trainer import train

    run = tmp_path_factory.mktemp("run")
    train(compose_train(*SYNTHETIC_RUN, "trainer.ema.decay=0.6"), str(run))
    return run


def run_export(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/export.py", *overrides], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=400, env={**os.environ, **ONE_THREAD})


def export_options(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        return compose("export", overrides=list(overrides))


def shape_of(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_export_py_writes_an_onnx_file_that_onnxruntime_runs_like_the_checkpoint(tiny_run):
    import onnx
    import onnxruntime

    checkpoint = tiny_run / "checkpoints" / "best.pt"
    done = run_export(f"checkpoint={checkpoint}")
    assert done.returncode == 0, done.stderr
    # In the run folder: checkpoints/ is a generation the trainer replaces as it saves.
    written = tiny_run / "best.onnx"
    assert written.is_file() and not (tiny_run / "checkpoints" / "best.onnx").exists()
    assert f"wrote     {written} (ONNX opset 18" in done.stdout
    assert "input     float32 (batch, 3, 16, 16)" in done.stdout and "output    logits (batch, 10)" in done.stdout
    found = re.search(r"max abs difference (\S+) at batch 2, (\S+) at batch 3 \(limit (\S+)\)", done.stdout)
    assert found, done.stdout
    assert max(float(found[1]), float(found[2])) <= float(found[3]) == TOLERANCE

    proto = onnx.load(written)
    assert [entry.version for entry in proto.opset_import if entry.domain == ""] == [18]
    ((images, image_shape),) = [(v.name, shape_of(v)) for v in proto.graph.input]
    ((logits, logit_shape),) = [(v.name, shape_of(v)) for v in proto.graph.output]
    assert (images, image_shape, logits, logit_shape) == ("images", ["batch", 3, 16, 16], "logits", ["batch", 10])
    # The file on disk, at a batch size the check did not use, against the checkpoint's model.
    state = read_checkpoint(checkpoint)
    model = restore_model(checkpoint, state).eval()
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    session = onnxruntime.InferenceSession(str(written), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": x.numpy()})
    assert (torch.from_numpy(logits) - expected).abs().max() <= export.limit(TOLERANCE, expected.abs().max().item())


def test_the_ema_weights_export_beside_the_trained_ones(tiny_run):
    checkpoint = tiny_run / "checkpoints" / "last.pt"
    lines = export.export_checkpoint(export_options(f"checkpoint={checkpoint}", "format=torchscript", "ema=true"))
    written = tiny_run / "last_ema.torchscript"
    assert lines[0].startswith(f"wrote     {written} (TorchScript, traced") and "EMA weights" in lines[0]
    assert "max abs difference 0.00e+00 at batch 2, 0.00e+00 at batch 3" in lines[-1]
    state = read_checkpoint(checkpoint)
    ema, trained = restore_model(checkpoint, state, ema=True).eval(), restore_model(checkpoint, state).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation
        loaded = torch.jit.load(str(written))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), ema(x)) and not torch.equal(loaded(x), trained(x))
    # Again: replaced, and said so.
    lines = export.export_checkpoint(export_options(f"checkpoint={checkpoint}", "format=torchscript", "ema=true"))
    assert lines[0].startswith(f"replaced  {written}")


def test_an_artefact_that_differs_is_one_line_and_not_written(tiny_run, tmp_path, monkeypatch):
    loader = export.load_runner

    def off_by_a_little(fmt, data):
        run = loader(fmt, data)
        return lambda images: run(images) + 1e-3

    monkeypatch.setattr(export, "load_runner", off_by_a_little)
    target = tmp_path / "model.pt2"
    options = export_options(f"checkpoint={tiny_run / 'checkpoints' / 'best.pt'}", "format=exported_program",
                             f"output={target}")
    with pytest.raises(export.ExportError, match=r"differs from PyTorch by 1\.00e-03 at batch 2, 1\.00e-03 at batch 3 "
                                                 r"\(more than \S+ = tolerance 0\.0001 x \S+\); nothing written"):
        export.export_checkpoint(options)
    assert not target.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("overrides, message", [
    (("format=onnx",), "give the checkpoint to export: python scripts/export.py checkpoint=PATH"),
    (("checkpoint=CKPT", "opset=13"), "opset=13 must be an integer >= 18"),
    (("checkpoint=CKPT", "image_size=0"), "image_size=0 must be an integer >= 1 or null"),
    (("checkpoint=CKPT", "tolerance=0"), "tolerance=0.0 must be a positive number"),
    (("checkpoint=CKPT", "output=FOLDER"), "must be a file path, not a folder"),
])
def test_each_impossible_option_is_one_line_naming_it(tmp_path, overrides, message):
    overrides = [o.replace("CKPT", str(tmp_path / "best.pt")).replace("FOLDER", str(tmp_path)) for o in overrides]
    with pytest.raises(export.ExportError, match=re.escape(message)):
        export.export_checkpoint(export_options(*overrides))


@pytest.mark.parametrize("override, message", [
    ("format=tflite", "format='tflite' must be one of onnx, torchscript, exported_program"),
    ("ema=maybe", "ema='maybe' must be true or false"),
    ("opset=latest", "opset='latest' must be an integer >= 18"),
    ("tolerance=small", "tolerance='small' must be a number"),
])
def test_each_option_of_a_wrong_type_is_one_line_naming_it(override, message):
    # ExportConfig's types, said in one line by emca/cli.py, which export.py runs before Hydra composes.
    with pytest.raises(OverrideError) as error:
        check_overrides(REPO_ROOT / "configs", "export", ["checkpoint=x.pt", override], "scripts/export.py")
    assert str(error.value) == message


def test_export_py_errors_are_one_line_with_status_1(tmp_path):
    missing = run_export(f"checkpoint={tmp_path / 'nowhere.pt'}")
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.count("\n") == 1 and missing.stderr.startswith("error: ")
    assert "nowhere.pt" in missing.stderr
    with pytest.raises(CheckpointError):
        export.export_checkpoint(export_options(f"checkpoint={tmp_path / 'nowhere.pt'}"))
    wrong_type = run_export(f"checkpoint={tmp_path / 'nowhere.pt'}", "format=tflite")  # before the checkpoint is read
    assert (wrong_type.returncode, wrong_type.stdout) == (1, "")
    assert wrong_type.stderr == "error: format='tflite' must be one of onnx, torchscript, exported_program\n"


def test_a_foreign_file_or_missing_ema_weights_is_one_line_naming_export_py(tiny_run, tmp_path):
    foreign = tmp_path / "weights.pt"
    torch.save({"model": {}}, foreign)
    with pytest.raises(export.ExportError, match="scripts/export.py needs a checkpoint written by train.py"):
        export.export_checkpoint(export_options(f"checkpoint={foreign}"))
    state = torch.load(tiny_run / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    without_ema = tmp_path / "best.pt"
    torch.save({**state, "ema": None}, without_ema)
    with pytest.raises(export.ExportError, match="holds no EMA weights .*; drop ema=true"):
        export.export_checkpoint(export_options(f"checkpoint={without_ema}", "ema=true"))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["best.pt", "weights.pt"]
