import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EMCA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real photographs in ../shared/data; tests that need them skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(autouse=True)
def restore_torch_determinism():
    """The trainer sets process-wide determinism flags; leave them as other tests expect them."""
    cudnn = torch.backends.cudnn
    state = torch.are_deterministic_algorithms_enabled(), cudnn.benchmark, cudnn.deterministic
    yield
    torch.use_deterministic_algorithms(state[0])
    cudnn.benchmark, cudnn.deterministic = state[1], state[2]


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's in-process work: the 2-core machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- data fixtures ---------------------------------------------------------------------------

@pytest.fixture
def emca_cache(tmp_path_factory, monkeypatch) -> Path:
    """A fresh EMCA_CACHE (generated digits, image-check cache) private to one test."""
    cache = tmp_path_factory.mktemp("emca-cache")
    monkeypatch.setenv("EMCA_CACHE", str(cache))
    return cache


@pytest.fixture
def image_tree(tmp_path):
    """Factory writing an ImageFolder tree of small noisy JPEGs.

    image_tree({"train": {"a": 3, "b": 2}, "val": {"a": 1}}) -> root. Class i's images are
    dominated by colour channel i % 3, so a label can be checked from the pixels after any crop.
    """
    import numpy as np
    from PIL import Image

    def make(splits: dict, size=(48, 40), root: Path | None = None) -> Path:
        root = root or tmp_path / "tree"
        rng = np.random.default_rng(0)
        for split, classes in splits.items():
            for index, (name, count) in enumerate(sorted(classes.items())):
                folder = root / split / name
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    pixels = rng.integers(0, 60, (size[1], size[0], 3), dtype=np.uint8)
                    pixels[..., index % 3] += 180
                    Image.fromarray(pixels).save(folder / f"{name}_{i}.JPEG", quality=95)
        return root

    return make


# --- trainer fixtures ------------------------------------------------------------------------

# A training run small enough for tests: digits at 16 px, 2 epochs of 3 steps, torchvision loader
# in-process (configs/experiment/digits_quick.yaml plus a shorter epoch).
QUICK_RUN = ("+experiment=digits_quick", "trainer.max_steps_per_epoch=3")
# The same with random tensors instead of images and a one-batch validation, where data do not matter.
SYNTHETIC_RUN = (*QUICK_RUN, "loader=synthetic", "dataset.num_classes=10", "loader.val_steps=1")


def randomise_parameters(module: torch.nn.Module, scale: float = 1.0, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn from N(0, scale^2) in its own dtype by a seeded generator: an attention
    module's zero- or one-initialised parameters would otherwise hide their terms from a reference."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return module


def preempt_after_step(monkeypatch, step: int) -> None:
    """SIGTERM (a pre-emption) right after the trainer's `step`-th optimizer step, counted from 1."""
    import itertools
    import signal

    from emca.engine.progress import EpochProgress

    advance, steps = EpochProgress.advance, itertools.count(1)

    def advance_then_preempt(self):
        advance(self)
        if next(steps) == step:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(EpochProgress, "advance", advance_then_preempt)


def compose_train_config(*overrides: str):
    """The config `python train.py *overrides` runs (Hydra compose API)."""
    from hydra import compose, initialize_config_dir

    import emca.config  # noqa: F401  (registers the schema and resolvers)

    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.fixture(scope="session")
def compose_train():
    """compose_train(*overrides) -> the config `python train.py *overrides` runs."""
    return compose_train_config


@pytest.fixture(scope="session")
def run_script():
    """run_script(*args, cwd=, env=, timeout=) -> CompletedProcess of `python *args` with the repo's
    interpreter, from the repo root unless told otherwise, output captured as text."""
    import subprocess
    import sys

    def run(*args: str, cwd: Path = REPO_ROOT, env: dict | None = None, timeout: float = 300):
        return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env={**os.environ, **(env or {})},
                              capture_output=True, text=True, timeout=timeout)

    return run


# --- unprivileged subprocesses ---------------------------------------------------------------

UNPRIVILEGED_CAPS = "-dac_override,-dac_read_search"


@pytest.fixture(scope="session")
def unprivileged(tmp_path_factory) -> list[str]:
    """A command prefix that runs a program without root's power to ignore file permissions.

    Tests run as root here (CI too), for whom a chmod 000 file is readable; setpriv drops the two
    capabilities that allow it, so permission errors happen as they would for a normal user.
    """
    if os.geteuid() != 0:
        return []
    import shutil
    import subprocess

    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root and setpriv (util-linux) is missing: cannot test permission errors")
    prefix = [setpriv, f"--inh-caps={UNPRIVILEGED_CAPS}", f"--bounding-set={UNPRIVILEGED_CAPS}", "--"]
    probe = tmp_path_factory.mktemp("unprivileged") / "probe"
    probe.write_text("x")
    probe.chmod(0)
    if subprocess.run([*prefix, "cat", str(probe)], capture_output=True).returncode == 0:
        pytest.skip("setpriv could not drop root's permission override here")
    return prefix
