"""Loaders: shapes, labels, sharding, determinism, DALI/torchvision agreement, digits, synthetic."""
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from sklearn.datasets import load_digits

from emca.data import DatasetConfig, DatasetError, LoaderConfig, build_loaders
from emca.data import builder as builder_module
from emca.data.builder import loader_workers
from emca.data.datasets import ensure_digits
from emca.data.sampling import train_shard, val_shard

LOADERS = ["dali", "torchvision"]


@pytest.fixture(autouse=True)
def _private_cache(emca_cache):
    """Keep generated digits and image-check caches out of the home folder."""


def dataset_cfg(root, **overrides):
    fields = dict(name="imagefolder", root=str(root), image_size=32, val_resize=32, batch_size=4, workers=1,
                  crop_scale=[0.5, 1.0])
    fields.update(overrides)
    return OmegaConf.structured(DatasetConfig(**fields))


def loader_cfg(name, **overrides):
    return OmegaConf.structured(LoaderConfig(name=name, persistent_workers=False, **overrides))


def run_epoch(loader, epoch=0):
    loader.set_epoch(epoch)
    images, labels = zip(*[(x.clone(), y.clone()) for x, y in loader], strict=True)
    return torch.cat(images), torch.cat(labels)


def dominant_channel(images):
    return images.mean(dim=(2, 3)).argmax(dim=1)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_batches_have_shapes_dtypes_and_folder_labels(image_tree, loader, channels_last):
    root = image_tree({"train": {"a": 5, "b": 4, "c": 3}, "val": {"a": 2, "b": 2, "c": 1}})
    bundle = build_loaders(dataset_cfg(root), loader_cfg(loader), channels_last=channels_last)
    assert (bundle.num_classes, bundle.classes, bundle.num_train, bundle.num_val) == (3, ["a", "b", "c"], 12, 5)
    assert (len(bundle.train), len(bundle.val)) == (3, 2)
    for split, expected_batches in ((bundle.train, 3), (bundle.val, 2)):
        split.set_epoch(0)
        batches = list(split)
        assert len(batches) == expected_batches
        for images, labels in batches:
            assert images.dtype == torch.float32 and labels.dtype == torch.int64
            assert images.shape[1:] == (3, 32, 32) and images.shape[0] == labels.shape[0]
            assert images.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            # Each class' images are dominated by one colour channel; crops keep that.
            assert torch.equal(dominant_channel(images), labels)
    _, val_labels = run_epoch(bundle.val)
    assert val_labels.tolist() == [0, 0, 1, 1, 2]  # unshuffled, in folder order


@pytest.mark.parametrize("loader", LOADERS)
def test_shared_tiny_imagenet_subset(shared_data, loader):
    root = shared_data / "tinyimagenet-subset"
    cfg = OmegaConf.load("configs/dataset/tiny_imagenet.yaml")
    cfg.merge_with({"root": str(root), "workers": 2})
    assert cfg.batch_size == 32  # the paper's Tiny-ImageNet batch
    bundle = build_loaders(cfg, loader_cfg(loader))
    wnids = [line.split("\t")[1] for line in (root / "classes.tsv").read_text().splitlines()[1:]]
    assert bundle.classes == sorted(wnids) and bundle.num_classes == 20
    assert (bundle.num_train, bundle.num_val) == (10_000, 1_000)
    images, labels = run_epoch(bundle.val)
    assert images.shape == (1000, 3, 64, 64)  # 114 greyscale JPEGs among them come out RGB
    assert labels.tolist() == [i for i in range(20) for _ in range(50)]
    bundle.train.set_epoch(0)
    images, labels = next(iter(bundle.train))
    assert images.shape == (cfg.batch_size, 3, 64, 64) and labels.dtype == torch.int64
    assert 0 <= labels.min() and labels.max() < 20


