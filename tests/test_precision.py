"""The amp setting means the same to the trainer, eval.py and the benchmarks (emca/engine/precision.py)."""

import pytest
import torch

from emca.engine.precision import amp_dtype, autocast


def test_amp_names_map_to_their_dtypes():
    assert amp_dtype("off") is None
    assert amp_dtype("bf16") is torch.bfloat16
    assert amp_dtype("fp16") is torch.float16
    with pytest.raises(ValueError, match=r"amp='fp8': expected off, bf16 or fp16"):
        amp_dtype("fp8")


@pytest.mark.parametrize("amp,expected", [("off", torch.float32), ("bf16", torch.bfloat16)])
def test_autocast_runs_matmuls_in_the_amp_dtype(amp, expected):
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast("cpu", amp_dtype(amp)):
        assert (a @ b).dtype is expected
