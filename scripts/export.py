"""Export a trained checkpoint for inference outside this framework, checked against PyTorch.

    python scripts/export.py checkpoint=outputs/2026-01-01/10-00-00/checkpoints/best.pt   # best.onnx
    python scripts/export.py checkpoint=PATH format=torchscript                           # best.torchscript
    python scripts/export.py checkpoint=PATH format=exported_program ema=true             # best_ema.pt2
    python scripts/export.py checkpoint=PATH output=/tmp/model.onnx image_size=256

The model is rebuilt from the configuration stored in the checkpoint (emca.models.loading, as for
eval.py and emca.load_model), in eval mode, float32, on the CPU. Each artefact takes float32 images
(batch, 3, S, S) normalised as the run's validation images and returns the logits (batch, classes);
the batch size is dynamic, the image size S fixed at export (default: the run's validation crop).

format=onnx: torch.export.export with a dynamic batch dimension (torch.export.Dim), then
    torch.onnx.export of that program (the dynamo-based exporter, onnxscript's translation and
    optimiser), opset `opset` (18 by default), input `images`, output `logits`, batch axis `batch`.
    The TorchScript-based exporter (dynamo=False) is not used: it cannot export ECA's 1-D
    cross-correlation (unfold of a padded descriptor: "Unfold, input size not accessible").
format=exported_program: the same torch.export program, saved with torch.export.save (.pt2);
    load it with torch.export.load(path).module().
format=torchscript: torch.jit.trace (a traced graph; the batch size stays symbolic). torch.jit.script
    cannot compile these models (typing.Sequence arguments, custom autograd Functions, per-block
    Python attributes), and tracing records a custom autograd Function as a Python call that
    torch.jit.save refuses ("Could not export Python function call '_MeanPool'"). While tracing,
    the mean and mean+std poolings (emca.layers.pooling.POOLINGS, what SE, ECA, SRM and every EMCA
    variant pool with) are therefore run as their Functions' own forward code, the same tensor
    operations without the hand-written backward that inference does not need: the traced graph
    computes what the model computes (checked below like the other formats).

Every artefact is then loaded back (ONNX Runtime's CPU provider, torch.jit.load, torch.export.load)
and run on a batch of 2 and a batch of 3 random images beside the PyTorch model; the largest
|artefact - PyTorch| at each batch size is printed, and the file is written only when it is at most
tolerance * max(1, largest |logit|) (ExportConfig says why 1e-4). Options: ExportConfig in emca/config.py.
Exit status 0, or 1 with a one-line error (a missing or foreign checkpoint, an unknown format, an
artefact that does not match).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Optional, Sequence

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python scripts/export.py` from anywhere, without an installed package
    sys.path.insert(0, str(REPO))

from emca.cli import check_command_line  # noqa: E402
from emca.common.checkpoint_file import CHECKPOINT_DIR, CheckpointError  # noqa: E402
from emca.common.files import atomic_write  # noqa: E402
from emca.config import MIN_OPSET, ExportFormat  # noqa: E402  (and registers export_schema)
from emca.layers import pooling  # noqa: E402
from emca.models.loading import read_checkpoint, restore_model  # noqa: E402
from emca.options import is_int, require, require_int  # noqa: E402

SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript", "exported_program": ".pt2"}
LABELS = {"onnx": "ONNX Runtime", "torchscript": "torch.jit.load", "exported_program": "torch.export.load"}
CHECK_BATCHES = (2, 3)  # two batch sizes: the second is not the one the graph was captured at
INPUT_NAME, OUTPUT_NAME, BATCH_AXIS = "images", "logits", "batch"


class ExportError(ValueError):
    """A problem the user can fix (options, checkpoint, an artefact that does not match), in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


# --------------------------------------------------------------------------- the three exporters

