"""Top-1 / top-5 / loss over the validation set, on the images as given and rotated (Table 9).

Rotations act on the normalised batch tensors with torch.rot90 over the (H, W) dims. rot90 turns
from the first dim towards the second for k > 0, i.e. counter-clockwise on an image whose rows
run down and columns run right, so `degrees` clockwise is k = -degrees / 90. Validation images are
centre crops, square, so every rotation keeps the input size.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from emca.engine.distributed import DistributedContext
from emca.engine.metrics import Metrics, MetricSums
from emca.engine.precision import autocast

def rotate_clockwise(images: torch.Tensor, degrees: int) -> torch.Tensor:
    """Rotate a (B, C, H, W) batch by a multiple of 90 degrees clockwise."""
    if degrees % 90:
        raise ValueError(f"rotations must be multiples of 90 degrees, got {degrees}")
    return images if degrees % 360 == 0 else torch.rot90(images, k=-(degrees // 90), dims=(2, 3))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    ctx: DistributedContext,
    rotations: Iterable[int] = (0,),
    amp_dtype: Optional[torch.dtype] = None,
    while_unrotated: Callable[[], ContextManager] = contextlib.nullcontext,
    should_stop: Callable[[], bool] = lambda: False,
) -> Optional[dict[int, Metrics]]:
    """{degrees: metrics over the whole validation set, summed over ranks}; None when `should_stop()`
    became true on any rank (a stop signal: the pass is abandoned rather than finished).

    Every batch is run once per rotation, so one pass over the data serves them all;
    `while_unrotated()` wraps the forward of the unrotated images (to record learned scales on
    the images as given only).
    """
    rotations = list(dict.fromkeys(rotations))
    model.eval()
    sums = {degrees: MetricSums(ctx.device) for degrees in rotations}
    for images, labels in loader:
        # Checked locally: ranks hold different numbers of validation batches, so they agree once, below.
        if should_stop():
            break
        for degrees in rotations:
            recording = while_unrotated() if degrees % 360 == 0 else contextlib.nullcontext()
            with recording, autocast(ctx.device.type, amp_dtype):
                logits = model(rotate_clockwise(images, degrees))
            sums[degrees].update(F.cross_entropy(logits.float(), labels), logits, labels)
    if ctx.any_rank(should_stop()):
        return None
    return {degrees: total.reduce(ctx) for degrees, total in sums.items()}