def test_dali_val_matches_torchvision_on_imagenet_samples(shared_data, tmp_path):
    # The same 241 full-size JPEGs (23 greyscale, 65 with ICC profiles) as train and val.
    for split in ("train", "val"):
        os.symlink(shared_data / "imagenet-samples", tmp_path / split)
    cfg = dataset_cfg(tmp_path, image_size=224, val_resize=256, batch_size=32, workers=2)
    dali, tv = (build_loaders(cfg, loader_cfg(name)).val for name in LOADERS)
    dali_images, dali_labels = run_epoch(dali)
    tv_images, tv_labels = run_epoch(tv)
    assert torch.equal(dali_labels, tv_labels) and dali_images.shape == (241, 3, 224, 224)
    per_image = (dali_images - tv_images).abs().mean(dim=(1, 2, 3))
    # Both decode with libjpeg-turbo (bit-identical pixels) and share the resize/crop geometry
    # (transforms.val_geometry); what remains is DALI's vs PIL's antialiased linear resampling,
    # measured at a median 0.007 and a worst image 0.033 normalised units (under 2 of 255 levels
    # at std ~58). A geometry error (one-pixel shift, wrong size, BGR, unnormalised) costs 0.2+.
    assert per_image.max() < 0.06, per_image.max()
    assert per_image.mean() < 0.015, per_image.mean()


@pytest.mark.parametrize("loader", LOADERS)
def test_two_val_shards_cover_the_set_exactly_once(image_tree, loader):
    root = image_tree({"train": {"a": 4, "b": 4}, "val": {"a": 4, "b": 3}})
    whole, _ = run_epoch(build_loaders(dataset_cfg(root), loader_cfg(loader)).val)
    shards = [build_loaders(dataset_cfg(root), loader_cfg(loader), rank=r, world_size=2) for r in range(2)]
    parts = [run_epoch(bundle.val)[0] for bundle in shards]
    assert [len(p) for p in parts] == [4, 3]  # 7 images, no padding duplicates, no drops
    assert [len(bundle.val) for bundle in shards] == [2, 2]  # per-rank batch 2, last one partial
    assert torch.equal(torch.cat(parts), whole)
    assert all(bundle.num_val == 7 for bundle in shards)


def test_train_shards_are_disjoint_equal_and_drop_the_partial_batch():
    shards = [train_shard(103, 8, seed=5, epoch=2, rank=r, world_size=4) for r in range(4)]
    assert all(len(s) == 24 for s in shards)  # 12 global batches of 8 -> 24 per rank, 7 dropped
    assert len(np.unique(np.concatenate(shards))) == 96
    assert np.array_equal(shards[1], train_shard(103, 8, seed=5, epoch=2, rank=1, world_size=4))
    assert not np.array_equal(shards[1], train_shard(103, 8, seed=5, epoch=3, rank=1, world_size=4))
    parts = [val_shard(103, rank=r, world_size=4) for r in range(4)]
    assert np.array_equal(np.concatenate(parts), np.arange(103))


@pytest.mark.parametrize("loader", LOADERS)
def test_epochs_depend_only_on_seed_and_epoch(image_tree, loader):
    root = image_tree({"train": {"a": 8, "b": 8}, "val": {"a": 1}})
    cfg = dataset_cfg(root, batch_size=8)
    bundle = build_loaders(cfg, loader_cfg(loader), seed=7)
    run_epoch(bundle.train, 2)
    images, labels = run_epoch(bundle.train, 3)
    # A fresh loader jumping straight to epoch 3 (a resumed run) sees exactly the same batches.
    resumed = build_loaders(cfg, loader_cfg(loader), seed=7)
    assert all(torch.equal(a, b) for a, b in zip((images, labels), run_epoch(resumed.train, 3), strict=True))
    other_images, other_labels = run_epoch(bundle.train, 4)
    assert not torch.equal(images, other_images)
    other_seed, _ = run_epoch(build_loaders(cfg, loader_cfg(loader), seed=8).train, 3)
    assert not torch.equal(images, other_seed)


def test_torchvision_augmentation_does_not_depend_on_worker_count(image_tree):
    root = image_tree({"train": {"a": 6, "b": 6}, "val": {"a": 1}})
    runs = [
        run_epoch(build_loaders(dataset_cfg(root, workers=w, batch_size=4), loader_cfg("torchvision")).train, 1)
        for w in (0, 2)
    ]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("loader", LOADERS)
