"""Checkpoints: atomic under a crash or a kill, refused for another architecture, RNG round trip."""

import io
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from emca.engine.checkpoint import CheckpointError, architecture_fingerprint, load_checkpoint, save_checkpoint
from emca.engine.reproducibility import rng_state, set_rng_state
from emca.models import build_model


def tiny_model(attention="emca_eca", coverage=None, num_classes=10):
    coverage = coverage or {"stages": 1, "blocks": "all"}
    return build_model({"name": "resnet18"}, {"name": attention, "integration": "first"}, coverage, num_classes=num_classes)


def test_a_crash_during_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model = tiny_model()
    fingerprint = architecture_fingerprint(model)
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint({"fingerprint": fingerprint, "model": model.state_dict(), "epoch": 1}, path)

    real_save = torch.save

    def crash_half_way(obj, file, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        file.write(buffer.getvalue()[: buffer.tell() // 2])
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"fingerprint": fingerprint, "model": model.state_dict(), "epoch": 2}, path)
    monkeypatch.undo()

    assert load_checkpoint(path, fingerprint)["epoch"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # the partial temp file is gone


KILLED_WRITER = textwrap.dedent(
    """
    import sys
    import torch
    from emca.engine.checkpoint import save_checkpoint
    path = sys.argv[1]
    version = 0
    while True:
        version += 1
        # 64 MB per save, all equal to the version: a torn file would show mixed values.
        save_checkpoint({"fingerprint": {}, "version": version, "weights": torch.full((16 * 1024 * 1024,), float(version))}, path)
        print(version, flush=True)
    """
)


def test_a_kill_during_save_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "1"  # the first save is complete
        time.sleep(random.uniform(0.05, 0.3))  # somewhere inside a later save
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        writer.kill()
    state = torch.load(path, weights_only=True)
    assert state["version"] >= 1
    assert torch.equal(state["weights"], torch.full_like(state["weights"], float(state["version"])))
    # The next save clears what the killed writer left behind.
    save_checkpoint({"version": 0}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_checkpoint_of_another_architecture_is_refused_in_one_line(tmp_path):
    path = tmp_path / "last.pt"
    eca = tiny_model("emca_eca")
    save_checkpoint({"fingerprint": architecture_fingerprint(eca), "model": eca.state_dict()}, path)
    assert load_checkpoint(path, architecture_fingerprint(tiny_model("emca_eca")))["model"].keys() == eca.state_dict().keys()

    for other in (tiny_model("emca_se"), tiny_model("emca_eca", {"stages": 1, "blocks": 1}), tiny_model(num_classes=7)):
        with pytest.raises(CheckpointError) as error:
            load_checkpoint(path, architecture_fingerprint(other))
        message = str(error.value)
        assert "\n" not in message and message.startswith(f"refusing checkpoint {path}")
        assert "emca_eca" in message


def test_unreadable_or_missing_checkpoints_are_one_line_errors(tmp_path):
    fingerprint = architecture_fingerprint(tiny_model())
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt", fingerprint)
    truncated = tmp_path / "truncated.pt"
    buffer = io.BytesIO()
    torch.save({"fingerprint": fingerprint, "x": torch.zeros(1000)}, buffer)
    truncated.write_bytes(buffer.getvalue()[:500])
    with pytest.raises(CheckpointError, match="cannot be read") as error:
        load_checkpoint(truncated, fingerprint)
    assert "\n" not in str(error.value)


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = tmp_path / "rng.pt"
    save_checkpoint({"rng": rng_state()}, path)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(path, weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
