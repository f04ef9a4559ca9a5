"""Sharded datasets: scripts/pack_shards.py's tars, indexes and info.json, resuming a packing, the
start-up and read-time checks, and dataset.format=shards through the torchvision loader and the trainer."""

import hashlib
import itertools
import json
import os
import shutil
import signal
import tarfile
from collections import Counter

import pytest
from test_train import assert_same_run, checkpoint

from emca.data import DatasetError, build_loaders
from emca.data.packing import pack
from emca.data.shards import read_info
from emca.engine.progress import EpochProgress
from emca.engine.trainer import Preempted, train

from conftest import QUICK_RUN

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, SHARD_SIZE = 4, 30, 8, 16
SPLITS = {"train": CLASSES * TRAIN_PER_CLASS, "val": CLASSES * VAL_PER_CLASS}


@pytest.fixture(scope="module")
def source(shared_data, tmp_path_factory):
    """A few Tiny-ImageNet classes as an ImageFolder tree of symlinks to the shared images."""
    root = tmp_path_factory.mktemp("source")
    subset = shared_data / "tinyimagenet-subset"
    for name in sorted(os.listdir(subset / "train"))[:CLASSES]:
        for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
            (root / split / name).mkdir(parents=True)
            for file in sorted(os.listdir(subset / split / name))[:count]:
                (root / split / name / file).symlink_to(subset / split / name / file)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMCA_CACHE", str(tmp_path_factory.mktemp("emca-cache")))
        yield


