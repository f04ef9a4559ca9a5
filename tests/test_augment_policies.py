"""Training policies (dataset.auto_augment, random_erasing) and val_image_size in both file loaders.

The draws are many augmentations of one 64x64 photograph (a Tiny-ImageNet JPEG from ../shared/data,
or a generated image without it) at image_size 64 with no crop or flip left (pad_random, padding 0,
hflip off), so the plain training image is the same pixels in both loaders and everything a draw
changes is the policy's doing.
"""
import os

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.auto_aug.core import signed_bin
from omegaconf import OmegaConf
from PIL import Image
from torchvision.transforms import v2

from emca.data import DatasetConfig, DatasetError, LoaderConfig, build_loaders
from emca.data.dali_loader import _augmentation_space
from emca.data.policies import AUTOAUGMENT_BINS, AUTOAUGMENT_IMAGENET, RANDAUGMENT_BINS, erase_fill
from emca.data.transforms import Preprocessing

from conftest import SHARED_DATA

# The torchvision loader runs in-process (workers=0) here: one intra-op thread, as in its workers.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOADERS = ["dali", "torchvision"]
POLICIES = ["randaugment", "trivialaugment", "autoaugment"]
SIZE = 64
DRAWS = 256
MEAN, STD = torch.tensor(DatasetConfig().mean), torch.tensor(DatasetConfig().std)
# torchvision's class, its magnitude bins, and whether DALI's space is the wide one, per policy.
TORCHVISION = {
    "randaugment": (v2.RandAugment, RANDAUGMENT_BINS, False),
    "trivialaugment": (v2.TrivialAugmentWide, RANDAUGMENT_BINS, True),
    "autoaugment": (v2.AutoAugment, AUTOAUGMENT_BINS, False),
}


def photo_pixels() -> np.ndarray:
    shared = SHARED_DATA / "tinyimagenet-subset" / "train" / "n01443537" / "n01443537_0.JPEG"
    if shared.is_file():
        return np.asarray(Image.open(shared).convert("RGB"))
    # Smooth gradients, a different one per channel, plus noise: every operation changes it.
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    noise = np.random.default_rng(0).normal(0, 12, (SIZE, SIZE, 3))
    channels = np.stack([200 * x + 30, 180 * y + 40, 120 * (x + y) / 2 + 60 * x * y + 20], axis=-1)
    return np.clip(channels + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def photo_tree(tmp_path_factory):
    """train/: DRAWS links to one photograph (a single epoch gives DRAWS augmentations), val/: one."""
    root = tmp_path_factory.mktemp("photo")
    source = root / "photo.JPEG"
    Image.fromarray(photo_pixels()).save(source, quality=95)
    for split, count in (("train", DRAWS), ("val", 1)):
        (root / split / "a").mkdir(parents=True)
        for i in range(count):
            os.symlink(source, root / split / "a" / f"{i}.JPEG")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMCA_CACHE", str(tmp_path_factory.mktemp("emca-cache")))
        yield root


def config(root, **overrides):
    fields = dict(name="imagefolder", root=str(root), image_size=SIZE, batch_size=128, workers=0,
                  train_crop="pad_random", crop_padding=0, hflip=False)
    return OmegaConf.structured(DatasetConfig(**{**fields, **overrides}))


def epoch_images(loader, root, seed=0, epoch=0, **overrides) -> torch.Tensor:
    bundle = build_loaders(config(root, **overrides), LoaderConfig(name=loader, persistent_workers=False), seed=seed)
    bundle.train.set_epoch(epoch)
    return torch.cat([images for images, _ in bundle.train])


@pytest.fixture(scope="module")
def draws(photo_tree):
    """draws(loader, policy=None, erasing=0.0) -> the DRAWS training images of epoch 0, seed 0 (cached)."""
    cache = {}

    def get(loader, policy=None, erasing=0.0):
        if (loader, policy, erasing) not in cache:
            cache[loader, policy, erasing] = epoch_images(loader, photo_tree, auto_augment=policy,
                                                          random_erasing=erasing)
        return cache[loader, policy, erasing]

    return get


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("overrides, message", [
    (dict(auto_augment="randaug"),
     "dataset.auto_augment='randaug' must be null or one of randaugment, trivialaugment, autoaugment"),
    (dict(randaugment_ops=-1), "dataset.randaugment_ops=-1 must be an integer >= 0"),
    (dict(randaugment_magnitude=31), "dataset.randaugment_magnitude=31 must be an integer from 0 to 30"),
    (dict(random_erasing=1.5), "dataset.random_erasing=1.5 must be a probability from 0 to 1"),
    (dict(val_image_size=0), "dataset.val_image_size=0 must be an integer >= 1 or null"),
    (dict(val_image_size=64, val_resize=56),
     "dataset.val_resize=56 is smaller than dataset.val_image_size=64; the centre crop needs val_resize >= "
     "val_image_size"),
])
def test_bad_values_are_one_line_errors_naming_the_option(overrides, message):
    cfg = config("/nonexistent", **overrides)
    with pytest.raises(DatasetError) as error:
        build_loaders(cfg, LoaderConfig(name="synthetic"))  # the recipe is checked before any loader
    assert str(error.value) == message


def test_settings_stored_before_these_options_read_as_off():
    # gradcam.load_images reads a run's stored dataset settings without the schema.
    new = ("val_image_size", "auto_augment", "randaugment_ops", "randaugment_magnitude", "random_erasing")
    stored = {k: v for k, v in OmegaConf.to_container(OmegaConf.structured(DatasetConfig())).items() if k not in new}
    prep = Preprocessing.from_config(OmegaConf.create(stored))
    assert (prep.val_image_size, prep.val_resize, prep.auto_augment, prep.random_erasing) == (224, 256, None, 0.0)


# ----------------------------------------------------------------------------- same policies
def test_the_policy_tables_are_torchvisions():
    # The AutoAugment table DALI runs is torchvision's, less its one probability-0 stage.
    table = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)._policies
    assert AUTOAUGMENT_IMAGENET == tuple(tuple(stage for stage in stages if stage[1] > 0) for stages in table)
    for policy, (transform, bins, wide) in TORCHVISION.items():
        names = set(_augmentation_space(SIZE, bins, wide))
        if policy == "autoaugment":
            assert {op for stages in AUTOAUGMENT_IMAGENET for op, _, _ in stages} <= names
        else:  # the DALI suite is the space less Invert (dali_loader._policy)
            assert set(transform._AUGMENTATION_SPACE) == names - {"Invert"}


