"""Parameters and GFLOPs of table variants, without training: build each model and count.

GFLOPs are counted as the paper's numbers are (docs/paper.md#units): multiply-accumulates of the conv and
linear layers (torchvision's count, what results.json records), plus 2 per BatchNorm output (scale
and shift, as thop counts them) and 1 per element an average pools, in 2^30 units. That reproduces
the paper's plain R-18/34/50 GFLOPs to the printed digit and its attention rows within 0.2 %.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from emca.analysis.paper_reference import GFLOP_UNIT
from emca.analysis.variants import Variant, paper_options, plain
from emca.models import COVERAGE_PRESETS, build_model
from emca.models.summary import count_parameters

_MEAN = torch.ops.aten.mean  # the flop counter keys formulas by overload packet


def build_variant(variant: Variant, num_classes: int = 1000) -> torch.nn.Module:
    """The model of a variant with the paper's options (plus the variant's own)."""
    attention = {"name": variant.attention, "integration": variant.integration,  # None: the plain ResNet's
                 **paper_options(variant.attention), **dict(variant.options)}
    stages, blocks = COVERAGE_PRESETS[variant.coverage or "none"]
    return build_model({"name": variant.backbone}, attention, {"stages": stages, "blocks": blocks}, num_classes)


def _mean_flops(input_shape, *args, out_shape=None, **kwargs) -> int:
    # In the flop counter's units (2 per multiply-accumulate): one accumulate per element read.
    return 2 * math.prod(input_shape)


@torch.no_grad()
def count_macs(model: nn.Module, image_size: int = 224) -> tuple[int, int]:
    """(multiply-accumulates of the conv and linear layers, those the paper's counter adds: 2 per
    BatchNorm output and 1 per averaged element) for one image."""
    batch_norm = [0]

    def count_outputs(module, inputs, output):
        batch_norm[0] += output.numel()

    batch_norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    hooks = [m.register_forward_hook(count_outputs) for m in batch_norms]
    param = next(model.parameters())
    x = torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False, custom_mapping={_MEAN: _mean_flops}) as counter:
            model(x)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    averaged = counter.get_flop_counts()["Global"].get(_MEAN, 0) // 2
    layers = counter.get_total_flops() // 2 - averaged
    return layers, 2 * batch_norm[0] + averaged


def paper_gflops(model: nn.Module, image_size: int = 224) -> float:
    """GFLOPs as the paper counts them (see the module docstring), in 2^30 multiply-accumulates."""
    return sum(count_macs(model, image_size)) / GFLOP_UNIT


def count_variants(
    variants: Iterable[Variant], image_size: int = 224, num_classes: int = 1000
) -> dict[Variant, tuple[int, float]]:
    """{variant: (parameters, GFLOPs in the paper's unit)} for the variants and the plain ResNet of each backbone."""
    wanted = list(dict.fromkeys(variants))
    wanted += [plain(backbone) for backbone in dict.fromkeys(v.backbone for v in wanted)]
    counts = {}
    for variant in dict.fromkeys(wanted):
        model = build_variant(variant, num_classes)
        counts[variant] = (count_parameters(model), paper_gflops(model, image_size))
    return counts
