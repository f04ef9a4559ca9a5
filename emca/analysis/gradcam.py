"""Grad-CAM heat maps (Figures 7-8) with the maintained pytorch-grad-cam library.

Target layer. `auto` is the deepest residual block whose output at the evaluated image size is at
least MIN_EXTENT x MIN_EXTENT: the last block at 224 px (7x7), layer3's last at 32 px, layer2's at
16 px. A 1x1 output holds one number per channel, so its map is one value spread over the image:
flat. The rule is the same for every model, so runs shown side by side are looked at in the same
place (the block of a model's last attention module would move with its integration).

Images. Validation images are numbered by their position in val/'s sorted listing (class folder,
then file name; the loaders' order when no image is skipped). `pick_images` takes explicit
positions, the first image of each named class, or N images from N different classes, spread
evenly over the class list (neighbouring classes are often alike: ImageNet's first ones are all
fish and birds).

Each map explains the image's true class, so maps of different models are comparable even where
their predictions differ; the prediction is printed in the panel title.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from emca.analysis.figures import plt, save_figure
from emca.data.datasets import dataset_root
from emca.data.errors import DatasetError
from emca.data.folder import ImageList, check_root, list_split
from emca.data.torch_loader import ImageListDataset
from emca.data.transforms import BatchNormalizer, Preprocessing

AUTO = "auto"
MIN_EXTENT = 2  # the smallest output height and width `auto` accepts
STAGES = ("layer1", "layer2", "layer3", "layer4")
PANEL_INCHES = 2.2  # each panel of the grid is this square


class GradcamError(ValueError):
    """A Grad-CAM choice that cannot be honoured. The option is kept apart from the message so
    each caller names it as its users spell it (eval.py's gradcam.layer=..., the grid script's --layer ...)."""

    def __init__(self, option: str, value: Any, problem: str):
        super().__init__(f"{option}={value} {problem}")
        self.option, self.value, self.problem = option, value, problem

    def spelled(self, prefix: str, separator: str) -> str:
        return f"{prefix}{self.option}{separator}{self.value} {self.problem}"


# ----------------------------------------------------------------------------- target layer
def residual_blocks(model: nn.Module) -> list[str]:
    """Qualified names of the model's residual blocks, shallowest first."""
    return [f"{stage}.{index}" for stage in STAGES for index in range(len(model.get_submodule(stage)))]