def test_pad_random_crop_is_a_zero_padded_shift(image_tree, loader):
    root = image_tree({"train": {"a": 4}}, size=(32, 32))
    os.symlink(root / "train", root / "val")  # val = the training images, unaugmented
    plain = dataset_cfg(root, train_crop="pad_random", crop_padding=0, hflip=False)
    bundle = build_loaders(plain, loader_cfg(loader))
    val_images, _ = run_epoch(bundle.val)
    # Without padding the training crop is the whole image (train order is shuffled: compare sets).
    train_images, _ = run_epoch(bundle.train)
    assert sorted(x.sum().item() for x in train_images) == pytest.approx(sorted(x.sum().item() for x in val_images))

    padded_cfg = dataset_cfg(root, train_crop="pad_random", crop_padding=4, hflip=False)
    padded = build_loaders(padded_cfg, loader_cfg(loader))
    zero = -torch.tensor(padded_cfg.mean) / torch.tensor(padded_cfg.std)  # a padding pixel, normalised
    for image in run_epoch(padded.train, 5)[0]:
        assert any(_is_shift(image, original, zero) for original in val_images)


def _is_shift(image, original, zero, pad=4):
    size = original.shape[-1]
    canvas = zero.view(3, 1, 1).expand(3, size + 2 * pad, size + 2 * pad).clone()
    canvas[:, pad:pad + size, pad:pad + size] = original
    return any(torch.allclose(image, canvas[:, y:y + size, x:x + size], atol=1e-5)
               for y in range(2 * pad + 1) for x in range(2 * pad + 1))


@pytest.mark.parametrize("loader", LOADERS)
def test_default_digits_dataset_builds_offline(loader):
    cfg = OmegaConf.load("configs/dataset/digits.yaml")
    bundle = build_loaders(cfg, loader_cfg(loader))
    assert (bundle.num_classes, bundle.num_train, bundle.num_val) == (10, 1437, 360)
    assert bundle.classes == [str(d) for d in range(10)]
    images, labels = run_epoch(bundle.val)
    assert images.shape == (360, 3, 32, 32)
    per_class = np.bincount(load_digits().target)
    assert np.abs(torch.bincount(labels).numpy() - 0.2 * per_class).max() <= 1  # stratified 80/20 split


def test_digits_generation_is_safe_when_processes_race(tmp_path):
    root = tmp_path / "digits"
    start = threading.Barrier(4)

    def build():
        start.wait()
        ensure_digits(root)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: build(), range(4)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"]  # losers cleaned up
    assert len(list((root / "train").rglob("*.png"))) == 1437 and len(list((root / "val").rglob("*.png"))) == 360


def test_synthetic_loader_reads_no_files():
    cfg = dataset_cfg("/nonexistent", image_size=24, batch_size=8, num_classes=None)
    bundle = build_loaders(
        cfg, loader_cfg("synthetic", steps_per_epoch=3, val_steps=2), world_size=2, channels_last=True
    )
    assert (bundle.num_classes, bundle.num_train, bundle.num_val) == (1000, 24, 16)
    assert (len(bundle.train), len(bundle.val)) == (3, 2)
    bundle.train.set_epoch(0)
    batches = list(bundle.train)
    assert len(batches) == 3
    images, labels = batches[0]
    assert images.shape == (4, 3, 24, 24) and images.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64 and labels.max() < 1000


@pytest.mark.cuda
def test_dali_mixed_decoder_on_gpu_matches_cpu(image_tree):
    root = image_tree({"train": {"a": 4, "b": 4}, "val": {"a": 3, "b": 3}}, size=(80, 60))
    cfg = dataset_cfg(root, image_size=48, val_resize=56)
    gpu = build_loaders(cfg, loader_cfg("dali"), device=torch.device("cuda", 0), channels_last=True)
    cpu = build_loaders(cfg, loader_cfg("dali"))
    gpu_images, gpu_labels = run_epoch(gpu.val)
    cpu_images, cpu_labels = run_epoch(cpu.val)
    assert gpu_images.is_cuda and gpu_labels.is_cuda and gpu_images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(gpu_labels.cpu(), cpu_labels)
    # nvJPEG's IDCT/upsampling differ slightly from libjpeg-turbo's: compare in normalised units.
    assert (gpu_images.cpu() - cpu_images).abs().mean() < 0.05
    gpu.train.set_epoch(0)
    images, labels = next(iter(gpu.train))
    assert images.is_cuda and images.shape == (4, 3, 48, 48) and torch.equal(dominant_channel(images), labels)


