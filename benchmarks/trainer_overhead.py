"""What the training loop adds: EMCA-Train's trainer against a bare PyTorch loop, side by side.

Both train the same model (a copy of the trainer's) on the same synthetic batches (the trainer's
loader=synthetic loader: no data loading at all), with the same batch, AMP and memory format. The
bare loop is forward, cross-entropy, zero_grad, backward, SGD step (with a GradScaler under fp16);
the trainer adds everything a run has: the learning-rate schedule, running loss / top-1 sums,
progress reports every --log-every steps, the stop-signal check. Epochs of the two alternate, and
the ratio is the median of the per-round ratios.

    python benchmarks/trainer_overhead.py                       # CPU defaults: resnet18, batch 16, 112 px
    python benchmarks/trainer_overhead.py --backbone resnet50 --batch-size 256 --image-size 224 \\
        --amp bf16 --channels-last --steps 100                   # a GPU

Target (issue 6): at most 5 % overhead.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from _timing import (
    add_run_arguments,
    describe_allocator,
    describe_device,
    format_table,
    interleaved_timings,
    prepare_run,
    ratio_verdict,
)
from _trainer import build_trainer, trainer_epoch
from emca.engine.precision import amp_dtype, autocast
from emca.engine.trainer import Trainer

OVERHEAD_BUDGET = 0.05


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--attention", default="emca_eca")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--steps", type=int, default=20, help="training steps per timed epoch")
    parser.add_argument("--log-every", type=int, default=20, help="the trainer's trainer.log_every (its default: 20)")
    parser.add_argument("--rounds", type=int, default=5, help="round-robin passes (one epoch of each loop per pass)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs of each loop first")
    add_run_arguments(parser)
    return parser.parse_args(argv)


def trainer_overrides(args, device: torch.device) -> list[str]:
    return [
        f"backbone={args.backbone}", f"attention={args.attention}", "dataset=imagenet", "loader=synthetic",
        f"loader.steps_per_epoch={args.steps}", "loader.val_steps=1", f"dataset.batch_size={args.batch_size}",
        f"dataset.image_size={args.image_size}", f"trainer.device={device.type}", f"trainer.amp={args.amp}",
        f"trainer.channels_last={args.channels_last}", f"trainer.log_every={args.log_every}",
    ]


def bare_epoch(trainer: Trainer, amp: str):
    """The loop every PyTorch tutorial writes, over the trainer's own batches and a copy of its model."""
    model = copy.deepcopy(trainer.model).train()
    optimizer_cfg = trainer.cfg.optimizer
    optimizer = torch.optim.SGD(model.parameters(), lr=trainer.optimizer.param_groups[0]["lr"],
                                momentum=optimizer_cfg.momentum, weight_decay=optimizer_cfg.weight_decay)
    device = trainer.ctx.device
    dtype = amp_dtype(amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    loader = trainer.data.train

    def epoch():
        for images, labels in loader:
            with autocast(device.type, dtype):
                loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    return epoch


def main(argv=None) -> None:
    args = parse_args(argv)
    device = prepare_run(args)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(trainer_overrides(args, device), Path(run_dir))
        loops = {"bare PyTorch loop": bare_epoch(trainer, args.amp), "EMCA-Train trainer": trainer_epoch(trainer)}
        timings = interleaved_timings(loops, args.rounds, args.warmup, clock=args.clock)

    bare = timings["bare PyTorch loop"]
    images = args.steps * args.batch_size
    rows = [
        [
            name,
            f"{t.median:.3f}",
            f"{images / t.median:.1f}",
            f"{t.spread:.0%}",
            "-" if t is bare else f"{t.ratio_to(bare):.3f}",
        ]
        for name, t in timings.items()
    ]
    verdict = ratio_verdict(timings["EMCA-Train trainer"].round_ratios(bare), 1 + OVERHEAD_BUDGET)
    print(
        "\n".join(
            [
                f"device   {describe_device(device)}",
                "alloc    "
                + describe_allocator(device, args.allocator, max(t.faults_per_call for t in timings.values()), "epoch"),
                f"setting  {args.backbone} {args.attention}, batch {args.batch_size}, "
                f"{args.image_size}x{args.image_size}, amp {args.amp}, "
                f"{'channels_last' if args.channels_last else 'NCHW'}, synthetic batches, {args.steps} steps per "
                "epoch, "
                f"trainer logs every {args.log_every} steps",
                f"time     {args.rounds} interleaved rounds of one epoch each, {args.clock} clock; x bare: median of "
                "the per-round ratios",
                "",
                format_table(["loop", "s/epoch", "images/s", "spread", "x bare"], rows),
                "",
                f"target   trainer time vs bare loop, at most {1 + OVERHEAD_BUDGET:.2f}x ({OVERHEAD_BUDGET:.0%} "
                f"overhead): {verdict}",
            ]
        )
    )


if __name__ == "__main__":
    main()
