"""The coverage region of EMCA (the paper's Eq. 5, docs/paper.md#coverage-region): which earlier
block outputs a stage's module sees.

R_i = 1 + sum_{j=1..S} N'_{i-j}: the block itself plus the last N' block outputs of each of the S
preceding stages. `stages` and `blocks` are an int or 'all' (S = i - 1, N' = N_{i-j}). The stem
output (after max-pool) can act as a one-block stage 0 (`include_stem`).
"""

from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

ALL = "all"
Count = Union[int, str]

PRESETS: dict[str, tuple[Count, Count]] = {
    "none": (0, 0),
    "prev_stage_last": (1, 1),
    "prev_stage_all": (1, ALL),
    "all_stages_last": (ALL, 1),
    "all_stages_all": (ALL, ALL),
}


@dataclass(frozen=True)
class CoverageRegion:
    stages: Count
    blocks: Count

    @classmethod
    def parse(cls, spec: Any) -> "CoverageRegion":
        """A preset name, a CoverageRegion, or a mapping with `stages` and `blocks`."""
        if isinstance(spec, CoverageRegion):
            return spec
        if isinstance(spec, str):
            if spec not in PRESETS:
                raise ValueError(
                    f"unknown coverage preset '{spec}': choose one of {list(PRESETS)} or give {{stages, blocks}}"
                )
            return cls(*PRESETS[spec])
        if isinstance(spec, Mapping) or hasattr(spec, "keys"):
            missing = {"stages", "blocks"} - set(spec.keys())
            if missing:
                raise ValueError(f"coverage mapping needs keys 'stages' and 'blocks' (missing {sorted(missing)})")
            return cls(_count(spec["stages"], "stages"), _count(spec["blocks"], "blocks"))
        raise ValueError(f"coverage must be a preset name or a mapping {{stages, blocks}}, got {spec!r}")


def coverage_name(stages: Any, blocks: Any) -> str:
    """The preset that (stages, blocks) spell, else a literal description.

    Derived from the fields, never taken from a config's `name`, which a command-line override of
    coverage.stages / coverage.blocks leaves stale.
    """
    for name, preset in PRESETS.items():
        if preset == (stages, blocks):
            return name
    return f"stages={stages},blocks={blocks}"


def _count(value: Any, key: str) -> Count:
    if isinstance(value, str) and value == ALL:
        return ALL
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"coverage.{key} must be a non-negative integer or 'all', got {value!r}")
    return value


def output_index(stage_depths: Sequence[int], stage: int, block: int) -> int:
    """Index of block `block` (0-based) of stage `stage` (1-based) among all outputs; 0 is the stem."""
    return 1 + sum(stage_depths[: stage - 1]) + block


def coverage_sources(
    region: CoverageRegion, stage_depths: Sequence[int], include_stem: bool = False, backbone: str = "backbone"
) -> list[list[int]]:
    """For each stage (1-based order), the output indices its EMCA module reads, nearest first.

    Raises ValueError, naming the limit, when the region asks for more than the backbone has.
    """
    num_stages = len(stage_depths)
    max_stages = num_stages - 1 + int(include_stem)
    if region.stages != ALL and region.stages > max_stages:
        raise ValueError(
            f"coverage.stages={region.stages} asks for more preceding stages than {backbone} has: "
            f"at most {max_stages} ({num_stages} stages{', plus the stem' if include_stem else ''}); use a smaller "
            "value or 'all'"
        )
    sources: list[list[int]] = []
    for stage in range(1, num_stages + 1):
        available = stage - 1 + int(include_stem)
        depth_back = available if region.stages == ALL else min(region.stages, available)
        covered: list[int] = []
        for previous in range(stage - 1, stage - 1 - depth_back, -1):
            if previous == 0:  # the stem: a single output
                covered.append(0)
                continue
            n = stage_depths[previous - 1]
            take = n if region.blocks == ALL else region.blocks
            if take > n:
                raise ValueError(
                    f"coverage.blocks={region.blocks} exceeds the {n} blocks of stage {previous} of {backbone}: "
                    f"use at most {min(stage_depths[:-1])} or 'all'"
                )
            covered.extend(output_index(stage_depths, previous, b) for b in range(n - 1, n - 1 - take, -1))
        sources.append(covered)
    return sources


def num_scales(sources: Sequence[Sequence[int]]) -> list[int]:
    """R_i per stage."""
    return [1 + len(s) for s in sources]
