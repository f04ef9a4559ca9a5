"""What the training loop adds: EMCA-Train's trainer against a bare PyTorch loop, side by side.

Both train the same model (a copy of the trainer's) on the same synthetic batches (the trainer's
loader=synthetic loader: no data loading at all), with the same batch, AMP and memory format. The
bare loop is forward, cross-entropy, zero_grad, backward, SGD step (with a GradScaler under fp16);
the trainer adds everything a run has: the learning-rate schedule, running loss / top-1 sums,
progress reports every --log-every steps, the stop-signal check. Epochs of the two alternate, and
the ratio is the median of the per-round ratios.

With --accumulate K and --ema-decay D (--ema-every N) the trainer runs trainer.accumulate=K and
trainer.ema.decay=D (trainer.ema.every=N), and the bare loop does the same work written the plain
way, as timm's train.py does: each batch as K chunks, each chunk's loss divided by K, one update;
its own timm ModelEmaV3 of its model, updated after every N-th update.

    python benchmarks/trainer_overhead.py                       # CPU defaults: resnet18, batch 16, 112 px
    python benchmarks/trainer_overhead.py --ema-decay 0.9998 --accumulate 2   # with EMA and accumulation
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
from timm.utils import ModelEmaV3

from emca.engine.precision import amp_dtype, autocast
from emca.engine.trainer import Trainer

from _timing import (  # first: it quiets a warning of a module that timm's import may load
    Timing,
    add_run_arguments,
    describe_allocator,
    describe_device,
    format_table,
    interleaved_timings,
    prepare_run,
    ratio_verdict,
)
from _trainer import build_trainer, trainer_epoch

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
    parser.add_argument("--ema-decay", type=float, default=None,
                        help="trainer.ema.decay, e.g. 0.9998, and a timm ModelEmaV3 in the bare loop (default: no EMA)")
    parser.add_argument("--ema-every", type=int, default=1, help="trainer.ema.every: update the EMA every N steps")
    parser.add_argument("--accumulate", type=int, default=1,
                        help="trainer.accumulate: micro-batches per optimizer step (a divisor of --batch-size)")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    if args.ema_every != 1 and args.ema_decay is None:
        parser.error("--ema-every needs --ema-decay")
    return args


def trainer_overrides(args, device: torch.device) -> list[str]:
    ema = []
    if args.ema_decay is not None:
        ema = [f"trainer.ema.decay={args.ema_decay}", f"trainer.ema.every={args.ema_every}"]
    return [
        f"backbone={args.backbone}", f"attention={args.attention}", "dataset=imagenet", "loader=synthetic",
        f"loader.steps_per_epoch={args.steps}", "loader.val_steps=1", f"dataset.batch_size={args.batch_size}",
        f"dataset.image_size={args.image_size}", f"trainer.device={device.type}", f"trainer.amp={args.amp}",
        f"trainer.channels_last={args.channels_last}", f"trainer.log_every={args.log_every}",
        f"trainer.accumulate={args.accumulate}",
        *ema,
    ]


def describe_recipe(args) -> str:
    """What the options add to a plain step, '' for none."""
    parts = [f"EMA decay {args.ema_decay} every {args.ema_every} step(s)" if args.ema_decay is not None else "",
             f"{args.accumulate} micro-batches per step" if args.accumulate > 1 else ""]
    return ", ".join(part for part in parts if part)


def bare_epoch(trainer: Trainer, args):
    """The loop every PyTorch tutorial writes, over the trainer's own batches and a copy of its model;
    with --accumulate / --ema-decay, gradient accumulation and an EMA as timm's train.py writes them."""
    model = copy.deepcopy(trainer.model).train()
    optimizer_cfg = trainer.cfg.optimizer
    optimizer = torch.optim.SGD(model.parameters(), lr=trainer.optimizer.param_groups[0]["lr"],
                                momentum=optimizer_cfg.momentum, weight_decay=optimizer_cfg.weight_decay)
    device = trainer.ctx.device
    dtype = amp_dtype(args.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    loader = trainer.task.train_loader
    accumulate, ema_every = args.accumulate, args.ema_every
    model_ema = ModelEmaV3(model, decay=args.ema_decay) if args.ema_decay is not None else None
    num_updates = 0

    def epoch():
        nonlocal num_updates
        for images, labels in loader:
            optimizer.zero_grad(set_to_none=True)
            for chunk_images, chunk_labels in zip(images.chunk(accumulate), labels.chunk(accumulate), strict=True):
                with autocast(device.type, dtype):
                    loss = F.cross_entropy(model(chunk_images), chunk_labels)
                if accumulate > 1:
                    loss = loss / accumulate
                scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            num_updates += 1
            if model_ema is not None and num_updates % ema_every == 0:
                model_ema.update(model, step=num_updates // ema_every)

    return epoch


def main(argv=None) -> None:
    args = parse_args(argv)
    device = prepare_run(args)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(trainer_overrides(args, device), Path(run_dir))
        loops = {"bare PyTorch loop": bare_epoch(trainer, args), "EMCA-Train trainer": trainer_epoch(trainer)}
        timings = interleaved_timings(loops, args.rounds, args.warmup, clock=args.clock)
    print(report(args, device, timings))


def report(args, device: torch.device, timings: dict[str, Timing]) -> str:
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
    recipe = describe_recipe(args)
    return "\n".join(
        [
            f"device   {describe_device(device)}",
            "alloc    "
            + describe_allocator(device, args.allocator, max(t.faults_per_call for t in timings.values()), "epoch"),
            f"setting  {args.backbone} {args.attention}, batch {args.batch_size}, "
            f"{args.image_size}x{args.image_size}, amp {args.amp}, "
            f"{'channels_last' if args.channels_last else 'NCHW'}, synthetic batches, {args.steps} steps per "
            "epoch, "
            f"trainer logs every {args.log_every} steps",
            f"recipe   {recipe or 'plain steps (no EMA, no accumulation)'}; the bare loop does the same work",
            f"time     {args.rounds} interleaved rounds of one epoch each, {args.clock} clock; x bare: median of "
            "the per-round ratios",
            "",
            format_table(["loop", "s/epoch", "images/s", "spread", "x bare"], rows),
            "",
            f"target   trainer time vs bare loop{f' ({recipe})' if recipe else ''}, at most "
            f"{1 + OVERHEAD_BUDGET:.2f}x ({OVERHEAD_BUDGET:.0%} overhead): {verdict}",
        ]
    )


if __name__ == "__main__":
    main()
