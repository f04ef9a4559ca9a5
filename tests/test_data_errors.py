"""Bad inputs: each one stops build_loaders with a one-line DatasetError naming problem and fix."""
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from emca.data import DatasetConfig, DatasetError, LoaderConfig, build_loaders
from emca.data import folder

LOADERS = ["dali", "torchvision"]


@pytest.fixture(autouse=True)
def _private_cache(emca_cache):
    """Each test starts with an empty image-check cache."""


def build(root, loader="torchvision", **overrides):
    fields = dict(name="imagefolder", root=str(root), image_size=32, val_resize=32, batch_size=2, workers=1)
    fields.update(overrides)
    return build_loaders(OmegaConf.structured(DatasetConfig(**fields)), OmegaConf.structured(LoaderConfig(name=loader)))


def error_of(root, **kwargs) -> str:
    with pytest.raises(DatasetError) as caught:
        build(root, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.fixture
def tree(image_tree):
    return image_tree({"train": {"a": 3, "b": 3}, "val": {"a": 2, "b": 2}})


def test_missing_root(tmp_path):
    assert "does not exist" in error_of(tmp_path / "nowhere") and "dataset.root" in error_of(tmp_path / "nowhere")


def test_root_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    assert "is not a folder" in error_of(tmp_path / "file")


@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_split_folder(tree, split):
    shutil.rmtree(tree / split)
    assert f"has no {split}/ folder" in error_of(tree)


def test_split_without_class_folders(tree):
    shutil.rmtree(tree / "train")
    (tree / "train").mkdir()
    (tree / "train" / "loose.JPEG").write_bytes(b"")
    assert "has no class folders" in error_of(tree)


def test_empty_class_folder(tree):
    (tree / "train" / "c").mkdir()
    message = error_of(tree)
    assert str(tree / "train" / "c") in message and "has no images" in message


def test_class_folder_with_only_non_images(tree):
    (tree / "train" / "c").mkdir()
    (tree / "train" / "c" / "notes.txt").write_text("not an image")
    assert "has no images" in error_of(tree)


@pytest.mark.parametrize("loader", LOADERS)
def test_non_image_files_are_ignored(tree, loader):
    (tree / "train" / "a" / "README.txt").write_text("ignored like ImageFolder does")
    (tree / "val" / "b" / "labels.json").write_text("{}")
    bundle = build(tree, loader)
    assert (bundle.num_train, bundle.num_val) == (6, 4)
    bundle.val.set_epoch(0)
    assert sum(len(labels) for _, labels in bundle.val) == 4


def test_num_classes_mismatch(tree):
    message = error_of(tree, num_classes=5)
    assert "num_classes=5" in message and "2 class folders" in message
    assert build(tree, num_classes=2).num_classes == 2


def test_val_class_missing_from_train(tree):
    shutil.copytree(tree / "val" / "b", tree / "val" / "zebra")
    assert "zebra" in error_of(tree)


def test_val_classes_may_be_a_subset_and_map_by_name(image_tree):
    root = image_tree({"train": {"a": 2, "b": 2, "c": 2}, "val": {"c": 2}})
    bundle = build(root)
    bundle.val.set_epoch(0)
    assert torch.cat([labels for _, labels in bundle.val]).tolist() == [2, 2]


def test_raw_tiny_imagenet_layout_names_the_preparation_script(shared_data):
    raw = shared_data / "tinyimagenet-raw-mini" / "tiny-imagenet-200"
    message = error_of(raw, name="tiny_imagenet")
    assert f"python scripts/prepare_tiny_imagenet.py {raw} OUT" in message


def test_raw_tiny_imagenet_layout_without_shared_data(tree):
    (tree / "wnids.txt").write_text("a\nb\n")
    assert "scripts/prepare_tiny_imagenet.py" in error_of(tree)


def write_corrupt(path, kind):
    if kind == "garbage":
        path.write_bytes(b"this is not a JPEG at all" * 10)
    elif kind == "truncated":
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"")


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty"])
def test_corrupt_image_error_names_the_file(tree, kind):
    bad = tree / "train" / "b" / "broken.JPEG"
    write_corrupt(bad, kind)
    message = error_of(tree)
    assert str(bad) in message and "on_bad_image=skip" in message


