"""Adding an attention method is its module file plus one entry of the attention table (README,
"Adding an attention method"): done here to a throwaway copy of the package, exactly as the README
says, then trained one step through the real train.py.

The copy holds emca/, train.py and configs/; a toy excitation goes into emca/layers/toy.py and one
AttentionKind into emca/layers/create_attn.py. Nothing else is edited, so everything the table is
said to derive (ATTENTIONS, the timm names, the Hydra `attention` choices, the schema's toy_scale
field, EMCA with the new excitation) must follow from that entry alone.
"""

import json
import os
import shutil
import textwrap

import pytest
import torch

from conftest import REPO_ROOT, SYNTHETIC_RUN

TOY_MODULE = '''\
"""A toy excitation: each channel's mean times a learnable per-channel weight and a fixed scale."""

import torch
from torch import nn


class ToyExcitation(nn.Module):
    def __init__(self, channels: int, scale: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.register_buffer("scale", torch.tensor(float(scale)))  # in the state_dict: the option as built

    def forward(self, descriptor: torch.Tensor) -> torch.Tensor:  # (B, C, 1) mean -> (B, C) logits
        return descriptor.squeeze(-1) * self.weight * self.scale
'''

TOY_IMPORT = "from emca.layers.toy import ToyExcitation\n"
TOY_ENTRY = (
    '    AttentionKind("toy", "Toy", "branch", excitation=ToyExcitation, pooling="mean", options={"scale": 1.0}),\n'
)
# One epoch of one training step (and one validation batch) on 16 px random tensors, CPU, no workers.
ONE_STEP = (*SYNTHETIC_RUN, "trainer.epochs=1", "trainer.max_steps_per_epoch=1",
            # Without weight decay a toy weight can only move by its gradient.
            "optimizer.weight_decay=0")

PROBE = textwrap.dedent('''
    import json
    import emca, emca.layers, emca.models, timm
    print("EMCA_FILE", emca.__file__)
    print("TIMM", json.dumps(timm.list_models("emca_*toy*")))
    print("ATTENTIONS", json.dumps(list(emca.layers.ATTENTIONS)))
''')


def edit_once(text: str, anchor: str, insert: str, before: bool = False) -> str:
    """text with `insert` put just after (or before) its one occurrence of `anchor`."""
    assert text.count(anchor) == 1, f"edit anchor not found exactly once: {anchor!r}"
    return text.replace(anchor, insert + anchor if before else anchor + insert)


@pytest.fixture(scope="module")
def toy_repo(tmp_path_factory):
    """A copy of emca/, train.py and configs/ with the toy method added the README's way."""
    root = tmp_path_factory.mktemp("toy-repo")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("emca", "configs"):
        shutil.copytree(REPO_ROOT / name, root / name, ignore=ignore)
    shutil.copy2(REPO_ROOT / "train.py", root / "train.py")

    # Step 1: the method's module file.
    (root / "emca" / "layers" / "toy.py").write_text(TOY_MODULE)
    # Step 2: one entry of the table (and the import of its module).
    table = root / "emca" / "layers" / "create_attn.py"
    text = table.read_text()
    text = edit_once(text, "from emca.layers.shuffle_attention import shuffle_attention\n", TOY_IMPORT)
    text = edit_once(text, ")\n\nKINDS: dict[str, AttentionKind]", TOY_ENTRY, before=True)
    table.write_text(text)
    assert TOY_IMPORT in table.read_text() and TOY_ENTRY in table.read_text()
    return root


@pytest.fixture(scope="module")
def run_in_copy(toy_repo, run_script):
    """run_in_copy(*args) -> `python *args` from the copy, with the copy first on the path: the repo
    itself is installed in editable mode, and its emca must not be the one imported."""
    path = os.pathsep.join(p for p in (str(toy_repo), os.environ.get("PYTHONPATH")) if p)

    def run(*args: str):
        return run_script(*args, cwd=toy_repo, env={"PYTHONPATH": path}, timeout=180)

    return run


def toy_parameters(state: dict, name: str) -> dict[str, torch.Tensor]:
    return {key: value for key, value in state.items() if key.endswith(f".excitation.{name}")}


def test_the_entry_alone_registers_the_method(run_in_copy, toy_repo):
    done = run_in_copy("-c", PROBE)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert lines["EMCA_FILE"] == str(toy_repo / "emca" / "__init__.py")  # the copy, not the installed repo
    names = json.loads(lines["TIMM"])
    for backbone in ("resnet18", "resnet50"):
        assert f"emca_toy_{backbone}" in names and f"emca_{backbone}_toy" in names
    attentions = json.loads(lines["ATTENTIONS"])
    assert "toy" in attentions and "emca_toy" in attentions


def test_emca_with_the_new_excitation_trains_one_step(run_in_copy, tmp_path):
    run_dir = tmp_path / "emca_toy"
    done = run_in_copy("train.py", *ONE_STEP, "attention=emca_toy", "attention.toy_scale=2.0",
                       f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["model"]["attention"] == "emca_toy"
    state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert state["config"]["attention"]["name"] == "emca_toy"
    assert state["config"]["attention"]["toy_scale"] == 2.0
    assert state["fingerprint"]["architecture"]["attention"] == "emca_toy"

    # EMCA (its default integration: the first block of each of ResNet-18's 4 stages) with the toy
    # excitation as W_m2, built with the option from the command line, and trained: its weights moved.
    weights = toy_parameters(state["model"], "weight")
    assert sorted(key.split(".attn.")[0] for key in weights) == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert all(torch.equal(scale, torch.tensor(2.0)) for scale in toy_parameters(state["model"], "scale").values())
    assert any(not torch.equal(weight, torch.ones_like(weight)) for weight in weights.values())


def test_the_plain_method_trains_and_its_options_are_checked(run_in_copy, tmp_path):
    run_dir = tmp_path / "toy"
    done = run_in_copy("train.py", *ONE_STEP, "attention=toy", f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert state["config"]["attention"]["name"] == "toy" and state["config"]["attention"]["toy_scale"] == 1.0
    # Plain channel attention (no module of its own) in every block, as SE: 2 blocks x 4 stages.
    weights = toy_parameters(state["model"], "weight")
    assert len(weights) == 8 and all(".attn.excitation." in key for key in weights)
    assert any(not torch.equal(weight, torch.ones_like(weight)) for weight in weights.values())

    # The schema has toy_scale and nothing else of the toy's: a misspelt option is refused in one line
    # that names the table's option (emca/cli.py reads the schema the table made).
    refused = run_in_copy("train.py", *ONE_STEP, "attention=toy", "attention.toy_typo=1",
                          f"hydra.run.dir={tmp_path / 'typo'}")
    assert refused.returncode != 0
    assert refused.stderr.splitlines() == [
        "error: attention.toy_typo=1: attention.toy_typo is not an option (did you mean attention.toy_scale?); "
        "`python train.py --cfg job` lists them all"]
    assert not (tmp_path / "typo" / "results.json").exists()