def dali_operation_outputs(image: np.ndarray, policy: str, cases: list) -> list[np.ndarray]:
    """Each (name, bin, sign) case's DALI augmentation of `image`, from one pipeline."""
    _, bins, wide = TORCHVISION[policy]
    space = _augmentation_space(SIZE, bins, wide)

    @pipeline_def
    def pipeline():
        x = fn.reshape(fn.copy(types.Constant(image)), layout="HWC")
        outputs = []
        for name, magnitude_bin, sign in cases:
            augmentation = space[name]
            if augmentation.randomly_negate:
                magnitude_bin = signed_bin(magnitude_bin, fn.random.uniform(values=[sign], dtype=types.INT32))
            outputs.append(augmentation(x, magnitude_bin=magnitude_bin, num_magnitude_bins=bins, fill_value=0,
                                        interp_type=types.INTERP_NN))
        return tuple(outputs)

    pipe = pipeline(batch_size=1, num_threads=1, device_id=None)
    pipe.build()
    return [np.asarray(output[0]) for output in pipe.run()]


def torchvision_operation_output(image: np.ndarray, policy: str, name: str, magnitude_bin: int, sign: int):
    transform, bins, _ = TORCHVISION[policy]
    transform = transform()
    magnitudes, _ = transform._AUGMENTATION_SPACE[name]
    magnitudes = magnitudes(bins, SIZE, SIZE)
    magnitude = 0.0 if magnitudes is None else float(magnitudes[magnitude_bin]) * (-1) ** sign
    tensor = torch.from_numpy(image.copy()).permute(2, 0, 1)
    output = transform._apply_image_or_video_transform(tensor, name, magnitude, transform.interpolation,
                                                       transform._fill)
    return output.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("policy", POLICIES)
