"""Steady-state training images/s on one CUDA GPU, with the trainer's own step.

Every row runs emca.engine.step.OptimizerStep (what Trainer.train_one_epoch calls once per step:
autocast, GradScaler, SGD, the LR schedule) on a Trainer built as `python train.py` builds it; its
running metrics and step lines are left out (trainer_overhead.py measures those). Models,
optimizers, loaders and DALI pipelines are built once; every row first trains --warmup untimed
steps (cuDNN autotuning, torch.compile's compilation), then the rows take turns, round after round
(the order rotated each round), each round --steps steps timed between two torch.cuda.synchronize
calls and nothing synchronised in between. Figures are medians over the rounds; "x plain" is the
median of the per-round time ratios to the plain row, taken minutes apart at most.

Rows:
  plain          the backbone without attention on synthetic batches (loader=synthetic: one batch
                 made once on the GPU), beside NVIDIA DeepLearningExamples' published RN50 figure
  <attention>    the same on the EMCA model (--attention, default emca_eca): its cost as a ratio
  compiled       plain with trainer.compile=true (--compile; compilation is in the warm-up)
  dali           plain fed by emca's DALI loader over real JPEGs (--data): one pipeline whose epoch
                 repeats the folder's files as often as the run needs (read from the page cache, so
                 decoding and augmentation are measured, not the disk)

    python benchmarks/gpu_training.py                          # defaults: R-50, batch 256, 224 px, bf16
    python benchmarks/gpu_training.py --compile --out gpu_training.json
    python benchmarks/gpu_training.py --dry-run                # no GPU: the same code, tiny, on the CPU

Without CUDA it refuses in one line (exit status 1). --dry-run runs everything on the CPU at toy
sizes in seconds and --device cpu at the given sizes: smoke tests of this script, never figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from _timing import Timing, describe_device, format_table, ratio_verdict

REPO_ROOT = Path(__file__).resolve().parents[1]
# Where the tests find the shared photographs (tests/conftest.py: EMCA_SHARED_DATA, else ../shared/data).
SHARED_DATA = Path(os.environ.get("EMCA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
# NVIDIA DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md, "Training
# performance: NVIDIA DGX A100 (8x A100 80GB)", 1 GPU, mixed precision; the recipe from the same
# folder's configs.yml (resnet50, DGXA100, AMP): fp16 with a static loss scale of 128, NHWC, batch 256.
DLE_REFERENCE = {
    "images_per_s": 2470,
    "card": "A100 80GB",
    "recipe": "ResNet-50 v1.5, AMP fp16 (static loss scale 128), NHWC, batch 256, 224 px, NGC PyTorch 21.03",
    "source": "NVIDIA DeepLearningExamples PyTorch/Classification/ConvNets/resnet50v1.5/README.md",
}
# The EMCA model's time per step against the plain model's (issue 6's target, as model_cost.py).
RATIO_TARGET = 1.05
# --dry-run's sizes: every code path in seconds on a CPU.
DRY_RUN = dict(backbone="resnet18", batch_size=2, image_size=32, amp="off", steps=1, warmup=1, rounds=2, workers=1)
AMP_WORDS = {"bf16": "AMP bf16 (autocast, no loss scaling)", "fp16": "AMP fp16 (autocast + GradScaler)",
             "off": "no AMP (float32)"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--attention", default="emca_eca", help="the attention model timed against plain")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "off"])
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--steps", type=int, default=40, help="timed training steps per row and round")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per row before the rounds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="add the torch.compile row (trainer.compile=true)")
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "imagenet-samples",
                        help="JPEGs for the DALI row: class folders, or an ImageFolder tree with train/")
    parser.add_argument("--workers", type=int, default=None, help="DALI CPU threads (default: one per core, at most 8)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke test, not a figure")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU: checks the script in seconds")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device = "cpu"
        vars(args).update(DRY_RUN)
    for option in ("batch_size", "image_size", "steps", "rounds"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    return args


@dataclass
class Row:
    """One timed variant: a Trainer's step fed by a batch iterator built once."""

    name: str
    trainer: object  # emca.engine.trainer.Trainer (imported late: the trainer's imports take seconds)
    batches: Iterator
    # Untimed steps at the start of each round: DALI decodes prefetch_queue_depth batches ahead while
    # the other rows run, and those must not count as this row's throughput.
    lead_in: int = 0
    seconds: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    finite: bool = True

    def train(self, steps: int) -> Optional[torch.Tensor]:
        """`steps` optimizer steps, counted as train_one_epoch counts them; the last loss (not read)."""
        loss, trainer = None, self.trainer
        for _ in range(steps):
            inputs, targets = next(self.batches)
            loss = trainer.step(inputs, targets, trainer.progress.global_step).loss
            trainer.progress.global_step += 1
        return loss


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_round(row: Row, steps: int, device: torch.device) -> None:
    """One round of `row`: the device synchronised before and after, never within."""
    row.train(row.lead_in)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    loss = row.train(steps)
    synchronize(device)
    row.seconds.append(time.perf_counter() - started)
    if device.type == "cuda":
        row.peak_bytes = max(row.peak_bytes, torch.cuda.max_memory_allocated(device))
    row.finite = row.finite and bool(torch.isfinite(loss))  # read once the clock has stopped


