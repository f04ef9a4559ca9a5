"""The sharded dataset format (dataset.format=shards): WebDataset tar shards, their DALI index files
and info.json, as scripts/pack_shards.py writes them; reading and verifying them.

A packed folder OUT holds:
    OUT/info.json                      what a loader needs at start-up (see emca.data.packing)
    OUT/<split>/shard-000000.tar       WebDataset shards; per sample <key>.<ext> then <key>.cls
    OUT/<split>/shard-000000.idx       the shard's index in the format of DALI's tools/wds2idx.py
<key> is the sample's position in its split, 8 digits, so a shard holds consecutive keys. <ext> is
the source file's lowercase suffix (jpeg, jpg, png, ...): the image bytes are stored unchanged, and
a WebDataset decoder picks its decoder by that extension. <key>.cls is the label as ASCII digits.
Every member has a fixed tar header (USTAR, mtime 0, uid/gid 0, mode 0444), so a repack of the same
source gives the same bytes, and a member's header can be checked against the one expected.

Index (wds2idx v1.2): the line `v1.2 <samples>`, then per sample its components on one line, each
`<ext> <data offset> <size> <member name>`; offsets are of the member's data, multiples of 512.

Read pattern (loader=torchvision): random access. A sample opens its shard and reads its image and
label members in one read at the offsets of the index, so the existing samplers give each epoch's
order and every guarantee of the folder loaders. Reads hop between shards as reads of loose files
hop between files; the gain on a network file system is that a few thousand shards stand for a
million files (no listing or screening at start-up, few names to look up), not sequential reading.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Optional, Sequence

import numpy as np

from emca.data.errors import DatasetError

FORMAT = "emca-shards"
VERSION = 1
INFO = "info.json"
SPLITS = ("train", "val")
INDEX_VERSION = "v1.2"
KEY_DIGITS = 8
BLOCK = 512  # tar block
RECORD = 20 * BLOCK  # tar pads the archive to whole records, as tarfile and GNU tar do
LABEL_EXT = "cls"


def shard_name(number: int) -> str:
    return f"shard-{number:06d}"


def sample_key(position: int) -> str:
    return f"{position:0{KEY_DIGITS}d}"


def _padded(size: int, unit: int = BLOCK) -> int:
    return -(-size // unit) * unit


def member_header(name: str, size: int) -> bytes:
    """The tar header of a shard member: fixed metadata, so that shards are byte-reproducible."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = size, 0, 0o444, 0, 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def shard_layout(members: Sequence[tuple[str, int]]) -> tuple[list[int], int]:
    """The data offsets of `members` (name, size) in a shard written by write_tar, and its size."""
    offsets, position = [], 0
    for _, size in members:
        offsets.append(position + BLOCK)
        position += BLOCK + _padded(size)
    return offsets, _padded(position + 2 * BLOCK, RECORD)  # two zero blocks end the archive


def write_tar(file: IO[bytes], members: Iterable[tuple[str, bytes]]) -> int:
    """Write a shard of `members` (name, data) as shard_layout lays it out; returns its size."""
    position = 0
    for name, data in members:
        file.write(member_header(name, len(data)))
        file.write(data)
        file.write(bytes(_padded(len(data)) - len(data)))
        position += BLOCK + _padded(len(data))
    end = _padded(position + 2 * BLOCK, RECORD)
    file.write(bytes(end - position))
    return end