def example_images(batch: int, image_size: int, seed: int = 0) -> torch.Tensor:
    """A seeded batch of normalised-looking images (N(0, 1) pixels); batch b is the first b of any larger one."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(max(batch, *CHECK_BATCHES), 3, image_size, image_size, generator=generator)[:batch]


def export_program(model: nn.Module, image_size: int) -> torch.export.ExportedProgram:
    """torch.export of the eval-mode model with a dynamic batch dimension."""
    batch = torch.export.Dim(BATCH_AXIS, min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's notes on its own internals
        return torch.export.export(model, (example_images(CHECK_BATCHES[0], image_size),), dynamic_shapes=({0: batch},))


def onnx_bytes(program: torch.export.ExportedProgram, opset: int) -> bytes:
    """The ONNX model of an exported program (one file: the weights inside, not as external data)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        # dynamic_shapes names the program's (already dynamic) batch axis in the ONNX graph.
        onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                         output_names=[OUTPUT_NAME], dynamic_shapes=({0: BATCH_AXIS},),
                                         optimize=True, verbose=False)
    return onnx_program.model_proto.SerializeToString()


@contextlib.contextmanager
def traceable_poolings() -> Iterator[None]:
    """POOLINGS' autograd Functions replaced by their own forward code while a model is traced
    (module docstring: torch.jit.save cannot save a Function's Python call)."""
    saved = dict(pooling.POOLINGS)
    mean_std = pooling._MeanStdPool.forward
    pooling.POOLINGS["mean"] = pooling._MeanPool.forward
    pooling.POOLINGS["mean_std"] = lambda x: mean_std(x).to(x.dtype)  # as POOLINGS' entry, without .apply
    try:
        yield
    finally:
        pooling.POOLINGS.update(saved)