def measure(rows: list[Row], args, device: torch.device) -> None:
    for row in rows:  # round-robin, as the rounds: the allocator meets the rows' sizes before any timing
        row.train(args.warmup)
    synchronize(device)
    for round_index in range(args.rounds):
        shift = round_index % len(rows)
        for row in rows[shift:] + rows[:shift]:
            timed_round(row, args.steps, device)


def trainer_overrides(args, device: torch.device) -> list[str]:
    """The train.py options every row's Trainer shares: synthetic ImageNet-sized batches, one long epoch."""
    return [
        f"backbone={args.backbone}", "dataset=imagenet", "loader=synthetic", "loader.val_steps=1",
        f"loader.steps_per_epoch={args.warmup + args.rounds * args.steps}",
        f"dataset.batch_size={args.batch_size}", f"dataset.image_size={args.image_size}",
        f"trainer.device={device.type}", f"trainer.amp={args.amp}", f"trainer.channels_last={args.channels_last}",
    ]


def synthetic_batches(trainer) -> Iterator:
    """The synthetic loader's batch (made once, on the device) for as many steps as asked."""
    return itertools.chain.from_iterable(itertools.repeat(trainer.task.train_loader))


def build_rows(args, device: torch.device, scratch: Path) -> tuple[list[Row], dict[str, str]]:
    """The rows to time, and notes on them: what the DALI row reads, or why there is none."""
    from _trainer import build_trainer  # the trainer's imports take seconds: after the CUDA check

    common = trainer_overrides(args, device)
    plain = build_trainer([*common, "attention=none"], scratch / "plain")
    attention = build_trainer([*common, f"attention={args.attention}"], scratch / "attention")
    rows = [Row("plain", plain, synthetic_batches(plain)), Row(args.attention, attention, synthetic_batches(attention))]
    if args.compile:
        compiled = build_trainer([*common, "attention=none", "trainer.compile=true"], scratch / "compiled")
        rows.append(Row("plain compiled", compiled, synthetic_batches(compiled)))
    dali, note = dali_row(args, plain, device)
    if dali is not None:
        rows.append(dali)
    return rows, {"dali": note if dali is not None else f"no row: {note}"}


def dali_row(args, trainer, device: torch.device) -> tuple[Optional[Row], str]:
    """(the DALI row over the JPEGs of args.data, its description), or (None, why there is none)."""
    try:
        from emca.data.dali_loader import DaliLoader, reader_options
    except ImportError as error:
        return None, f"NVIDIA DALI is not importable ({error}): pip install nvidia-dali-cuda130"
    from emca.data import DatasetError
    from emca.data.builder import loader_workers
    from emca.data.config import LoaderConfig
    from emca.data.folder import list_split
    from emca.data.transforms import Preprocessing

    folder = args.data / "train" if (args.data / "train").is_dir() else args.data
    if not folder.is_dir():
        return None, f"no JPEG folder at {args.data}: pass --data with class folders of JPEGs"
    try:
        images = list_split(folder)
    except DatasetError as error:
        return None, str(error)
    defaults = LoaderConfig()
    lead_in = defaults.prefetch_queue_depth
    batches = args.warmup + args.rounds * (lead_in + args.steps)
    # One reader epoch long enough for the whole run: the files in turn, repeated.
    order = np.resize(np.arange(len(images)), batches * args.batch_size)
    loader = DaliLoader.from_files(
        images, Preprocessing.from_config(trainer.cfg.dataset), lambda epoch: order, train=True,
        batch_size=args.batch_size, workers=loader_workers(args.workers), seed=0, rank=0, device=device,
        channels_last=args.channels_last, prefetch_queue_depth=lead_in, use_gpu=defaults.dali_use_gpu,
        reader=reader_options(defaults),
    )
    decoding = "mixed (nvJPEG) decoding on the GPU" if loader.gpu else "the CPU pipeline"
    source = (f"{len(images)} JPEGs of {folder} repeated, {decoding} with {loader.threads} CPU thread(s), "
              f"{lead_in} untimed steps a round (its prefetch queue)")
    return Row("plain dali", trainer, iter(loader), lead_in=lead_in), source