@torch.no_grad()
def output_shapes(model: nn.Module, names: Sequence[str], image_size: int) -> dict[str, tuple[int, ...]]:
    """The output shape of each named module for one image of image_size px."""
    shapes: dict[str, tuple[int, ...]] = {}
    # A module that returns no tensor gets the empty shape.
    def record(name: str):
        return lambda _module, _inputs, out: shapes.__setitem__(name, tuple(getattr(out, "shape", ())))

    hooks = [model.get_submodule(name).register_forward_hook(record(name)) for name in names]
    try:
        model.eval()(torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def choose_layer(model: nn.Module, image_size: int, layer: str = AUTO) -> tuple[str, tuple[int, int]]:
    """(name, output height and width) of the module Grad-CAM looks at: `layer`, or by the rule above."""
    blocks = residual_blocks(model)
    if layer != AUTO:
        fix = f"give a residual block such as {blocks[-1]}, or auto"
        try:
            model.get_submodule(layer)
        except AttributeError:
            raise GradcamError("layer", layer, f"is not a module of this model; {fix}") from None
        shape = output_shapes(model, [layer], image_size)[layer]
        if len(shape) != 4:
            raise GradcamError("layer", layer, f"outputs no feature map (shape {list(shape)}); {fix}")
        return layer, shape[2:]
    shapes = output_shapes(model, blocks, image_size)
    spatial = [name for name in blocks if min(shapes[name][2:]) >= MIN_EXTENT]
    if not spatial:
        first = "x".join(map(str, shapes[blocks[0]][2:]))
        raise GradcamError("layer", AUTO, f"finds no block with a {MIN_EXTENT}x{MIN_EXTENT} output at {image_size} px "
                                          f"({blocks[0]}: {first}); raise dataset.image_size or name a module")
    return spatial[-1], shapes[spatial[-1]][2:]


# ----------------------------------------------------------------------------- images
def pick_images(images: ImageList, count: int = 0, classes: Optional[Sequence[Any]] = None,
                indices: Optional[Sequence[int]] = None) -> list[int]:
    """Positions in `images`: `indices` as given, else the first image of each of `classes`
    (names; numbers are read as names, as digits' folders are), else `count` spread over classes."""
    if indices:
        outside = [index for index in indices if not 0 <= index < len(images)]
        if outside:
            raise GradcamError(
                "indices",
                list(indices),
                f"reaches outside the {len(images)} validation images; give positions 0-{len(images) - 1}",
            )
        return list(indices)
    by_class = _positions_by_class(images.labels)
    if classes:
        named = {name: label for label, name in enumerate(images.classes)}
        missing = [str(name) for name in classes if by_class.get(named.get(str(name), -1)) is None]
        if missing:
            known = ", ".join(images.classes[label] for label in sorted(by_class)[:5])
            raise GradcamError(
                "classes",
                [str(name) for name in classes],
                f"names {', '.join(missing)}, with no validation image; give class folder names, e.g. {known}",
            )
        return [by_class[named[str(name)]][0] for name in classes]
    return _spread_over_classes(by_class, count)


def _positions_by_class(labels: np.ndarray) -> dict[int, list[int]]:
    by_class: dict[int, list[int]] = {}
    for position, label in enumerate(labels.tolist()):
        by_class.setdefault(label, []).append(position)
    return by_class


def _spread_over_classes(by_class: dict[int, list[int]], count: int) -> list[int]:
    """`count` positions, one per class while classes last: evenly spaced classes, first image of
    each; beyond one per class, every class's second image, then third, and so on."""
    present = sorted(by_class)
    order = present if count >= len(present) else [present[i * len(present) // count] for i in range(count)]
    picked: list[int] = []
    for round_ in range(max(len(positions) for positions in by_class.values())):
        picked += [by_class[label][round_] for label in order if round_ < len(by_class[label])]
        if len(picked) >= count:
            break
    return picked[:count]


def validation_images(dataset_cfg: dict[str, Any], classes: Optional[Sequence[str]]) -> ImageList:
    """val/'s images, labelled by the run's class names (as the loaders label them)."""
    if dataset_cfg.get("format") == "shards":  # the figures number and name image files
        raise DatasetError(
            "Grad-CAM reads val/'s image files, which dataset.format=shards does not have: add dataset.format=folder "
            "dataset.root=<the ImageFolder tree the shards were packed from>"
        )
    root = dataset_root(dataset_cfg["name"], dataset_cfg["root"])
    check_root(root, dataset_cfg["name"], splits=("val",))
    return list_split(root / "val", classes)


@dataclass(frozen=True)
class Chosen:
    """The validation images a figure shows, in both forms."""

    positions: list[int]
    paths: list[str]
    labels: torch.Tensor
    class_names: list[str]  # what the labels index
    pixels: torch.Tensor  # uint8 (N, 3, S, S): what the panels show
    inputs: torch.Tensor  # normalised, on the device: what the models see


def choose_images(
    dataset_cfg: dict[str, Any],
    classes: Optional[Sequence[str]],
    device: torch.device,
    *,
    channels_last: bool = False,
    count: int = 0,
    wanted_classes: Optional[Sequence[Any]] = None,
    indices: Optional[Sequence[int]] = None,
) -> Chosen:
    """The images pick_images chooses among the dataset's validation images, loaded and normalised."""
    images = validation_images(dataset_cfg, classes)
    return load_images(images, pick_images(images, count, wanted_classes, indices), dataset_cfg, device, channels_last)


def load_images(images: ImageList, positions: Sequence[int], dataset_cfg: dict[str, Any], device: torch.device,
                channels_last: bool = False) -> Chosen:
    """images[positions], prepared as the validation pass prepares them."""
    prep = Preprocessing.from_config(OmegaConf.create(dataset_cfg))
    dataset = ImageListDataset(images, prep, train=False)  # the torchvision loader's decoding, resize and crop
    pairs = [dataset[(position, 0)] for position in positions]
    pixels = torch.stack([image for image, _ in pairs])
    return Chosen(
        list(positions),
        [images.paths[p] for p in positions],
        torch.tensor([label for _, label in pairs]),
        list(images.classes),
        pixels,
        BatchNormalizer(prep, device, channels_last)(pixels),
    )


# ----------------------------------------------------------------------------- maps and figures
@dataclass(frozen=True)
class HeatMaps:
    layer: str
    extent: tuple[int, int]  # the layer's output height and width
    maps: np.ndarray  # (N, S, S), each scaled to [0, 1] by pytorch-grad-cam
    predictions: list[int]


def heat_maps(model: nn.Module, chosen: Chosen, layer: str = AUTO) -> HeatMaps:
    """One model's Grad-CAM map of each chosen image, for its true class."""
    name, extent = choose_layer(model, chosen.inputs.shape[-1], layer)
    model.eval()
    with GradCAM(model=model, target_layers=[model.get_submodule(name)]) as cam:
        maps = cam(input_tensor=chosen.inputs, targets=[ClassifierOutputTarget(int(label)) for label in chosen.labels])
    with torch.no_grad():
        predictions = model(chosen.inputs).argmax(dim=1).tolist()
    return HeatMaps(name, tuple(extent), maps, predictions)


def _rgb(pixels: torch.Tensor) -> np.ndarray:
    return pixels.permute(1, 2, 0).numpy().astype(np.float32) / 255.0


def _overlay(pixels: torch.Tensor, heat: np.ndarray) -> np.ndarray:
    return show_cam_on_image(_rgb(pixels), heat, use_rgb=True)


def _label(chosen: Chosen, row: int) -> str:
    return chosen.class_names[int(chosen.labels[row])]


def _row_title(chosen: Chosen, row: int) -> str:
    return f"#{chosen.positions[row]} label {_label(chosen, row)}"


def save_gradcam(chosen: Chosen, maps: HeatMaps, out_dir: Path) -> list[Path]:
    """One PNG per image (the image beside its heat-map overlay), named by its position and class."""
    paths = []
    for row, predicted in enumerate(maps.predictions):
        figure, (left, right) = plt.subplots(1, 2, figsize=(6, 3.2))
        left.imshow(_rgb(chosen.pixels[row]))
        left.set_title(_row_title(chosen, row), fontsize="small")
        right.imshow(_overlay(chosen.pixels[row], maps.maps[row]))
        right.set_title(f"Grad-CAM at {maps.layer}, predicted {chosen.class_names[predicted]}", fontsize="small")
        for axis in (left, right):
            axis.axis("off")
        name = f"{chosen.positions[row]:04d}_{_file_safe(_label(chosen, row))}.png"
        paths.append(save_figure(figure, out_dir / name))
    return paths


def save_grid(chosen: Chosen, columns: Sequence[tuple[str, HeatMaps]], path: Path) -> tuple[int, int]:
    """Figures 7-8: a row per image, the input then each run's map; returns (rows, columns)."""
    shape = (len(chosen.positions), 1 + len(columns))
    figure, axes = plt.subplots(*shape, figsize=(PANEL_INCHES * shape[1], PANEL_INCHES * shape[0]), squeeze=False)
    for row, panels in enumerate(axes):
        panels[0].imshow(_rgb(chosen.pixels[row]))
        panels[0].set_title(_row_title(chosen, row), fontsize="small")
        for panel, (title, maps) in zip(panels[1:], columns, strict=True):
            panel.imshow(_overlay(chosen.pixels[row], maps.maps[row]))
            # The column's name on the first row only; every panel names its prediction.
            heading = f"{title}\n{maps.layer} ({maps.extent[0]}x{maps.extent[1]})\n" if row == 0 else ""
            panel.set_title(f"{heading}predicted {chosen.class_names[maps.predictions[row]]}", fontsize="small")
        for panel in panels:
            panel.axis("off")
    save_figure(figure, path)
    return shape


def _file_safe(name: str) -> str:
    return "".join(char if char.isalnum() or char in "-." else "_" for char in name)[:60]
