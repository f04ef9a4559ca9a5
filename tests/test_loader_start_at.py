"""A resumed epoch starts at its step without loading the batches before it (start_at): the same
batches as the uninterrupted epoch from there on, the skipped batches' files never opened (DALI and
torchvision: they are deleted first; detection: the loads are recorded), and a run stopped mid-epoch
and resumed with loader=dali ends bit-identical."""
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from emca.data import DatasetConfig, LoaderConfig, build_loaders
from emca.data.folder import list_split
from emca.data.sampling import train_shard
from emca.engine.trainer import Preempted, train

from conftest import preempt_after_step

# 24 photographs of different sizes (68x56 to 2400x1632): a random-resized crop draws a different number
# of times for each, so equal batches after a skip show the generators do not depend on the images.
IMAGES, BATCH, START = 24, 4, 3
DALI_OPTIONS = {
    "random-resized": {},
    "pad-random": dict(train_crop="pad_random", crop_padding=4),
    "policy-and-erasing": dict(auto_augment="randaugment", random_erasing=0.5),
}


@pytest.fixture(autouse=True)
def _private_cache(emca_cache):
    """Image-check caches stay out of the home folder."""


@pytest.fixture
def photographs(shared_data, tmp_path):
    """An ImageFolder tree of IMAGES class folders (train/ and val/ alike), symlinks to the shared
    ImageNet samples."""
    for name in sorted(os.listdir(shared_data / "imagenet-samples"))[:IMAGES]:
        source = shared_data / "imagenet-samples" / name
        for split in ("train", "val"):
            (tmp_path / split / name).mkdir(parents=True)
            for file in os.listdir(source):
                os.symlink(source / file, tmp_path / split / name / file)
    return tmp_path


def epoch(root, loader: str, start: int = 0, **dataset):
    """(the training batches of epoch 1 from batch `start` on, what start_at returned)."""
    fields = dict(name="imagefolder", root=str(root), image_size=24, batch_size=BATCH, workers=1, **dataset)
    train_loader = build_loaders(OmegaConf.structured(DatasetConfig(**fields)),
                                 OmegaConf.structured(LoaderConfig(name=loader, persistent_workers=False)),
                                 seed=3, train=True).train
    train_loader.set_epoch(1)
    skipped = train_loader.start_at(start)
    # len() stays the whole epoch's, as the trainer counts its steps.
    assert len(train_loader) == IMAGES // BATCH
    # What start_at skips is never opened: those files are gone.
    paths = list_split(root / "train").paths
    for index in train_shard(IMAGES, BATCH, seed=3, epoch=1, rank=0, world_size=1)[:start * BATCH]:
        os.remove(paths[index])
    return [(images.clone(), labels.clone()) for images, labels in train_loader], skipped


def assert_same_batches(resumed, full):
    assert len(resumed) == len(full)
    for (images, labels), (expected_images, expected_labels) in zip(resumed, full, strict=True):
        assert torch.equal(labels, expected_labels) and torch.equal(images, expected_images)


@pytest.mark.parametrize("options", DALI_OPTIONS.values(), ids=DALI_OPTIONS.keys())
def test_dali_starts_an_epoch_at_a_step_without_reading_the_files_before_it(photographs, options):
    full, _ = epoch(photographs, "dali", **options)
    resumed, skipped = epoch(photographs, "dali", START, **options)
    assert skipped == START
    assert_same_batches(resumed, full[START:])


def test_torchvision_starts_an_epoch_at_a_step_without_reading_the_files_before_it(photographs):
    full, _ = epoch(photographs, "torchvision", auto_augment="trivialaugment")
    resumed, skipped = epoch(photographs, "torchvision", START, auto_augment="trivialaugment")
    assert skipped == START
    assert_same_batches(resumed, full[START:])


@pytest.mark.parametrize("recipe", [False, True], ids=["plain", "recipe"])
def test_dali_stopped_mid_epoch_and_resumed_is_bit_identical(recipe, compose_train, tmp_path, monkeypatch):
    from test_train import DETERMINISTIC, RECIPE, assert_same_run, checkpoint

    from emca.data.dali_loader import DaliLoader

    run = (*DETERMINISTIC, "loader=dali", *(RECIPE if recipe else ()))
    train(compose_train(*run), str(tmp_path / "full"))
    preempt_after_step(monkeypatch, 4)  # epoch 2, after its first of 3 steps
    with pytest.raises(Preempted):
        train(compose_train(*run), str(tmp_path / "resumed"))
    monkeypatch.undo()
    progress = checkpoint(tmp_path / "resumed")["progress"]
    assert (progress["epoch"], progress["step_in_epoch"]) == (1, 1)
    skipped, start_at = [], DaliLoader.start_at
    monkeypatch.setattr(DaliLoader, "start_at", lambda self, step: skipped.append(start_at(self, step)) or skipped[-1])
    train(compose_train(*run, "trainer.resume=auto"), str(tmp_path / "resumed"))
    assert skipped == [1]  # the interrupted epoch's step trained before the stop: never loaded
    assert_same_run(checkpoint(tmp_path / "resumed"), checkpoint(tmp_path / "full"))


class Recorded(torch.utils.data.Dataset):
    """Samples that are their (index, epoch seed) key, each load recorded."""

    def __init__(self, size: int):
        self.size, self.loaded = size, []

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: tuple[int, int]):
        self.loaded.append(key[0])
        return torch.tensor(key[0]), {"epoch_seed": key[1]}


def test_detection_starts_an_epoch_at_a_step_without_loading_the_images_before_it():
    from emca.data.coco import DetectionLoader

    def batches(start: int):
        samples = Recorded(40)
        loader = DetectionLoader(samples, lambda epoch: np.random.default_rng(epoch).permutation(40), train=True,
                                 seed=0, batch_size=4, workers=0, pin_memory=False, persistent_workers=False,
                                 prefetch_factor=2)
        loader.set_epoch(1)
        assert loader.start_at(start) == start and len(loader) == 10
        return list(loader), samples.loaded

    full, _ = batches(0)
    resumed, loaded = batches(START)
    assert resumed == full[START:]
    assert loaded == np.random.default_rng(1).permutation(40)[START * 4:].tolist()
