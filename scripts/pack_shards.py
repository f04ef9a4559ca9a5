"""Pack an ImageFolder tree into WebDataset tar shards for dataset.format=shards.

    python scripts/pack_shards.py ROOT OUT [--shard-size 1000] [--seed 0] [--on-bad-image error]
                                  [--dataset imagefolder] [--workers 4]

ROOT holds train/<class>/* and val/<class>/* (any tree the folder loaders read; --dataset digits
generates the digits tree at ROOT first). OUT receives info.json and {train,val}/shard-NNNNNN.tar
with a DALI index (shard-NNNNNN.idx) beside each; the image bytes are stored unchanged. Images are
screened as the folder loaders screen them, and shuffled across shards once with --seed. Rerunning
the same command after an interruption keeps the shards already complete and writes the rest.
One packing writes OUT at a time: a second one is refused (OUT/.pack-lock names the first), and
the success line comes only once every shard and info.json are on disk.
Then train with dataset.format=shards dataset.root=OUT.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from emca.data.builder import BAD_IMAGE_POLICIES
from emca.data.datasets import DATASETS
from emca.data.errors import DatasetError
from emca.data.packing import pack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="ImageFolder tree with train/ and val/")
    parser.add_argument("out", type=Path, help="output folder for info.json and the shards")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle across shards (default 0)")
    parser.add_argument("--on-bad-image", choices=BAD_IMAGE_POLICIES, default="error",
                        help="corrupt images: stop and name the file (error, default) or leave them out (skip)")
    parser.add_argument("--dataset", choices=DATASETS, default="imagefolder",
                        help="which dataset ROOT is, as dataset.name (default imagefolder)")
    parser.add_argument("--workers", type=int, default=4, help="threads screening and reading images (default 4)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        info = pack(args.root, args.out, shard_size=args.shard_size, seed=args.seed,
                    on_bad_image=args.on_bad_image, dataset=args.dataset, workers=args.workers)
    except DatasetError as error:
        print(f"pack_shards: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a full disk, a read-only OUT, an unreadable source: no info.json was written
        print(f"pack_shards: error: {error.filename or args.out}: {error.strerror}; free space or fix the "
              "permissions, then rerun the same command (the shards already complete are kept)", file=sys.stderr)
        return 1
    counts = ", ".join(f"{entry['samples']} {split}" for split, entry in info["splits"].items())
    print(f"{args.out}: {len(info['classes'])} classes, {counts} images; use dataset.format=shards "
          f"dataset.root={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
