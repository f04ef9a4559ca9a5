"""Training augmentation policies (dataset.auto_augment, dataset.random_erasing) and their torchvision form.

One name means one policy in both loaders: torchvision's transforms.v2 RandAugment, TrivialAugmentWide
and AutoAugment(IMAGENET) with their defaults (nearest interpolation, black fill) define it, and the
DALI loader rebuilds the same operations, magnitude ranges and (for autoaugment) sub-policy table from
nvidia.dali.auto_aug's operators (dali_loader.py). Both apply the policy after the crop and flip, to
the uint8 image, then random erasing, then normalisation.
"""
from __future__ import annotations

import random

import torch
from torchvision.transforms import v2

POLICIES = ("randaugment", "trivialaugment", "autoaugment")
# torchvision's RandomErasing defaults (Zhong et al.): area fraction, aspect ratio, tries per image.
ERASE_SCALE = (0.02, 0.33)
ERASE_RATIO = (0.3, 3.3)
ERASE_ATTEMPTS = 10
# Bins of each policy's magnitude ranges (RandAugment's and TrivialAugment's are torchvision's
# defaults; AutoAugment's table indexes 10 bins).
RANDAUGMENT_BINS = 31
AUTOAUGMENT_BINS = 10

# torchvision's AutoAugmentPolicy.IMAGENET sub-policies, (op, probability, magnitude bin) pairs, as
# the DALI loader needs them as data (tests check them against torchvision's own table). DALI's
# auto_augment_image_net is a different policy (TensorFlow's policy_v0), hence this copy. One stage
# is left out: ('Equalize', 0.0, None) before ('Equalize', 0.8, None) never runs, and DALI warns
# about a probability-0 stage.
AUTOAUGMENT_IMAGENET = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.8, None),),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
    (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)


def erase_fill(mean) -> tuple[int, ...]:
    """The mean pixel on the 0-255 scale, rounded: erased pixels normalise to within 0.5/std of 0,
    the 0 that torchvision's reference recipe erases its normalised tensor with."""
    return tuple(round(m) for m in mean)


class TorchvisionAugment:
    """The policy, then random erasing, of one uint8 CHW training image (from_preprocessing: None
    when both are off)."""

    def __init__(self, transforms: list):
        self.transform = v2.Compose(transforms)

    @classmethod
    def from_preprocessing(cls, prep) -> "TorchvisionAugment | None":
        transforms = []
        if prep.auto_augment == "randaugment":
            transforms.append(v2.RandAugment(prep.randaugment_ops, prep.randaugment_magnitude, RANDAUGMENT_BINS))
        elif prep.auto_augment == "trivialaugment":
            transforms.append(v2.TrivialAugmentWide(RANDAUGMENT_BINS))
        elif prep.auto_augment == "autoaugment":
            transforms.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))
        if prep.random_erasing > 0:
            transforms.append(v2.RandomErasing(prep.random_erasing, ERASE_SCALE, ERASE_RATIO, erase_fill(prep.mean)))
        return cls(transforms) if transforms else None

    def __call__(self, image: torch.Tensor, rng: random.Random) -> torch.Tensor:
        # transforms.v2 draws from torch's global generator: a private one seeded from the sample's
        # rng makes the result a function of (seed, epoch, index) alone, whichever worker runs it,
        # and leaves the caller's generator (the trainer's, when workers=0) as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.getrandbits(63))
            return self.transform(image)