@pytest.fixture(scope="module")
def packed(source, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    pack(source, out, shard_size=SHARD_SIZE, seed=0, workers=2)
    return out


def fresh_copy(packed, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(packed, copy)
    return copy


def file_digests(folder):
    return {path.relative_to(folder): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def source_samples(source, split):
    """(sha256 of the bytes, label) of every source image of `split`."""
    classes = sorted(os.listdir(source / "train"))
    return Counter((hashlib.sha256(path.read_bytes()).hexdigest(), classes.index(path.parent.name))
                   for path in (source / split).glob("*/*"))


def tar_samples(tar_path):
    """{key: {ext: (data offset, size, name, bytes)}} of one shard, as tarfile reads it."""
    samples = {}
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            assert (member.mtime, member.uid, member.gid, member.mode, member.type) == (0, 0, 0, 0o444, tarfile.REGTYPE)
            key, ext = member.name.split(".", 1)
            data = tar.extractfile(member).read()
            samples.setdefault(key, {})[ext] = (member.offset_data, member.size, member.name, data)
    return samples


# --------------------------------------------------------------------------- the packed files
def test_indexes_are_wds2idx_files_of_the_real_member_offsets(packed):
    info = read_info(packed)
    for split, entry in info["splits"].items():
        for shard in entry["shards"]:
            samples = tar_samples(packed / shard["tar"])
            lines = (packed / shard["index"]).read_text().splitlines()
            # DALI's format: "v1.2 <samples>", then per sample "<ext> <offset> <size> <name>" per component.
            assert lines[0] == f"v1.2 {len(samples)}" and len(samples) == shard["samples"]
            assert len(lines) == len(samples) + 1
            for line, components in zip(lines[1:], samples.values(), strict=True):
                fields = line.split(" ")
                listed = [(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3]) for i in (0, 4)]
                assert listed == [(ext, *components[ext][:3]) for ext in components]
                assert all(offset % 512 == 0 for _, offset, _, _ in listed)
            assert (packed / shard["tar"]).stat().st_size == shard["bytes"]
        assert entry["extensions"] == ["jpeg"] and entry["samples"] == SPLITS[split]


def test_every_image_once_per_split_bytes_unchanged_and_classes_mixed(packed, source):
    info = read_info(packed)
    for split, entry in info["splits"].items():
        found, keys = Counter(), []
        for shard in entry["shards"]:
            samples = tar_samples(packed / shard["tar"])
            labels = {int(components["cls"][3]) for components in samples.values()}
            assert len(labels) > 1, shard  # shuffled across shards: no shard of one class
            found.update((hashlib.sha256(parts["jpeg"][3]).hexdigest(), int(parts["cls"][3]))
                         for parts in samples.values())
            keys += samples
        assert found == source_samples(source, split)
        assert keys == [f"{i:08d}" for i in range(SPLITS[split])]
        assert entry["class_counts"] == [SPLITS[split] // CLASSES] * CLASSES


def test_the_webdataset_package_reads_the_shards(packed):
    import webdataset

    tars = [str(packed / shard["tar"]) for shard in read_info(packed)["splits"]["val"]["shards"]]
    samples = list(webdataset.WebDataset(tars, shardshuffle=False))
    assert [sample["__key__"] for sample in samples] == [f"{i:08d}" for i in range(SPLITS["val"])]
    assert all(int(sample["cls"]) in range(CLASSES) and sample["jpeg"][:2] == b"\xff\xd8" for sample in samples)


def test_a_repack_gives_identical_bytes(packed, source, tmp_path):
    pack(source, tmp_path / "again", shard_size=SHARD_SIZE, seed=0, workers=2)
    assert file_digests(tmp_path / "again") == file_digests(packed)
    pack(source, tmp_path / "other", shard_size=SHARD_SIZE, seed=1, workers=2)
    assert file_digests(tmp_path / "other") != file_digests(packed)


def test_a_killed_packing_resumes_with_the_shards_it_finished(packed, source, tmp_path):
    out = fresh_copy(packed, tmp_path)
    train = out / "train"
    (out / "info.json").unlink()
    (train / "shard-000001.idx").unlink()  # killed between the tar's rename and the index's
    (train / "shard-000002.tar").rename(train / ".shard-000002.tar.0123abcd.tmp")  # killed mid-write
    (train / "shard-000002.idx").unlink()
    with open(train / "shard-000003.tar", "r+b") as file:  # a member header of another plan
        file.seek(0)
        file.write(b"9")
    (train / "shard-000099.tar").write_bytes(b"an earlier, larger packing")
    untouched = {name: (train / name).stat().st_mtime_ns for name in ("shard-000000.tar", "shard-000004.tar")}
    with pytest.raises(DatasetError, match="info.json does not exist"):
        read_info(out)

    pack(source, out, shard_size=SHARD_SIZE, seed=0, workers=2)
    assert file_digests(out) == file_digests(packed)  # the temporary and the stale file are gone too
    assert {name: (train / name).stat().st_mtime_ns for name in untouched} == untouched


def test_bad_images_follow_on_bad_image(image_tree, run_script, emca_cache, tmp_path):
    """As in the folder loaders: 'error' stops the packing naming the file, 'skip' leaves it out and counts it."""
    root = image_tree({"train": {"a": 4, "b": 4}, "val": {"a": 2, "b": 2}})
    bad = root / "train" / "b" / "b_1.JPEG"
    bad.write_bytes(bad.read_bytes()[:300])
    out = tmp_path / "out"
    done = run_script("scripts/pack_shards.py", root, out, "--shard-size", "3", env={"EMCA_CACHE": str(emca_cache)})
    assert done.returncode == 1 and not (out / "info.json").exists()
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"pack_shards: error: corrupt image {bad}: ")
    assert line.endswith("; remove or replace it, or set dataset.on_bad_image=skip")
    pack(root, out, shard_size=3, on_bad_image="skip")
    entry = read_info(out)["splits"]["train"]
    assert (entry["samples"], entry["skipped"], entry["class_counts"], len(entry["shards"])) == (7, 1, [4, 3], 3)


# --------------------------------------------------------------------------- loading
def loaders(root, fmt="shards", **options):
    dataset = dict(name="imagefolder", root=str(root), format=fmt, batch_size=8, workers=0, image_size=64,
                   val_resize=64, train_crop="pad_random", **options)
    return build_loaders(dataset, dict(name="torchvision"))


def val_batches(bundle):
    bundle.val.set_epoch(0)
    return [(image.numpy().tobytes(), int(label)) for images, labels in bundle.val for image, label in
            zip(images, labels, strict=True)]


def test_the_torchvision_loader_gives_the_folders_images_and_labels(packed, source):
    shards, folders = loaders(packed), loaders(source, fmt="folder")
    assert (shards.num_train, shards.num_val, shards.classes) == (folders.num_train, folders.num_val, folders.classes)
    assert Counter(val_batches(shards)) == Counter(val_batches(folders))
    assert len(shards.train) == SPLITS["train"] // 8


@pytest.mark.parametrize("damage, message", [
    ("missing", r"shard .*/train/shard-000001\.tar is missing; rerun `python scripts/pack_shards\.py .* --shard-size "
                r"16 --seed 0 --on-bad-image error` to rewrite it"),
    ("truncated", r"shard .*/train/shard-000001\.tar is truncated \(20480 bytes, info\.json says \d+\); rerun `"),
    ("index", r"index file .*/train/shard-000001\.idx does not match the 16 samples info\.json lists for it; rerun `"),
    ("header", r"shard .*/train/shard-000001\.tar does not match its index at member 00000016\.jpeg \(offset 512\); "
               r"rerun `"),
    ("info", r"info\.json does not exist: .* is not a packed shard folder .*; pack it with `python "
             r"scripts/pack_shards\.py SOURCE .*`, or set dataset\.format=folder"),
], ids=["missing", "truncated", "index", "header", "info"])
def test_a_damaged_shard_folder_is_a_one_line_error_that_a_rerun_fixes(damage, message, packed, source, tmp_path):
    out = fresh_copy(packed, tmp_path)
    tar, index = out / "train" / "shard-000001.tar", out / "train" / "shard-000001.idx"
    if damage == "missing":
        tar.unlink()
    elif damage == "truncated":
        os.truncate(tar, 20480)
    elif damage == "index":
        index.write_text(index.read_text().replace(" 512 ", " 1024 ", 1))
    elif damage == "header":
        with open(tar, "r+b") as file:
            file.write(b"9")  # the first member's name
    else:
        (out / "info.json").unlink()
    with pytest.raises(DatasetError, match=message) as caught:
        bundle = loaders(out)
        bundle.train.set_epoch(0)
        for _ in bundle.train:  # a header is checked when its sample is read
            pass
    assert "\n" not in str(caught.value)
    pack(source, out, shard_size=SHARD_SIZE, seed=0, workers=2)
    assert file_digests(out) == file_digests(packed)


# --------------------------------------------------------------------------- training
# One epoch of 3 steps, validated on the 32 val images.
SHARDS_RUN = (*QUICK_RUN, "trainer.epochs=1", "trainer.deterministic=true", "dataset.format=shards",
              "dataset.num_classes=null")


def test_a_shards_run_stopped_mid_epoch_resumes_bit_identically(packed, compose_train, tmp_path, monkeypatch):
    run = (*SHARDS_RUN, f"dataset.root={packed}")
    results = train(compose_train(*run), str(tmp_path / "full"))
    assert (results["num_train"], results["num_val"]) == (SPLITS["train"], SPLITS["val"])
    advance, steps = EpochProgress.advance, itertools.count(1)

    def advance_then_preempt(self):
        advance(self)
        if next(steps) == 2:  # after the second of 3 steps
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(EpochProgress, "advance", advance_then_preempt)
    with pytest.raises(Preempted):
        train(compose_train(*run), str(tmp_path / "stopped"))
    monkeypatch.undo()
    progress = checkpoint(tmp_path / "stopped")["progress"]
    assert (progress["epoch"], progress["step_in_epoch"]) == (0, 2)
    train(compose_train(*run, "trainer.resume=auto"), str(tmp_path / "stopped"))
    assert_same_run(checkpoint(tmp_path / "stopped"), checkpoint(tmp_path / "full"))
    assert json.loads((tmp_path / "stopped" / "results.json").read_text())["num_val"] == SPLITS["val"]