def test_every_operation_gives_torchvisions_image(policy):
    """Each operation of the policy at four magnitude bins and both signs, in DALI and torchvision, on
    the photo. Measured over every bin: translations, posterize, solarize and invert agree exactly;
    shears and rotations too but for nearest-neighbour ties at a few magnitudes (at most 9 % of the
    pixels, RandAugment's bins 8-9); brightness, colour, contrast and auto-contrast within 3 grey
    levels, 1.2 on average (DALI rounds where torchvision truncates); sharpness within 1 but for the
    1-pixel border, which PIL-style sharpening leaves as it is; equalize is OpenCV's formula in DALI,
    PIL's in torchvision: 3 levels apart on average on the photo, 16 at most."""
    transform, bins, _ = TORCHVISION[policy]
    image = photo_pixels()
    cases = [(name, magnitude_bin, sign) for name, (_, signed) in transform._AUGMENTATION_SPACE.items()
             for magnitude_bin in (0, bins // 3, bins // 2, bins - 1) for sign in ((0, 1) if signed else (0,))]
    for (name, magnitude_bin, sign), dali in zip(cases, dali_operation_outputs(image, policy, cases), strict=True):
        ours = torchvision_operation_output(image, policy, name, magnitude_bin, sign)
        difference = np.abs(dali.astype(int) - ours.astype(int))
        case = f"{name} bin {magnitude_bin} sign {sign}: mean {difference.mean():.2f}, max {difference.max()}"
        if name == "Equalize":
            assert difference.mean() < 4, case
        elif name == "Sharpness":
            assert difference[1:-1, 1:-1].max() <= 1, case
        elif name in ("Brightness", "Color", "Contrast", "AutoContrast"):
            assert difference.max() <= 3 and difference.mean() < 1.5, case
        elif name in ("ShearX", "ShearY", "Rotate"):
            assert (difference > 0).any(axis=-1).mean() < 0.1, case
        else:
            assert difference.max() == 0, case


# ----------------------------------------------------------------------------- loader output
def per_draw_statistics(images: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
    """(draws, 7): per-channel mean and std, and the mean absolute change from the plain image."""
    change = (images - plain).abs().mean(dim=(1, 2, 3))
    return torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3)), change[:, None]], dim=1)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("policy", POLICIES)
def test_policy_batches_are_normalised_images_the_policy_changed(draws, loader, policy):
    images, plain = draws(loader, policy), draws(loader)[:1]
    assert images.shape == (DRAWS, 3, SIZE, SIZE) and images.dtype == torch.float32
    low, high = ((torch.tensor([0.0, 255.0]).view(2, 1) - MEAN) / STD).view(2, 1, 3, 1, 1)
    assert (images >= low - 1e-5).all() and (images <= high + 1e-5).all()  # uint8 pixels, normalised
    changed = (images != plain).flatten(1).any(dim=1).float().mean()
    # Identity, magnitude-0 operations and skipped AutoAugment stages leave some draws as they were.
    assert changed > 0.6, changed
    assert (images - plain).abs().mean() > 0.2


@pytest.mark.parametrize("policy, erasing", [(p, 0.0) for p in POLICIES] + [(None, 0.5)])
def test_the_loaders_agree_in_distribution(draws, policy, erasing):
    """Mean per-draw statistics over DRAWS draws, DALI against torchvision.

    Tolerance: 4 standard errors of the difference of the two means (from the draws' own spread),
    plus 0.05 normalised units (3 grey levels) for equalize, the one operation whose formula differs:
    measured over 4096 draws, AutoAugment's blue-channel mean and spread are 0.041 and 0.026 apart
    (equalize is in 14 of its 25 sub-policies) and RandAugment's blue mean 0.023; every other
    statistic agrees within 2.2 standard errors. A loader that skips the policy moves the mean change
    from the plain image by 0.5+, far outside (tried by hand for each loader); one that skips erasing,
    by only 0.05-0.06, but changes no draw at all, which the last check catches.
    """
    dali, ours = (per_draw_statistics(draws(name, policy, erasing), draws(name)[:1]) for name in LOADERS)
    standard_error = (dali.var(dim=0) / DRAWS + ours.var(dim=0) / DRAWS).sqrt()
    difference = (dali.mean(dim=0) - ours.mean(dim=0)).abs()
    assert (difference < 4 * standard_error + 0.05).all(), (difference, standard_error)
    assert all((changes[:, -1] > 0).float().mean() > 0.3 for changes in (dali, ours))  # both did something


@pytest.mark.parametrize("loader", LOADERS)
def test_random_erasing_erases_one_mean_pixel_rectangle_with_probability_p(draws, loader):
    images, plain = draws(loader, erasing=0.5), draws(loader)[:1]
    changed = (images != plain).any(dim=1)  # (draws, H, W)
    erased = changed.flatten(1).any(dim=1)
    # 4 binomial standard deviations of the share at p=0.5 over DRAWS draws.
    assert abs(erased.float().mean() - 0.5) < 4 * (0.25 / DRAWS) ** 0.5
    fill = (torch.tensor(erase_fill(MEAN.tolist()), dtype=torch.float32) - MEAN) / STD
    assert fill.abs().max() < 0.01  # the normalised fill is ~0
    for image, mask in zip(images[erased], changed[erased], strict=True):
        rows, columns = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
        top, bottom, left, right = rows.min(), rows.max() + 1, columns.min(), columns.max() + 1
        area = (bottom - top) * (right - left) / SIZE**2
        # One rectangle of 2-33 % of the image (rounding of its sides: a little either way), all fill.
        assert 0.015 < area < 0.36, area
        box = image[:, top:bottom, left:right]
        assert torch.allclose(box, fill.view(3, 1, 1).expand_as(box), atol=1e-5)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("policy, erasing", [("randaugment", 0.0), ("trivialaugment", 0.0), ("autoaugment", 0.5)])
