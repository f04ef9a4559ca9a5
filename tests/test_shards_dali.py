"""loader=dali over tar shards (dataset.format=shards): every validation image once across ranks,
equal training steps per rank, epochs that depend on (seed, epoch) alone, exact mid-epoch resume,
one-line errors naming a damaged shard or member; the benchmark's shards mode."""

import collections
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, SHARED_DATA, preempt_after_step

pytest.importorskip("nvidia.dali")

from emca.data import DatasetConfig, DatasetError, LoaderConfig, build_loaders  # noqa: E402
from emca.data.packing import pack  # noqa: E402
from emca.data.shards import load_split, read_info  # noqa: E402
from emca.engine.trainer import Preempted, train  # noqa: E402

TINY = SHARED_DATA / "tinyimagenet-subset"
# 4 classes: 30 train and 9 val images each, in shards of 16.
CLASSES, TRAIN_EACH, VAL_EACH, SHARD_SIZE = 4, 30, 9, 16


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """(ImageFolder tree of symlinks into the shared Tiny-ImageNet subset, its packed shards)."""
    if not TINY.is_dir():
        pytest.skip(f"shared Tiny-ImageNet subset not found at {TINY}")
    scratch = tmp_path_factory.mktemp("shards")
    for split, each in (("train", TRAIN_EACH), ("val", VAL_EACH)):
        for name in sorted(os.listdir(TINY / split))[:CLASSES]:
            (scratch / "tree" / split / name).mkdir(parents=True)
            for file in sorted(os.listdir(TINY / split / name))[:each]:
                os.symlink(TINY / split / name / file, scratch / "tree" / split / name / file)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMCA_CACHE", str(scratch / "cache"))  # the folders' image-check cache
        pack(scratch / "tree", scratch / "packed", shard_size=SHARD_SIZE, workers=1)
        yield scratch / "tree", scratch / "packed"


def dataset(root, **fields) -> DatasetConfig:
    fields = {**dict(root=str(root), image_size=16, val_resize=16, batch_size=8, workers=1), **fields}
    return DatasetConfig(format="shards" if (root / "info.json").exists() else "folder", **fields)


def labels_of(loader, epoch=0) -> list[int]:
    loader.set_epoch(epoch)
    return [label for _, labels in loader for label in labels.tolist()]


def test_validation_gives_every_image_once_across_two_ranks_with_the_folders_labels(packed):
    tree, shards = packed
    ranks = [build_loaders(dataset(shards), LoaderConfig(name="dali"), rank=r, world_size=2).val for r in (0, 1)]
    seen = [labels_of(loader) for loader in ranks]
    assert [len(labels) for labels in seen] == [CLASSES * VAL_EACH // 2] * 2
    assert [len(loader) for loader in ranks] == [5, 5]  # 18 images in batches of 4
    # Validation reads the shards in order: rank 0 the first half, rank 1 the rest, each label as packed.
    samples = load_split(shards, "val", read_info(shards))
    assert seen[0] + seen[1] == [samples.read(i)[1] for i in range(len(samples))]
    folder = build_loaders(dataset(tree), LoaderConfig(name="dali")).val
    assert collections.Counter(seen[0] + seen[1]) == collections.Counter(labels_of(folder))


def test_every_rank_runs_the_same_number_of_training_batches(packed):
    # 120 samples over 7 ranks: the reader's parts hold 17 or 18 samples, 8 or 9 batches of 2;
    # every rank stops at the 8 whole global batches of 14.
    loaders = [build_loaders(dataset(packed[1], batch_size=14), LoaderConfig(name="dali"), rank=r, world_size=7).train
               for r in range(7)]
    assert [len(labels_of(loader)) for loader in loaders] == [16] * 7
    assert {len(loader) for loader in loaders} == {8}


def test_an_epoch_depends_on_seed_and_epoch_alone(packed):
    def batches(epoch, seed=0):
        loader = build_loaders(dataset(packed[1]), LoaderConfig(name="dali"), seed=seed, rank=1, world_size=2).train
        loader.set_epoch(epoch)
        return [(images, labels) for images, labels in loader]

    first, again, other_epoch, other_seed = batches(1), batches(1), batches(2), batches(1, seed=1)
    assert len(first) == len(again) == 15  # 120 images in global batches of 8
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0][0], other_epoch[0][0]) and not torch.equal(first[0][0], other_seed[0][0])