def describe_settings(args, device: torch.device) -> list[str]:
    layout = "channels_last" if args.channels_last else "NCHW"
    return [
        f"device   {describe_device(device)}" + ("" if device.type == "cuda" else "  [CPU smoke test: no GPU figure]"),
        f"setting  {args.backbone}, batch {args.batch_size}, {args.image_size}x{args.image_size}, "
        f"{AMP_WORDS[args.amp]}, {layout}, SGD (train.py's default recipe)",
        f"time     {args.warmup} untimed steps per row, then {args.rounds} rounds of {args.steps} steps per row "
        "(rows interleaved, order rotated), synchronised at round boundaries only; medians over the rounds",
    ]


def reference_line(args, device: torch.device, plain: float) -> str:
    """Our plain figure beside DLE's published one, with every way the two runs differ."""
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    same_card = "A100" in card and "80GB" in card.replace(" ", "")  # the 40 GB A100 has less memory bandwidth
    differences = [f"another card ({card})" if not same_card else None,
                   f"{args.backbone}" if args.backbone != "resnet50" else None,
                   f"AMP {args.amp}" if args.amp != "fp16" else None,
                   f"batch {args.batch_size}" if args.batch_size != 256 else None,
                   f"{args.image_size} px" if args.image_size != 224 else None,
                   "NCHW" if not args.channels_last else None]
    differences = [item for item in differences if item]
    ours = f"plain {args.backbone}: {plain:,.0f} img/s on {card}"
    theirs = f"DLE {DLE_REFERENCE['images_per_s']:,} img/s on 1x {DLE_REFERENCE['card']} ({DLE_REFERENCE['recipe']})"
    verdict = ("not like for like: " + ", ".join(differences) + ", and DLE's own training script"
               if differences else "same card and recipe; DLE's own training script")
    return f"ref      {ours}; {theirs}: {verdict}"


def summarise(args, device: torch.device, rows: list[Row], notes: dict[str, str]) -> dict:
    """The figures as one JSON-able record."""
    from emca.engine.results import git_commit, library_versions

    timings = {row.name: Timing(tuple(row.seconds)) for row in rows}
    plain = timings["plain"]
    images = args.steps * args.batch_size
    records = [{
        "row": row.name, "images_per_s": images / timings[row.name].median,
        "ms_per_step": 1000 * timings[row.name].median / args.steps, "spread": timings[row.name].spread,
        "x_plain": timings[row.name].ratio_to(plain), "peak_gib": row.peak_bytes / 2**30 if row.peak_bytes else None,
        "finite_loss": row.finite, "round_seconds": row.seconds,
    } for row in rows]
    attention = timings[args.attention]
    return {
        "device": describe_device(device), "settings": {k: str(v) for k, v in vars(args).items()},
        "rows": records, "notes": notes, "reference": DLE_REFERENCE,
        "ratio": {"rows": f"{args.attention} / plain, time per step", "median": attention.ratio_to(plain),
                  "per_round": attention.round_ratios(plain), "target": RATIO_TARGET,
                  "verdict": ratio_verdict(attention.round_ratios(plain), RATIO_TARGET)},
        "git": git_commit(), "versions": library_versions(),
    }


def format_report(args, device: torch.device, summary: dict) -> str:
    rows = [[r["row"], f"{r['images_per_s']:.0f}", f"{r['ms_per_step']:.1f}", f"{r['spread']:.0%}",
             f"{r['x_plain']:.3f}", "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}",
             "yes" if r["finite_loss"] else "NO"] for r in summary["rows"]]
    lines = [*describe_settings(args, device), ""]
    lines.append(format_table(["row", "images/s", "ms/step", "spread", "x plain", "peak GiB", "finite"], rows))
    lines.append("")
    lines.append(f"ratio    {summary['ratio']['rows']}: {summary['ratio']['verdict']} "
                 f"(target at most {RATIO_TARGET}x)")
    lines.append(reference_line(args, device, summary["rows"][0]["images_per_s"]))
    lines.extend(f"{name:<8} {note}" for name, note in summary["notes"].items())
    if device.type == "cuda":
        lines.append("memory   peak GiB: torch's caching allocator (DALI's own GPU pool is not in it)")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_training.py: no CUDA device (torch.cuda.is_available() is False); run it on a "
                 "GPU machine, or add --dry-run to smoke-test it on the CPU")
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    with tempfile.TemporaryDirectory() as scratch:  # the trainers' run folders: nothing is written there
        rows, notes = build_rows(args, device, Path(scratch))
        measure(rows, args, device)
    summary = summarise(args, device, rows, notes)
    print(format_report(args, device, summary))
    if args.out is not None:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
