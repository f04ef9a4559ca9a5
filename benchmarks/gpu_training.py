"""Training throughput on a CUDA GPU: EMCA-Train's trainer on synthetic batches and with DALI on JPEGs.

Both rows are the real training step (the Trainer's train_one_epoch: AMP, channels_last, SGD, the
schedule, running metrics), epochs alternating and capped at --steps steps:
  synthetic  random batches made once on the GPU: the model's own ceiling;
  dali       JPEGs decoded and augmented on the GPU by DALI (mixed nvJPEG decoding), as a real run.
The ratio dali / synthetic says how close the input pipeline keeps the GPU to that ceiling.

    python benchmarks/gpu_training.py --data /datasets/imagenet          # ImageFolder tree (train/, val/)
    python benchmarks/gpu_training.py --data ../shared/data/imagenet-samples --batch-size 64   # class folders

Without a CUDA device it prints why and exits with status 0: nothing is measured. (--device cpu
runs the same code on the CPU, DALI's CPU pipeline included: a smoke test of this script, never a
figure to report.)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from _timing import describe_device, format_table, interleaved_timings

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-samples"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="an ImageFolder tree (train/<class>/*.JPEG) or one folder of class folders")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--attention", default="none")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--amp", default="bf16", choices=["off", "bf16", "fp16"])
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--workers", type=int, default=8, help="DALI CPU threads")
    parser.add_argument("--steps", type=int, default=100, help="training steps per timed epoch (at most)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke-test this script only")
    parser.add_argument("--warmup", type=int, default=1)
    return parser.parse_args(argv)


def image_folder_root(data: Path, scratch: Path) -> Path:
    """`data` itself when it holds train/; else a tree whose train/ and val/ link to it."""
    if (data / "train").is_dir():
        return data
    for split in ("train", "val"):
        os.symlink(data.resolve(), scratch / split)
    return scratch


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu_training.py measures GPU training and this machine has no CUDA device "
              "(torch.cuda.is_available() is False): nothing measured. Run it on a GPU machine.")
        return
    from _trainer import build_trainer, trainer_epoch  # the trainer's imports take a while: not before the check above

    if not args.data.is_dir():
        sys.exit(f"{args.data} not found: pass --data with an ImageFolder tree or a folder of class folders of JPEGs")
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    torch.backends.cudnn.benchmark = True
    common = [
        f"backbone={args.backbone}",
        f"attention={args.attention}",
        f"dataset.batch_size={args.batch_size}",
        f"dataset.image_size={args.image_size}",
        f"dataset.workers={args.workers}",
        f"trainer.device={device.type}",
        f"trainer.amp={args.amp}",
        f"trainer.channels_last={args.channels_last}",
        f"trainer.max_steps_per_epoch={args.steps}",
    ]
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        (scratch / "tree").mkdir()
        os.environ.setdefault("EMCA_CACHE", str(scratch / "cache"))
        root = image_folder_root(args.data, scratch / "tree")
        trainers = {
            "synthetic": build_trainer(
                [*common, "dataset=imagenet", "loader=synthetic", f"loader.steps_per_epoch={args.steps}"],
                scratch / "synthetic",
            ),
            "dali": build_trainer(
                [*common, "dataset=imagefolder", f"dataset.root={root}", "loader=dali"], scratch / "dali"
            ),
        }
        if trainers["dali"].steps_per_epoch == 0:
            sys.exit(f"{args.data} holds fewer training images than one batch of {args.batch_size}: lower --batch-size")
        timings = interleaved_timings(
            {name: trainer_epoch(t) for name, t in trainers.items()}, args.rounds, args.warmup
        )

    print_report(args, device, {name: t.steps_per_epoch for name, t in trainers.items()}, timings)


def print_report(args, device: torch.device, steps: dict, timings: dict) -> None:
    rates = {name: steps[name] * args.batch_size / timing.median for name, timing in timings.items()}
    rows = [[name, steps[name], f"{rates[name]:.0f}", f"{timing.spread:.0%}", f"{rates[name] / rates['synthetic']:.3f}"]
            for name, timing in timings.items()]
    print(
        "\n".join(
            [
                f"device   {describe_device(device)}",
                f"setting  {args.backbone} attention={args.attention}, batch {args.batch_size}, "
                f"{args.image_size}x{args.image_size}, "
                f"amp {args.amp}, {'channels_last' if args.channels_last else 'NCHW'}, DALI threads {args.workers}, "
                f"data {args.data}",
                f"time     {args.rounds} interleaved rounds of one epoch (at most {args.steps} steps) each, wall "
                "clock, median"
                + ("" if device.type == "cuda" else "  [CPU smoke test: not a GPU figure]"),
                "",
                format_table(["loader", "steps", "images/s", "spread", "x synthetic"], rows),
            ]
        )
    )


if __name__ == "__main__":
    main()