def split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member name, split at the first dot as WebDataset and DALI do."""
    key, _, ext = name.partition(".")
    return key, ext


def index_text(members: Sequence[tuple[str, int]]) -> str:
    """The wds2idx (v1.2) index of a shard holding `members` in order: one sample per run of a key."""
    offsets, _ = shard_layout(members)
    lines, last = [], None
    for (name, size), offset in zip(members, offsets, strict=True):
        key, ext = split_name(name)
        component = f"{ext} {offset} {size} {name}"
        if key == last:
            lines[-1] += " " + component
        else:
            lines.append(component)
            last = key
    return f"{INDEX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines)


def repack_fix(info: dict, root: Path) -> str:
    """The command that rewrites the damaged shards of `root` from their source."""
    source, pack = info["source"], info["pack"]
    dataset = "" if source["dataset"] == "imagefolder" else f" --dataset {source['dataset']}"
    return (
        f"rerun `python scripts/pack_shards.py {source['root']} {root} --shard-size {pack['shard_size']} "
        f"--seed {pack['seed']} --on-bad-image {pack['on_bad_image']}{dataset}` to rewrite it"
    )


def read_info(root: Path) -> dict:
    """OUT/info.json of a packed folder; a one-line DatasetError if it is missing or not ours."""
    path = Path(root) / INFO
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(
            f"{path} does not exist: {root} is not a packed shard folder (or its packing did not finish); pack it with "
            f"`python scripts/pack_shards.py SOURCE {root}`, or set dataset.format=folder for an ImageFolder tree"
        ) from None
    except (OSError, ValueError) as error:
        raise DatasetError(
            f"cannot read {path} ({error}); repack with `python scripts/pack_shards.py SOURCE {root}`"
        ) from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or info.get("version") != VERSION:
        raise DatasetError(
            f"{path} is not an {FORMAT} version {VERSION} info file; repack with `python scripts/pack_shards.py "
            f"SOURCE {root}`"
        )
    return info


@dataclass(frozen=True)
class ShardList:
    """One split's samples in shards, by position: the shard, offset and size of each image member.

    Built from info.json and the index files alone. The label is read with the image (its .cls
    member follows the image's), so labels cost nothing at start-up.
    """

    tars: list[str]  # absolute paths, one per shard
    indexes: list[str]  # the shards' index files
    shard: np.ndarray  # int32 per sample: position in tars
    offsets: np.ndarray  # int64: the image member's data offset
    sizes: np.ndarray  # int64: the image member's size
    label_sizes: np.ndarray  # int64: the .cls member's size
    extensions: list[str]  # the image extensions the split uses
    ext_ids: np.ndarray  # uint8 per sample: position in extensions
    label_map: np.ndarray  # int64: info.json's class index -> the index into `classes`
    classes: list[str]
    fix: str  # how to repair a damaged shard
    skipped: int  # source images left out at packing (on_bad_image=skip)

    def __len__(self) -> int:
        return len(self.offsets)

    def member(self, index: int) -> tuple[str, str]:
        """(shard path, image member name) of sample `index`."""
        key = sample_key(index)
        return self.tars[self.shard[index]], f"{key}.{self.extensions[self.ext_ids[index]]}"

    def read(self, index: int) -> tuple[bytes, int]:
        """The image bytes of sample `index`, as packed, and its label; the members' headers are
        checked on the way (a one-line DatasetError if they are not those the index promises)."""
        path, name = self.member(index)
        offset, size, label_size = int(self.offsets[index]), int(self.sizes[index]), int(self.label_sizes[index])
        label_at = BLOCK + _padded(size)  # the .cls member's header, counted from the image's header
        try:
            with open(path, "rb") as file:
                file.seek(offset - BLOCK)
                data = file.read(label_at + BLOCK + label_size)
        except OSError as error:
            raise DatasetError(
                f"cannot read shard {path} ({error.strerror or error}); check the file, or {self.fix}"
            ) from None
        label = data[label_at + BLOCK:]
        if (
            data[:BLOCK] != member_header(name, size)
            or data[label_at:label_at + BLOCK] != member_header(f"{sample_key(index)}.{LABEL_EXT}", label_size)
            or len(label) != label_size
            or not label.isdigit()
            or int(label) >= len(self.label_map)
        ):
            raise DatasetError(f"shard {path} does not match its index at member {name} (offset {offset}); {self.fix}")
        return data[BLOCK:BLOCK + size], int(self.label_map[int(label)])

    def open(self, index: int) -> tuple[IO[bytes], int]:
        """What the torchvision loader decodes for sample `index` (the image as a file), and its label."""
        data, label = self.read(index)
        return io.BytesIO(data), label

    def describe(self, index: int, error: BaseException) -> str:
        """The one-line error for sample `index` failing to decode with `error`."""
        path, name = self.member(index)
        # PIL names an in-memory file by its repr (<_io.BytesIO object at 0x...>): the member is named instead.
        reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", name, str(error))
        return (
            f"corrupt image {name} in shard {path}: not a decodable image ({type(error).__name__}: {reason}); "
            f"fix its source image, then {self.fix}"
        )


def load_split(root: Path, split: str, info: dict, classes: Optional[Sequence[str]] = None) -> ShardList:
    """The samples of `split` in the packed folder `root` (info: its read_info), checked cheaply:
    each shard exists with the size info.json records, its index parses and agrees with info.json.

    `classes`: the names the labels are to index (a trained model's); the split's classes must be
    among them. Default: info.json's classes.
    """
    root = Path(root)
    fix = repack_fix(info, root)
    entry = info["splits"][split]
    label_map = _label_map(info["classes"], entry["class_counts"], classes, root / INFO)
    extensions = list(entry["extensions"])
    tars, indexes, columns, first = [], [], [], 0
    for shard in entry["shards"]:
        tar, index = root / shard["tar"], root / shard["index"]
        _check_size(tar, shard["bytes"], fix)
        columns.append(_read_index(index, first, shard["samples"], shard["bytes"], extensions, fix))
        tars.append(str(tar))
        indexes.append(str(index))
        first += shard["samples"]
    if first != entry["samples"] or not columns:
        raise DatasetError(f"{root / INFO} lists {first} {split} samples in shards, {entry['samples']} in all; {fix}")
    offsets, sizes, label_sizes, ext_ids = (np.concatenate(column) for column in zip(*columns, strict=True))
    shard_of = np.repeat(np.arange(len(tars), dtype=np.int32), [shard["samples"] for shard in entry["shards"]])
    return ShardList(tars, indexes, shard_of, offsets, sizes, label_sizes, extensions, ext_ids, label_map,
                     list(info["classes"] if classes is None else classes), fix, entry["skipped"])


def _label_map(own: list[str], counts: list[int], classes: Optional[Sequence[str]], info_path: Path) -> np.ndarray:
    """info.json's class index -> the index into `classes`; -1 for a class the split has no sample of."""
    if classes is None:
        return np.arange(len(own), dtype=np.int64)
    index = {name: i for i, name in enumerate(classes)}
    unknown = [name for name, count in zip(own, counts, strict=True) if count and name not in index]
    if unknown:
        raise DatasetError(
            f"{info_path} has classes that the training classes lack ({', '.join(unknown[:3])}"
            f"{', ...' if len(unknown) > 3 else ''}); validation classes must be a subset of the training classes"
        )
    return np.array([index.get(name, -1) for name in own], dtype=np.int64)


def _check_size(tar: Path, expected: int, fix: str) -> None:
    try:
        size = os.stat(tar).st_size
    except FileNotFoundError:
        raise DatasetError(f"shard {tar} is missing; {fix}") from None
    except OSError as error:
        raise DatasetError(f"cannot read shard {tar} ({error.strerror or error}); check the file, or {fix}") from None
    if size != expected:
        state = "truncated" if size < expected else "longer than packed"
        raise DatasetError(f"shard {tar} is {state} ({size} bytes, info.json says {expected}); {fix}")


def _read_index(path: Path, first: int, samples: int, tar_size: int, extensions: list[str], fix: str):
    """(offsets, sizes, label sizes, extension ids) of the image members an index file lists: it
    must be exactly the index of samples first.. of a shard of `tar_size` bytes as write_tar lays it out."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DatasetError(f"index file {path} is missing; {fix}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"cannot read index file {path} ({error}); {fix}") from None
    try:  # each line: <ext> <offset> <size> <name> cls <offset> <size> <name>
        rows = [line.split(" ") for line in text.splitlines()[1:]]
        members = [(row[i + 3], int(row[i + 2])) for row in rows for i in (0, 4) if len(row) == 8]
    except ValueError:
        members = []
    keys = [sample_key(first + n) for n in range(samples)]
    exts = [split_name(name)[1] for name, _ in members[::2]]
    expected = [name for key, ext in zip(keys, exts, strict=False) for name in (f"{key}.{ext}", f"{key}.{LABEL_EXT}")]
    offsets, size = shard_layout(members)
    if (
        len(members) != 2 * samples
        or [name for name, _ in members] != expected
        or not set(exts) <= set(extensions)
        or text != index_text(members)
        or size != tar_size
    ):
        raise DatasetError(f"index file {path} does not match the {samples} samples info.json lists for it; {fix}")
    offsets = np.asarray(offsets[::2], dtype=np.int64)
    sizes = np.asarray([size for _, size in members], dtype=np.int64)
    ext_ids = np.asarray([extensions.index(ext) for ext in exts], dtype=np.uint8)
    return offsets, sizes[::2], sizes[1::2], ext_ids
