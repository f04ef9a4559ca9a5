"""Parameters and GFLOPs of table variants, without training: build each model and count."""

from __future__ import annotations

from typing import Iterable

import torch

from emca.analysis.variants import Variant, plain
from emca.models import COVERAGE_PRESETS, build_model
from emca.models.config import AttentionConfig
from emca.models.summary import count_parameters, measure_gflops


def build_variant(variant: Variant, num_classes: int = 1000) -> torch.nn.Module:
    """The model of a variant with the paper's options (plus the variant's own)."""
    attention = {"name": variant.attention, "integration": variant.integration or AttentionConfig.integration, **dict(variant.options)}
    stages, blocks = COVERAGE_PRESETS[variant.coverage or "none"]
    return build_model({"name": variant.backbone}, attention, {"stages": stages, "blocks": blocks}, num_classes)


def count_variants(variants: Iterable[Variant], image_size: int = 224, num_classes: int = 1000) -> dict[Variant, tuple[int, float]]:
    """{variant: (parameters, GFLOPs)} for the variants and the plain ResNet of each backbone."""
    wanted = list(dict.fromkeys(variants))
    wanted += [plain(backbone) for backbone in dict.fromkeys(v.backbone for v in wanted)]
    counts = {}
    for variant in dict.fromkeys(wanted):
        model = build_variant(variant, num_classes)
        counts[variant] = (count_parameters(model), measure_gflops(model, image_size))
    return counts
