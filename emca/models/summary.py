"""What a model costs and where its attention sits: parameters, GFLOPs, per-stage layout."""

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from emca.layers import EMCA


def count_parameters(model: nn.Module) -> int:
    """sum(p.numel()) over all parameters (the torchvision convention; the paper counts the same in
    units of 2^20, docs/paper.md#units)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def measure_gflops(model: nn.Module, image_size: int = 224) -> float:
    """Multiply-accumulates per image / 1e9, counted by torch.utils.flop_counter.

    ResNet papers (and torchvision's model metadata) call multiply-accumulates "FLOPs"; the flop
    counter counts a multiply-add as 2, so its total is halved.
    """
    param = next(model.parameters())
    x = torch.zeros(1, getattr(model, "in_chans", 3), image_size, image_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9


def stage_layout(model: nn.Module) -> list[dict]:
    """Per stage: its blocks, which carry attention (a branch module, or a block the method changed),
    whether a stage_end module follows it, and R_i of each EMCA module."""
    rows = []
    for stage_index, (stage, channels) in enumerate(zip(model._stages, model.stage_channels, strict=True), start=1):
        attended = [i for i, block in enumerate(stage) if block.attn is not None or block.edited]
        stage_end = model.stage_attn is not None and not isinstance(model.stage_attn[stage_index - 1], nn.Identity)
        rows.append(
            {
                "stage": stage_index,
                "blocks": len(stage),
                "channels": channels,
                "attention_blocks": attended,
                "stage_end": stage_end,
                "num_scales": [stage[i].attn.num_scales for i in attended if isinstance(stage[i].attn, EMCA)],
            }
        )
    return rows


def format_summary(model: nn.Module, image_size: int = 224) -> str:
    arch = model.architecture()
    coverage = arch["coverage"]
    lines = [
        f"model      {arch['backbone']}  attention={arch['attention']}"
        + (f"  coverage=(stages={coverage['stages']}, blocks={coverage['blocks']})" if coverage else "")
        + ("  include_stem" if getattr(model, "include_stem", False) else ""),
        f"{'stage':>5}  {'blocks':>6}  {'channels':>8}  {'attention in blocks':<22}  R_i",
    ]
    for row in stage_layout(model):
        attended = ",".join(str(b + 1) for b in row["attention_blocks"])
        attended = ",".join(filter(None, (attended, "end" if row["stage_end"] else ""))) or "-"
        scales = ",".join(map(str, row["num_scales"])) or "-"
        lines.append(f"{row['stage']:>5}  {row['blocks']:>6}  {row['channels']:>8}  {attended:<22}  {scales}")
    params = count_parameters(model)
    lines.append(f"parameters {params:,} ({params / 1e6:.3f} M, sum of numel)")
    lines.append(f"GFLOPs     {measure_gflops(model, image_size):.3f} at {image_size}x{image_size} (multiply-adds)")
    return "\n".join(lines)
