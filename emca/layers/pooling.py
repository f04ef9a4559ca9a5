"""Spatial pooling of a feature map into a per-channel descriptor of shape (B, C, K).

K = 1 holds the mean (SE, ECA); K = 2 holds mean and standard deviation (SRM's style pooling).
One descriptor format for every module lets EMCA stack, align and fuse descriptors without caring
which excitation follows.
"""

import torch

# Keeps the gradient of sqrt finite where a channel is constant (a 1x1 map at small resolutions).
STD_EPS = 1e-5


def pool_statistics(x: torch.Tensor, num_statistics: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, num_statistics): channel mean, then (optionally) channel std."""
    if num_statistics == 1:
        return x.mean(dim=(2, 3)).unsqueeze(-1)
    if num_statistics == 2:
        # Population variance (not unbiased) so that a 1x1 map gives std = sqrt(eps), not NaN.
        var, mean = torch.var_mean(x, dim=(2, 3), correction=0)
        return torch.stack((mean, torch.sqrt(var + STD_EPS)), dim=-1)
    raise ValueError(f"num_statistics must be 1 (mean) or 2 (mean, std), got {num_statistics}")
