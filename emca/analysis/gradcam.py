"""Grad-CAM heat maps (Figures 7-8) with the maintained pytorch-grad-cam library.

The target layer is the residual block that holds the model's last attention module (its output,
after the gated residual add), or the last block of the last stage for a plain ResNet. Each map
explains the image's true class, so maps of different models are comparable even where their
predictions differ; the prediction is printed in the panel title.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from emca.analysis.figures import plt, save_figure
import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from emca.models import attention_modules


def target_block(model: nn.Module) -> tuple[str, nn.Module]:
    """(qualified name, module) of the block Grad-CAM looks at."""
    modules = list(attention_modules(model))
    name = modules[-1].rsplit(".", 1)[0] if modules else f"layer4.{len(model.layer4) - 1}"
    return name, model.get_submodule(name)


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised (B, 3, H, W) images back to (B, H, W, 3) RGB floats in [0, 1]; mean and std are
    on the 0-255 scale, as the dataset configs give them."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    rgb = ((images.float() * std_t + mean_t) / 255.0).clamp(0.0, 1.0)
    return rgb.permute(0, 2, 3, 1).cpu().numpy()


def save_gradcam(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    out_dir: Path,
    first_index: int = 0,
) -> list[Path]:
    """One PNG per image (the image beside its heat-map overlay); returns the paths."""
    layer_name, layer = target_block(model)
    model.eval()
    with GradCAM(model=model, target_layers=[layer]) as cam:
        maps = cam(input_tensor=images, targets=[ClassifierOutputTarget(int(label)) for label in labels])
    with torch.no_grad():
        predictions = model(images).argmax(dim=1).tolist()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for offset, (rgb, heat, label, predicted) in enumerate(zip(denormalize(images, mean, std), maps, labels.tolist(), predictions)):
        figure, (left, right) = plt.subplots(1, 2, figsize=(6, 3.2))
        left.imshow(rgb)
        left.set_title(f"label {class_names[label]}", fontsize="small")
        right.imshow(show_cam_on_image(rgb.astype(np.float32), heat, use_rgb=True))
        right.set_title(f"Grad-CAM at {layer_name}, predicted {class_names[predicted]}", fontsize="small")
        for axis in (left, right):
            axis.axis("off")
        paths.append(save_figure(figure, out_dir / f"{first_index + offset:04d}_{_file_safe(class_names[label])}.png"))
    return paths


def _file_safe(name: str) -> str:
    return "".join(char if char.isalnum() or char in "-." else "_" for char in name)[:60]