@pytest.mark.parametrize("loader", LOADERS)
def test_validation_alone_needs_no_train_folder_and_keeps_the_given_labels(image_tree, loader):
    root = image_tree({"val": {"b": 2, "c": 1}})
    bundle = build_loaders(dataset_cfg(root), loader_cfg(loader), train=False, classes=["a", "b", "c"])
    assert bundle.train is None and bundle.num_train == 0
    assert bundle.classes == ["a", "b", "c"] and bundle.num_classes == 3 and bundle.num_val == 3
    _, labels = run_epoch(bundle.val)
    assert sorted(labels.tolist()) == [1, 1, 2]  # b and c keep the trained model's indices
    # Without the names, val/'s own folders are the classes.
    assert build_loaders(dataset_cfg(root), loader_cfg(loader), train=False).classes == ["b", "c"]


def test_validation_alone_still_checks_its_folder_and_class_names(image_tree, tmp_path):
    root = image_tree({"val": {"a": 1, "z": 1}})
    with pytest.raises(DatasetError, match="class folders that the training classes lack \\(z\\)"):
        build_loaders(dataset_cfg(root), loader_cfg("torchvision"), train=False, classes=["a", "b"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        DatasetError, match="has no val/ folder; dataset 'imagefolder' expects .*/val/<class>/ image folders$"
    ):
        build_loaders(dataset_cfg(tmp_path / "empty"), loader_cfg("torchvision"), train=False)
    with pytest.raises(DatasetError, match="does not exist; set dataset.root to a folder with val/ class folders$"):
        build_loaders(dataset_cfg(tmp_path / "missing"), loader_cfg("torchvision"), train=False)
    with pytest.raises(DatasetError, match=r"dataset.num_classes=5 but .*/val has 2 class folders"):
        build_loaders(dataset_cfg(root, num_classes=5), loader_cfg("torchvision"), train=False)
    with pytest.raises(DatasetError, match=r"dataset.num_classes=5 but the given class list has 3 names"):
        build_loaders(dataset_cfg(root, num_classes=5), loader_cfg("torchvision"), train=False, classes=["a", "y", "z"])


@pytest.mark.parametrize("cores, ranks_here, expected", [(2, None, 2), (1, None, 1), (64, None, 8), (16, "4", 4),
                                                          (2, "4", 1)])
def test_default_loader_workers_fit_the_cores_this_process_may_use(monkeypatch, cores, ranks_here, expected):
    monkeypatch.setattr(builder_module.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    if ranks_here is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks_here)
    assert loader_workers(None) == expected
    assert loader_workers(3) == 3  # a number is taken as given


@pytest.mark.parametrize("dataset", ["imagefolder", "tiny_imagenet", "imagenet"])
def test_the_image_datasets_default_to_the_machines_cores(compose_train, dataset):
    # They asked for 4 (8) workers whatever the machine: PyTorch warned twice on 2 cores.
    assert compose_train(f"dataset={dataset}").dataset.workers is None


def test_a_loader_with_default_workers_uses_the_cores_and_pytorch_does_not_warn(image_tree, monkeypatch):
    monkeypatch.setattr(builder_module.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    root = image_tree({"train": {"a": 4, "b": 4}, "val": {"a": 2}})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*worker processes in total.*")
        bundle = build_loaders(dataset_cfg(root, workers=None), loader_cfg("torchvision"))
        run_epoch(bundle.train)
    assert bundle.workers == 2 and bundle.train.loader.num_workers == 2