@pytest.mark.parametrize("loader", LOADERS)
def test_skip_drops_corrupt_images_and_reports_the_count(tree, loader, caplog):
    write_corrupt(tree / "train" / "a" / "broken.JPEG", "truncated")
    write_corrupt(tree / "train" / "b" / "broken.JPEG", "garbage")
    write_corrupt(tree / "val" / "a" / "broken.JPEG", "empty")
    with caplog.at_level(logging.WARNING, logger="emca.data.folder"):
        bundle = build(tree, loader, on_bad_image="skip")
    assert (bundle.num_train, bundle.num_val) == (6, 4)
    assert any("skipped 2 corrupt" in record.message for record in caplog.records)
    assert any("skipped 1 corrupt" in record.message for record in caplog.records)
    for split in (bundle.train, bundle.val):
        split.set_epoch(0)
        assert all(images.shape[1:] == (3, 32, 32) for images, _ in split)


@pytest.mark.parametrize("loader", LOADERS)
def test_a_file_that_passes_the_check_but_fails_to_decode_is_named(tree, loader):
    # Valid header and end marker, scrambled entropy-coded data: only a full decode notices.
    bad = tree / "val" / "a" / "scrambled.JPEG"
    data = (tree / "val" / "a" / "a_0.JPEG").read_bytes()
    bad.write_bytes(data[:200] + bytes(np.random.default_rng(0).integers(0, 255, 2000, dtype=np.uint8)) + b"\xff\xd9")
    assert folder.check_image(str(bad)) is None
    bundle = build(tree, loader)
    bundle.val.set_epoch(0)
    with pytest.raises(DatasetError, match="scrambled.JPEG") as caught:
        list(bundle.val)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("loader", LOADERS)
def test_greyscale_and_cmyk_images_come_out_rgb(tmp_path, loader):
    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for mode in ("L", "CMYK", "RGB"):
            folder_path = tmp_path / split / mode
            folder_path.mkdir(parents=True)
            channels = {"L": (), "CMYK": (4,), "RGB": (3,)}[mode]
            pixels = rng.integers(0, 255, (40, 40, *channels), dtype=np.uint8)
            Image.fromarray(pixels, mode=mode).save(folder_path / "image.jpg", quality=95)
    bundle = build(tmp_path, loader, batch_size=3)
    bundle.val.set_epoch(0)
    images, labels = next(iter(bundle.val))
    assert images.shape == (3, 3, 32, 32)
    std, mean = torch.tensor(DatasetConfig().std).view(3, 1, 1), torch.tensor(DatasetConfig().mean).view(3, 1, 1)
    grey = images[bundle.classes.index("L")] * std + mean
    assert torch.allclose(grey[0], grey[1], atol=1e-3) and torch.allclose(grey[0], grey[2], atol=1e-3)


def test_image_checks_are_cached_until_a_file_changes(tree, monkeypatch):
    build(tree)
    monkeypatch.setattr(folder, "check_image", lambda path: pytest.fail(f"re-checked {path}"))
    build(tree)  # nothing changed: nothing re-checked
    checked = []
    monkeypatch.setattr(folder, "check_image", lambda path: checked.append(path))
    changed = tree / "train" / "a" / "a_0.JPEG"
    os.utime(changed, ns=(0, 0))
    build(tree)
    assert checked == [str(changed)]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (dict(batch_size=3, world_size=2), "multiple of the number of processes"),
        (dict(batch_size=64), "fewer than one global batch"),
        (dict(train_crop="center"), "train_crop"),
        (dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]), "0-255 scale"),
        (dict(on_bad_image="ignore"), "on_bad_image"),
        (dict(val_resize=16), "val_resize=16"),
        (dict(name="cifar"), "unknown dataset.name"),
        (dict(crop_scale=[0.5]), "crop_scale"),
    ],
)
def test_invalid_settings(tree, overrides, expected):
    world_size = overrides.pop("world_size", 1)
    fields = dict(name="imagefolder", root=str(tree), image_size=32, val_resize=32, batch_size=2, workers=1)
    fields.update(overrides)
    with pytest.raises(DatasetError, match=expected):
        build_loaders(OmegaConf.create(fields), LoaderConfig(name="torchvision"), world_size=world_size)


def test_unknown_loader_and_unknown_field(tree):
    with pytest.raises(DatasetError, match="unknown loader.name"):
        build_loaders(OmegaConf.create(dict(root=str(tree))), OmegaConf.create(dict(name="ffcv")))
    with pytest.raises(DatasetError, match="DatasetConfig"):
        build_loaders(OmegaConf.create(dict(root=str(tree), imagesize=32)), LoaderConfig())
