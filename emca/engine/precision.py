"""Mixed precision: the `amp` setting (off | bf16 | fp16) as an autocast dtype and context.

One home for training, evaluation and the benchmarks, so that they all mean the same by amp=bf16.
fp16 also needs a GradScaler when training; bf16 has float32's range and does not.
"""

from __future__ import annotations

from typing import Optional

import torch

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(amp: str) -> Optional[torch.dtype]:
    """'bf16' / 'fp16' -> their dtype, 'off' -> None."""
    if amp != "off" and amp not in AMP_DTYPES:
        raise ValueError(f"amp={amp!r}: expected off, bf16 or fp16")
    return AMP_DTYPES.get(amp)


def autocast(device_type: str, dtype: Optional[torch.dtype]) -> torch.autocast:
    """torch.autocast to `dtype` on `device_type`; a disabled one (float32 throughout) for None."""
    return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)
