"""Training-pipeline throughput of the DALI and torchvision loaders, side by side.

    python benchmarks/loader_throughput.py [--data ../shared/data/imagenet-samples] [--threads 2]

Loops the 241 full-size ImageNet JPEGs of the shared samples through the TRAIN pipeline at 224 px
(random-resized crop, flip, normalise) with the same number of decoding threads (DALI) and worker
processes (torchvision). Epochs are timed round-robin (DALI, torchvision, DALI, ...) after warm-up
epochs, and each loader's median epoch is reported, so a burst of load from other processes on a
shared machine hits both alike. Per-epoch costs are included: DALI builds a fresh pipeline per
epoch (for reproducibility), torchvision re-seeds its sampler. DALI on the GPU is added when CUDA
is available. Not a test: numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from emca.data import DatasetConfig, LoaderConfig, build_loaders

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-samples"


def image_tree(images: Path, into: Path) -> Path:
    """A train/ + val/ tree over one folder of class folders, without copying images."""
    for split in ("train", "val"):
        os.symlink(images.resolve(), into / split)
    return into


def timed_epoch(loader, epoch: int, device: torch.device) -> tuple[int, float]:
    loader.set_epoch(epoch)
    start, count = time.perf_counter(), 0
    for images, _ in loader:
        count += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return count, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of class folders of JPEGs")
    parser.add_argument("--threads", type=int, default=2, help="DALI threads = torchvision workers")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs per loader")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs per loader")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data} not found; pass --data with a folder of class folders of JPEGs")

    with tempfile.TemporaryDirectory() as scratch:
        os.environ.setdefault("EMCA_CACHE", scratch)
        dataset = DatasetConfig(
            name="imagefolder",
            root=str(image_tree(args.data, Path(scratch))),
            image_size=args.image_size,
            batch_size=args.batch_size,
            workers=args.threads,
        )
        cpu = torch.device("cpu")
        variants = {
            "dali-cpu": (build_loaders(dataset, LoaderConfig(name="dali"), device=cpu).train, cpu),
            "torchvision": (build_loaders(dataset, LoaderConfig(name="torchvision"), device=cpu).train, cpu),
        }
        if torch.cuda.is_available():
            gpu = torch.device("cuda", 0)
            variants["dali-gpu"] = (build_loaders(dataset, LoaderConfig(name="dali"), device=gpu).train, gpu)

        rates: dict[str, list[float]] = {name: [] for name in variants}
        for epoch in range(args.warmup + args.epochs):
            for name, (loader, device) in variants.items():
                count, seconds = timed_epoch(loader, epoch, device)
                if epoch >= args.warmup:
                    rates[name].append(count / seconds)

    images_per_epoch = len(variants["torchvision"][0]) * args.batch_size
    print(
        f"train pipeline at {args.image_size} px, {images_per_epoch} images/epoch from {args.data}, batch "
        f"{args.batch_size}, "
        f"{args.threads} threads/workers, {args.epochs} timed epochs after {args.warmup} warm-up, "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs"
    )
    print(f"{'loader':<12} {'median img/s':>12} {'min':>8} {'max':>8}")
    for name, values in rates.items():
        print(f"{name:<12} {statistics.median(values):>12.1f} {min(values):>8.1f} {max(values):>8.1f}")
    ratio = statistics.median(rates["dali-cpu"]) / statistics.median(rates["torchvision"])
    print(f"DALI-CPU / torchvision: {ratio:.2f}x")


if __name__ == "__main__":
    main()