def torchscript_bytes(model: nn.Module, image_size: int) -> bytes:
    """torch.jit.trace of the eval-mode model, saved."""
    with traceable_poolings(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings for shape arithmetic, checked at two batch sizes below
        traced = torch.jit.trace(model, example_images(CHECK_BATCHES[0], image_size), check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)  # (and PyTorch's FutureWarning that TorchScript is deprecated)
    return buffer.getvalue()


def export_bytes(model: nn.Module, fmt: str, image_size: int, opset: int = MIN_OPSET,
                 program: Optional[torch.export.ExportedProgram] = None) -> bytes:
    """The artefact of `fmt` for an eval-mode model, as the file's bytes. `program`: an
    export_program(model, image_size) already made (onnx and exported_program share it)."""
    if fmt == "torchscript":
        return torchscript_bytes(model, image_size)
    program = program if program is not None else export_program(model, image_size)
    if fmt == "onnx":
        return onnx_bytes(program, opset)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def load_runner(fmt: str, data: bytes) -> Callable[[torch.Tensor], torch.Tensor]:
    """The artefact loaded back from its bytes, as images -> logits (a CPU float32 tensor)."""
    if fmt == "onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        return lambda images: torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0])
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    else:
        module = torch.export.load(io.BytesIO(data)).module()

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(images)

    return run


def differences(model: nn.Module, run: Callable[[torch.Tensor], torch.Tensor], image_size: int,
                batches: Sequence[int] = CHECK_BATCHES) -> tuple[dict[int, float], float]:
    """({batch size: max |artefact - PyTorch|}, largest |PyTorch logit|) on the same images."""
    found, scale = {}, 0.0
    for batch in batches:
        images = example_images(batch, image_size)
        with torch.no_grad():
            expected = model(images)
        got = run(images)
        if got.shape != expected.shape:
            raise ExportError(f"the artefact returns {tuple(got.shape)} for a batch of {batch}, PyTorch "
                              f"{tuple(expected.shape)}")
        found[batch] = (got.double() - expected.double()).abs().max().item()
        scale = max(scale, expected.abs().max().item())
    return found, scale


def limit(tolerance: float, scale: float) -> float:
    """The largest difference accepted: `tolerance` per unit of the largest logit, at least 1."""
    return tolerance * max(1.0, scale)


# --------------------------------------------------------------------------- the command

def check_options(cfg: DictConfig) -> None:
    """What ExportConfig's types cannot say (Hydra has checked those)."""
    if not cfg.checkpoint:
        raise ExportError("give the checkpoint to export: python scripts/export.py checkpoint=PATH format=onnx")
    require_int("image_size", cfg.image_size, 1, ExportError, nullable=True)
    require_int("opset", cfg.opset, MIN_OPSET, ExportError)
    require(cfg.tolerance > 0, "tolerance", cfg.tolerance, "a positive number, e.g. 1e-4", ExportError)


def output_path(output: Optional[str], checkpoint: Path, fmt: str, ema: bool) -> Path:
    """<stem>[_ema].<suffix> beside the checkpoint, or in the run folder for <run>/checkpoints/*.pt (a
    file in a checkpoint generation would not survive the trainer's next save); or `output`."""
    if output:
        path = Path(output).expanduser().resolve()
        example = path / f"{checkpoint.stem}{SUFFIXES[fmt]}"
        require(not path.is_dir(), "output", Path(output), f"a file path, not a folder (e.g. {example})", ExportError)
        return path
    folder = checkpoint.parent
    folder = folder.parent if folder.name == CHECKPOINT_DIR else folder
    return folder / f"{checkpoint.stem}{'_ema' if ema else ''}{SUFFIXES[fmt]}"


def export_checkpoint(cfg: DictConfig) -> list[str]:
    """Export, check and write; returns the lines to print. ExportError if the artefact does not match."""
    check_options(cfg)
    fmt = ExportFormat(cfg.format).value
    given = Path(cfg.checkpoint).expanduser()
    output = output_path(cfg.output, Path(os.path.abspath(given)), fmt, cfg.ema)
    state = read_checkpoint(given, ExportError, "scripts/export.py")
    model = restore_model(given, state, cfg.ema, ExportError, "drop ema=true").eval().requires_grad_(False)
    dataset = state["config"].get("dataset", {})
    image_size = cfg.image_size or dataset.get("val_image_size") or dataset.get("image_size")
    require(is_int(image_size) and image_size > 0, "image_size", image_size, "a positive integer (the checkpoint's "
            "configuration gives none)", ExportError)

    data = export_bytes(model, fmt, image_size, cfg.opset)
    found, scale = differences(model, load_runner(fmt, data), image_size)
    allowed = limit(cfg.tolerance, scale)
    measured = ", ".join(f"{value:.2e} at batch {batch}" for batch, value in found.items())
    if max(found.values()) > allowed:
        raise ExportError(f"the {fmt} export of {given} differs from PyTorch by {measured} (more than "
                          f"{allowed:.1e} = tolerance {cfg.tolerance:g} x {max(1.0, scale):.3g}); nothing written")
    replaced = output.exists()
    atomic_write(output, lambda file: file.write(data))

    arch = state["fingerprint"]["architecture"]
    what = {"onnx": f"ONNX opset {cfg.opset}", "torchscript": "TorchScript, traced",
            "exported_program": "torch.export program"}[fmt]
    weights = "EMA" if cfg.ema else "trained"
    mean, std = dataset.get("mean"), dataset.get("std")
    return [
        f"{'replaced' if replaced else 'wrote':<9} {output} ({what}, {len(data) / 2**20:.1f} MiB, {weights} weights)",
        f"input     float32 ({BATCH_AXIS}, 3, {image_size}, {image_size}), any batch size; RGB normalised as the "
        f"run's validation images: (pixel - {_short(mean)}) / {_short(std)} on the 0-255 scale",
        f"output    logits ({BATCH_AXIS}, {arch['num_classes']})",
        f"checked   {LABELS[fmt]} vs PyTorch on the same images: max abs difference {measured} "
        f"(limit {allowed:.1e})",
    ]


def _short(values: Any) -> str:
    return "[" + ", ".join(f"{value:g}" for value in values) + "]" if isinstance(values, (list, tuple)) else str(values)


def fail(error: Exception) -> NoReturn:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)


@hydra.main(version_base="1.3", config_path="../configs", config_name="export")
def main(cfg: DictConfig) -> None:
    try:
        lines = export_checkpoint(cfg)
    except (ExportError, CheckpointError) as error:
        fail(error)
    print("\n".join(lines))


if __name__ == "__main__":
    check_command_line(Path(__file__).resolve().parents[1] / "configs", "export")
    main()
