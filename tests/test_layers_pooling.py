"""Mean-and-std pooling of half-precision maps: the hand-written backward is as accurate as autograd's."""

import pytest
import torch

from emca.layers.pooling import STD_EPS, pool_descriptor


def autograd_statistics(x: torch.Tensor) -> torch.Tensor:
    """torch's own mean and std (var_mean, population variance), differentiated by autograd."""
    var, mean = torch.var_mean(x, dim=(2, 3), correction=0)
    return torch.stack((mean, torch.sqrt(var + STD_EPS)), dim=-1)


def input_gradient(statistics, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_()
    out = statistics(x)
    out.backward(grad.to(out.dtype))
    return x.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_gradient_is_no_worse_than_autograds(dtype):
    # mean/std = 30: the gradient (x - mean) / (N std) is a small difference of large numbers.
    torch.manual_seed(0)
    x = (30 + torch.randn(4, 16, 14, 14, dtype=torch.float64)).to(dtype)
    grad = torch.randn(4, 16, 2, dtype=torch.float64).to(dtype)
    reference = input_gradient(autograd_statistics, x.double(), grad.double())

    def relative_error(g: torch.Tensor) -> float:
        return ((g.double() - reference).norm() / reference.norm()).item()

    ours = input_gradient(lambda t: pool_descriptor(t, "mean_std"), x, grad)
    assert ours.dtype == dtype
    assert relative_error(ours) <= relative_error(input_gradient(autograd_statistics, x, grad))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_statistics_keep_the_input_dtype(dtype):
    x = torch.randn(2, 3, 5, 5).to(dtype)
    assert all(pool_descriptor(x, name).dtype == dtype for name in ("mean", "mean_std", "mean_max"))
