"""Training-pipeline throughput of the DALI and torchvision loaders, side by side.

    python benchmarks/loader_throughput.py [--data ../shared/data/imagenet-samples] [--threads 2] [--shards]

Loops the 241 full-size ImageNet JPEGs of the shared samples through the TRAIN pipeline at 224 px
(random-resized crop, flip, normalise) with the same number of decoding threads (DALI) and worker
processes (torchvision). Epochs are timed round-robin (DALI, torchvision, DALI, ...) after warm-up
epochs, and each loader's median epoch is reported, so a burst of load from other processes on a
shared machine hits both alike. Per-epoch costs are included: DALI builds a fresh pipeline per
epoch (for reproducibility), torchvision re-seeds its sampler. DALI on the GPU is added when CUDA
is available. Not a test: numbers depend on the machine.

--shards also packs the images into tar shards (scripts/pack_shards.py's packing, in a scratch
folder) and times every loader over them too (dataset.format=shards), beside the folders, with each
variant's start-up: build_loaders plus the first batch, taken after one untimed build so that the
folders' image-check cache and the page cache are warm for both formats.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from emca.data import DatasetConfig, LoaderConfig, build_loaders
from emca.data.packing import pack

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


def started(dataset: DatasetConfig, loader: str, device: torch.device) -> tuple[object, float]:
    """(the train loader, seconds from build_loaders to its first batch of epoch 0)."""
    start = time.perf_counter()
    train = build_loaders(dataset, LoaderConfig(name=loader), device=device).train
    train.set_epoch(0)
    next(iter(train))
    return train, time.perf_counter() - start


def build_variants(folders: DatasetConfig, shards: DatasetConfig | None) -> dict[str, tuple]:
    """name -> (train loader, device, start-up seconds) of every loader and format timed."""
    cpu = torch.device("cpu")
    loaders = [("dali-cpu", "dali", cpu), ("torchvision", "torchvision", cpu)]
    if torch.cuda.is_available():
        loaders.append(("dali-gpu", "dali", torch.device("cuda", 0)))
    formats = {"": folders, "-shards": shards} if shards else {"": folders}
    variants = {}
    for suffix, dataset in formats.items():
        for name, loader, device in loaders:
            started(dataset, loader, device)  # warms the caches
            train, seconds = started(dataset, loader, device)
            variants[name + suffix] = (train, device, seconds)
    return variants


def report_shards(rates: dict[str, list[float]], startup: dict[str, float]) -> None:
    """Each loader over shards against itself over folders: images/s (the median of the per-epoch
    ratios, each of two epochs timed moments apart, so a change of load between epochs cancels out)
    and start-up."""
    print(f"{'shards / folder':<16} {'img/s':>8} {'start-up':>9}")
    for name in (name for name in rates if not name.endswith("-shards")):
        speed = statistics.median(a / b for a, b in zip(rates[f"{name}-shards"], rates[name], strict=True))
        print(f"{name:<16} {speed:>7.2f}x {startup[f'{name}-shards'] / startup[name]:>8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of class folders of JPEGs")
    parser.add_argument("--threads", type=int, default=2, help="DALI threads = torchvision workers")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs per loader")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs per loader")
    parser.add_argument("--shards", action="store_true", help="also time every loader over the images packed in shards")
    parser.add_argument("--shard-size", type=int, default=64, help="images per shard with --shards")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data} not found; pass --data with a folder of class folders of JPEGs")

    with tempfile.TemporaryDirectory() as scratch:
        os.environ.setdefault("EMCA_CACHE", scratch)
        tree = image_tree(args.data, Path(scratch))
        folders = DatasetConfig(
            name="imagefolder", root=str(tree), image_size=args.image_size, batch_size=args.batch_size,
            workers=args.threads,
        )
        shards = None
        if args.shards:
            packing = time.perf_counter()
            pack(tree, Path(scratch) / "packed", shard_size=args.shard_size, workers=args.threads)
            packing = time.perf_counter() - packing
            shards = dataclasses.replace(folders, root=str(Path(scratch) / "packed"), format="shards")
        variants = build_variants(folders, shards)

        rates: dict[str, list[float]] = {name: [] for name in variants}
        for epoch in range(args.warmup + args.epochs):
            for name, (loader, device, _) in variants.items():
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
    if shards:
        print(f"shards: {args.shard_size} images each, packed in {packing:.1f} s; start-up: build_loaders + first "
              "batch, warm caches")
    print(f"{'loader':<19} {'median img/s':>12} {'min':>8} {'max':>8} {'start-up s':>10}")
    for name, values in rates.items():
        print(f"{name:<19} {statistics.median(values):>12.1f} {min(values):>8.1f} {max(values):>8.1f} "
              f"{variants[name][2]:>10.2f}")
    ratio = statistics.median(rates["dali-cpu"]) / statistics.median(rates["torchvision"])
    print(f"DALI-CPU / torchvision: {ratio:.2f}x")
    if shards:
        report_shards(rates, {name: variant[2] for name, variant in variants.items()})


if __name__ == "__main__":
    main()