def test_draws_depend_only_on_seed_and_epoch(photo_tree, draws, loader, policy, erasing):
    cached = draws(loader, policy, erasing)
    # A fresh loader, and for torchvision two worker processes, see exactly the same draws.
    workers = 2 if loader == "torchvision" else 0
    again = epoch_images(loader, photo_tree, workers=workers, auto_augment=policy, random_erasing=erasing)
    assert torch.equal(again, cached)
    other_seed = epoch_images(loader, photo_tree, seed=1, auto_augment=policy, random_erasing=erasing)
    assert not torch.equal(other_seed, cached)


def test_torchvision_policy_leaves_the_callers_generator_alone(photo_tree):
    bundle = build_loaders(config(photo_tree, auto_augment="randaugment", random_erasing=0.5),
                           LoaderConfig(name="torchvision"))
    dataset = bundle.train.loader.dataset
    state = torch.get_rng_state()
    first = dataset[(3, 11)][0]
    assert torch.equal(torch.get_rng_state(), state)  # workers=0 runs it in the trainer's process
    assert torch.equal(dataset[(3, 11)][0], first) and not torch.equal(dataset[(4, 11)][0], first)


# ----------------------------------------------------------------------------- validation crop
def test_val_image_size_sets_the_validation_crop_in_both_loaders(tmp_path, emca_cache):
    source = SHARED_DATA / "tinyimagenet-subset" / "val"
    photos = sorted(source.rglob("*.JPEG"))[:8] if source.is_dir() else []
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        for i, photo in enumerate(photos):
            os.symlink(photo, tmp_path / split / "a" / f"{i}.JPEG")
        for i in range(8 - len(photos)):
            pixels = np.roll(photo_pixels(), 7 * i, axis=(0, 1))
            Image.fromarray(pixels).save(tmp_path / split / "a" / f"generated{i}.JPEG", quality=95)
    cfg = config(tmp_path, image_size=32, val_image_size=48, batch_size=4, train_crop="random_resized")
    images = {}
    for loader in LOADERS:
        bundle = build_loaders(cfg, LoaderConfig(name=loader, persistent_workers=False))
        bundle.train.set_epoch(0)
        assert next(iter(bundle.train))[0].shape == (4, 3, 32, 32)  # training stays at image_size
        bundle.val.set_epoch(0)
        images[loader] = torch.cat([batch for batch, _ in bundle.val])
        assert images[loader].shape == (8, 3, 48, 48)
    # val_resize follows val_image_size: round(48 / 0.875) = 55, the shorter side before the crop.
    assert bundle.val.loader.dataset.prep.val_resize == 55
    per_image = (images["dali"] - images["torchvision"]).abs().mean(dim=(1, 2, 3))
    # As tests/test_data.py's validation comparison: the same geometry, DALI's vs PIL's resampling.
    assert per_image.max() < 0.06 and per_image.mean() < 0.015, per_image


# ----------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("policy", POLICIES)
def test_dali_policies_on_the_gpu_match_the_cpu_in_distribution(photo_tree, draws, policy):
    cfg = config(photo_tree, auto_augment=policy, random_erasing=0.25)
    bundle = build_loaders(cfg, LoaderConfig(name="dali"), device=torch.device("cuda", 0), channels_last=True)
    bundle.train.set_epoch(0)
    images = torch.cat([batch for batch, _ in bundle.train])
    assert images.is_cuda and images.shape == (DRAWS, 3, SIZE, SIZE)
    assert images.is_contiguous(memory_format=torch.channels_last)
    gpu = per_draw_statistics(images.cpu(), draws("dali")[:1])
    cpu = per_draw_statistics(epoch_images("dali", photo_tree, auto_augment=policy, random_erasing=0.25),
                              draws("dali")[:1])
    standard_error = (gpu.var(dim=0) / DRAWS + cpu.var(dim=0) / DRAWS).sqrt()
    # nvJPEG decodes a few levels off libjpeg-turbo: a little more than the CPU loaders' allowance.
    assert ((gpu.mean(dim=0) - cpu.mean(dim=0)).abs() < 4 * standard_error + 0.08).all()
