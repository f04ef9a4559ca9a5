"""Structured-config schemas of the model groups: backbone, attention, coverage."""

from dataclasses import dataclass
from typing import Any


@dataclass
class BackboneConfig:
    name: str = "resnet50"
    zero_init_residual: bool = False


@dataclass
class AttentionConfig:
    name: str = "none"  # none | se | eca | srm | emca_se | emca_eca | emca_srm
    integration: str = "all"  # all | first | last  (for EMCA: which block of each stage carries it)
    se_ratio: int = 16
    eca_kernel: Any = "adaptive"  # 'adaptive' or one odd size per stage, e.g. [3, 5, 5, 7]
    gating: str = "multiply"  # multiply: x0*Z (paper) | residual: x0*(1+Z) (authors' code)
    align: str = "repeat"  # repeat | linear (learnable channel alignment)
    include_stem: bool = False  # the stem output acts as a one-block stage 0


@dataclass
class CoverageConfig:
    name: str = "prev_stage_all"
    stages: Any = 1  # int or 'all'
    blocks: Any = "all"  # int or 'all'