def test_stopped_mid_epoch_and_resumed_is_bit_identical(packed, compose_train, tmp_path, monkeypatch):
    from test_train import DETERMINISTIC, assert_same_run, checkpoint

    # 120 images in global batches of 32: one epoch of 3 steps, stopped after the second.
    run = (*DETERMINISTIC, "loader=dali", "dataset=imagefolder", f"dataset.root={packed[1]}", "dataset.format=shards",
           "dataset.num_classes=null", "trainer.epochs=1")
    train(compose_train(*run), str(tmp_path / "full"))
    preempt_after_step(monkeypatch, 2)
    with pytest.raises(Preempted):
        train(compose_train(*run), str(tmp_path / "resumed"))
    monkeypatch.undo()
    assert checkpoint(tmp_path / "resumed")["progress"]["step_in_epoch"] == 2
    train(compose_train(*run, "trainer.resume=auto"), str(tmp_path / "resumed"))
    assert_same_run(checkpoint(tmp_path / "resumed"), checkpoint(tmp_path / "full"))


def test_a_truncated_shard_is_named_in_one_line(packed, tmp_path):
    import shutil

    damaged = shutil.copytree(packed[1], tmp_path / "packed")
    tar = damaged / "train" / "shard-000002.tar"
    os.truncate(tar, tar.stat().st_size // 2)
    with pytest.raises(DatasetError) as error:
        build_loaders(dataset(damaged), LoaderConfig(name="dali"))
    message = str(error.value)
    assert f"shard {tar} is truncated" in message and "pack_shards.py" in message and "\n" not in message


def test_a_member_that_fails_to_decode_is_named(packed, tmp_path):
    import shutil

    damaged = shutil.copytree(packed[1], tmp_path / "packed")
    samples = load_split(damaged, "train", read_info(damaged))
    victim = 57
    path, member = samples.member(victim)
    with open(path, "r+b") as file:  # the image's bytes overwritten, its size and tar headers intact
        file.seek(int(samples.offsets[victim]))
        file.write(bytes(int(samples.sizes[victim])))
    loader = build_loaders(dataset(damaged), LoaderConfig(name="dali")).train
    with pytest.raises(DatasetError) as error:
        labels_of(loader)
    message = str(error.value)
    assert message.startswith(f"corrupt image {member} in shard {path}: ") and "\n" not in message
    assert "0x" not in message  # PIL's repr of the in-memory file, with its address, is replaced by the name


def test_the_benchmark_times_both_loaders_over_folders_and_shards():
    samples = SHARED_DATA / "imagenet-samples"
    if not samples.is_dir():
        pytest.skip(f"shared JPEG samples not found at {samples}")
    done = subprocess.run(
        [sys.executable, "benchmarks/loader_throughput.py", "--data", str(samples), "--threads", "1", "--batch-size",
         "8", "--image-size", "32", "--epochs", "1", "--warmup", "0", "--shards", "--shard-size", "100"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout.split("shards / folder")[0].splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in table if line.startswith(("dali-", "torchvision"))}
    assert list(rows) == ["dali-cpu", "torchvision", "dali-cpu-shards", "torchvision-shards"]
    assert all(float(value) > 0 for values in rows.values() for value in values)
    ratios = done.stdout.split("shards / folder")[1].splitlines()[1:]
    assert [line.split()[0] for line in ratios] == ["dali-cpu", "torchvision"]
    assert all(value.endswith("x") and float(value[:-1]) > 0 for line in ratios for value in line.split()[1:])


@pytest.mark.parametrize("on", ["folder", "shards"])
def test_the_nfs_reader_options_change_how_files_are_read_not_what(packed, on):
    nfs = LoaderConfig(name="dali", dali_dont_use_mmap=True, dali_read_ahead=True, dali_reader_prefetch=3)
    root = packed[1] if on == "shards" else packed[0]
    batches = [list(build_loaders(dataset(root), loader).train) for loader in (LoaderConfig(name="dali"), nfs)]
    assert len(batches[0]) == 15
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(*batches, strict=True))
