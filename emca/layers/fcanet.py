"""FcaNet's multi-spectral channel attention, a branch module.

Qin, Zhang, Wu, Li, "FcaNet: Frequency Channel Attention Networks", ICCV 2021 (arXiv:2012.11879);
the authors' code is https://github.com/cfzd/FcaNet (model/layer.py: MultiSpectralAttentionLayer,
model/fcanet.py: where it sits in the ResNets).

Global average pooling is, up to a factor, the (0, 0) coefficient of a 2-D DCT-II of each channel.
FcaNet splits the channels into n equal groups and squeezes group i with the i-th of n selected DCT
basis functions instead, then excites as SE does (FC C -> C/r, ReLU, FC C/r -> C, sigmoid; no
biases in the authors' code) and gates the branch with the result.
"""

import math

import torch
from torch import nn

# The authors choose the DCT size per block from the block's `planes` (model/fcanet.py, `c2wh`):
# the spatial size that the block's output has at a 224 px input (R-18..152: 56, 28, 14, 7). So the
# DCT covers the whole map at ImageNet resolution and the adaptive pooling in front never fires.
SPATIAL_SIZE_AT_224 = {64: 56, 128: 28, 256: 14, 512: 7}

# Frequency rankings, as (u, v) pairs on a 7 x 7 DCT grid: u is the frequency down the rows (H), v
# along the columns (W). They transcribe the authors' get_freq_indices (model/layer.py), where they
# are two parallel lists of x (= u) and y (= v) indices. "top": the 49 components ranked by the
# ImageNet accuracy of a ResNet-50 whose attention uses that one component alone (the paper's
# single-frequency study), best first; "bot": the same ranking read from its worst end; "low":
# lowest frequencies first (roughly by u + v). A selection "top16" takes the first 16 pairs.
_TOP = (
    (0, 0), (0, 1), (6, 0), (0, 5), (0, 2), (1, 0), (1, 2), (4, 0),
    (5, 0), (1, 6), (3, 0), (0, 4), (0, 6), (0, 3), (3, 5), (2, 2),
    (4, 6), (6, 3), (3, 3), (5, 3), (5, 5), (2, 1), (6, 1), (5, 2),
    (5, 4), (3, 2), (3, 1), (4, 1), (2, 3), (2, 0), (6, 5), (1, 3),
)  # fmt: skip
_LOW = (
    (0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (2, 0), (2, 1), (1, 2),
    (2, 2), (0, 3), (3, 0), (4, 0), (0, 4), (1, 3), (3, 1), (0, 5),
    (1, 4), (2, 3), (3, 2), (4, 1), (5, 0), (0, 6), (1, 5), (2, 4),
    (3, 3), (4, 2), (5, 1), (6, 0), (1, 6), (2, 5), (3, 4), (4, 3),
)  # fmt: skip
_BOT = (
    (6, 6), (1, 4), (3, 4), (3, 6), (2, 6), (4, 3), (1, 1), (2, 4),
    (4, 4), (4, 5), (5, 6), (1, 5), (4, 2), (6, 2), (2, 5), (5, 1),
    (6, 4), (1, 3), (6, 5), (2, 0), (2, 3), (4, 1), (3, 1), (3, 2),
    (5, 4), (5, 2), (6, 1), (2, 1), (5, 5), (5, 3), (3, 3), (6, 3),
)  # fmt: skip
RANKINGS = {"top": _TOP, "low": _LOW, "bot": _BOT}
SELECTION_SIZES = (1, 2, 4, 8, 16, 32)
FREQUENCY_SELECTIONS = tuple(f"{ranking}{n}" for ranking in RANKINGS for n in SELECTION_SIZES)

# The rankings are defined on a 7 x 7 grid (the last stage's map at 224 px).
BASE_GRID = 7


def frequency_pairs(selection: str) -> tuple[tuple[int, int], ...]:
    """'top16' -> the first 16 (u, v) pairs of the 'top' ranking, on the 7 x 7 grid."""
    if selection not in FREQUENCY_SELECTIONS:
        raise ValueError(f"unknown frequency selection '{selection}': choose one of {list(FREQUENCY_SELECTIONS)}")
    ranking, count = selection[:3], int(selection[3:])
    return RANKINGS[ranking][:count]


def fca_dct_size(channels: int, expansion: int = 4) -> int:
    """The authors' DCT size for a block whose output (the attention's input) has `channels`
    channels: their c2wh of planes = channels / expansion (4 for Bottleneck, 1 for BasicBlock).

    Our branch modules get the block's output channels, not its planes, and the output channels
    alone are ambiguous across block types (256 is R-50's first stage but R-34's third), so the
    block's expansion has to be named; the default is the Bottleneck of R-50/101/152.
    """
    planes, remainder = divmod(channels, expansion)
    if remainder or planes not in SPATIAL_SIZE_AT_224:
        known = sorted(p * expansion for p in SPATIAL_SIZE_AT_224)
        raise ValueError(
            f"no FcaNet DCT size for {channels} channels with block expansion {expansion} (the authors define "
            f"it for {known}); pass dct_size explicitly"
        )
    return SPATIAL_SIZE_AT_224[planes]


def dct_basis_1d(length: int, frequency: int) -> torch.Tensor:
    """Orthonormal DCT-II basis vector: cos(pi k (t + 1/2) / N) * sqrt((1 if k == 0 else 2) / N).

    The authors' code uses this orthonormal scaling (the paper's equations leave it out), so the
    (0, 0) coefficient of an N x N map is N times its mean rather than N^2 times.
    """
    positions = torch.arange(length, dtype=torch.float64) + 0.5
    scale = math.sqrt((1.0 if frequency == 0 else 2.0) / length)
    return torch.cos(math.pi * frequency * positions / length) * scale


def dct_basis(size: int, pairs) -> torch.Tensor:
    """(len(pairs), size, size) float64: the 2-D basis functions B_uv[h, w] = b_u[h] * b_v[w]."""
    return torch.stack([torch.outer(dct_basis_1d(size, u), dct_basis_1d(size, v)) for u, v in pairs])


def adaptive_pool_matrix(size_in: int, size_out: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """(size_out, size_in) A with F.adaptive_avg_pool1d(x, size_out) == x @ A.T: row i averages the
    inputs floor(i size_in / size_out) .. ceil((i + 1) size_in / size_out) - 1 (PyTorch's bins, which
    overlap when size_out does not divide size_in and repeat pixels when size_out > size_in)."""
    bins = torch.arange(size_out, device=device)
    start = (bins * size_in) // size_out
    end = -((-(bins + 1) * size_in) // size_out)
    positions = torch.arange(size_in, device=device)
    inside = (positions >= start[:, None]) & (positions < end[:, None])
    return inside.to(dtype) / (end - start).to(dtype)[:, None]


def resampled_basis(basis: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(n, height, width) filters R_k = A_h^T B_k A_w from the (n, d, d) basis B, in float64 on the
    basis's device: adaptive average pooling is linear and separable, pool(X) = A_h X A_w^T, so
    <B_k, pool(X)> = <R_k, X>, the pooled DCT coefficient read straight off the un-pooled map."""
    d = basis.shape[-1]
    rows = adaptive_pool_matrix(height, d, device=basis.device)
    columns = adaptive_pool_matrix(width, d, device=basis.device)
    return torch.einsum("ih,kij,jw->khw", rows, basis.to(torch.float64), columns)


# A leaf of torch.fx symbolic tracing (timm/layers/attention.py wraps its own functions so): the
# choice between the basis and its resampling is Python control flow on the input's size, which a
# traced graph must make at run time, not once at tracing.
@torch.fx.wrap
def dct_filters(basis: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(n, height, width) in y's dtype, whose inner products with y's (height, width) maps are the
    DCT coefficients of y average-pooled to the (n, d, d) basis's grid: the basis itself on a
    d x d map, else resampled_basis."""
    height, width = y.shape[-2:]
    if (height, width) == tuple(basis.shape[-2:]):
        return basis.to(y.dtype)
    return resampled_basis(basis, height, width).to(y.dtype)


class MultiSpectralAttention(nn.Module):
    """y -> y * sigmoid(W2 relu(W1 dct_pool(y))), as FcaNet's MultiSpectralAttentionLayer.

    dct_size: the square map the DCT is taken on; a branch of another size is first adaptively
        average-pooled to it (as the authors do for detection inputs; computed without the pooled
        map, see resampled_basis). None: the authors' per-stage size for a Bottleneck block,
        fca_dct_size(channels) (256/512/1024/2048 -> 56/28/14/7); for a BasicBlock ResNet pass
        dct_size=fca_dct_size(channels, expansion=1).
    frequencies: one of FREQUENCY_SELECTIONS ('top16' in all of the authors' ImageNet models). The
        7 x 7-grid indices are multiplied by dct_size // 7, so that every stage sees the same
        relative frequencies (the authors': "(2, 2) in 14 x 14 is (1, 1) in 7 x 7").

    The channels are split into len(pairs) consecutive equal groups; group i is squeezed with the
    i-th basis function. The parameters are the two FCs only (fc.0, fc.2, bias-free: the keys of the
    authors' `att.fc`), so a model has SE-without-bias's parameter count.
    """

    per_channel_gate = True  # emca.models.attention_modules: its `gate` output (B, C) is the learned scales

    def __init__(self, channels: int, dct_size: int | None = None, reduction: int = 16, frequencies: str = "top16"):
        super().__init__()
        pairs = frequency_pairs(frequencies)
        if channels % len(pairs):
            raise ValueError(
                f"FcaNet splits the channels into {len(pairs)} equal groups ('{frequencies}'): {channels} channels "
                "do not divide"
            )
        if dct_size is None:
            dct_size = fca_dct_size(channels)
        if isinstance(dct_size, bool) or not isinstance(dct_size, int) or dct_size < BASE_GRID:
            # Below 7 the scale dct_size // 7 is 0 and every group would get the (0, 0) component.
            raise ValueError(f"dct_size must be an integer >= {BASE_GRID} (the frequency grid), got {dct_size!r}")
        scale = dct_size // BASE_GRID
        self.channels = channels
        self.dct_size = dct_size
        self.frequencies = tuple((u * scale, v * scale) for u, v in pairs)
        # A buffer, not a parameter: the fixed DCT is what the authors train (their README compares
        # it with learnable tensors), and it must not count as a parameter. Non-persistent: it is a
        # function of (dct_size, frequencies) alone, so a checkpoint need not carry it (the authors'
        # persistent C x H x W filters add 5.5 M numbers to an R-50 state_dict) and the state_dict
        # stays that of the learned weights. It still follows .to(device / dtype).
        basis = dct_basis(dct_size, self.frequencies).to(torch.get_default_dtype())
        self.register_buffer("basis", basis, persistent=False)
        # The basis resampled to the branch sizes seen so far (see _filters): a plain attribute, out
        # of the state_dict and of .to(); each entry remembers the basis tensor it was made from.
        self._resampled = {}
        hidden = max(channels // reduction, 1)
        # Sequential for the authors' key layout (fc.0.weight, fc.2.weight); their fc.3 is our gate.
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels, bias=False),
        )
        self.gate = nn.Sigmoid()

    def extra_repr(self) -> str:
        return f"channels={self.channels}, dct_size={self.dct_size}, groups={len(self.frequencies)}"

    def _filters(self, y: torch.Tensor) -> torch.Tensor:
        """(n, height, width) in y's dtype (dct_filters), the resampled basis computed in float64
        once per size, device and dtype."""
        traced = isinstance(y, torch.fx.Proxy) or torch.compiler.is_compiling()
        if traced or y.shape[-2:] == (self.dct_size, self.dct_size):
            # Traced (torch.fx, torch.compile): computed in the graph from the input's size, which
            # the graph does not fix; no Python-side cache to guard on. The basis itself needs none.
            return dct_filters(self.basis, y)
        key = (*y.shape[-2:], y.dtype, self.basis.device)
        entry = self._resampled.get(key)
        if entry is None or entry[0] is not self.basis:  # new size, or .to() / .double() replaced the basis
            # Normal tensors even under inference_mode, so that a later training step can save them
            # for backward. In float64, which autocast never casts: the only rounding is the final cast.
            with torch.inference_mode(False), torch.no_grad():
                filters = dct_filters(self.basis, y)
            if len(self._resampled) >= 16:
                self._resampled.clear()
            entry = self._resampled[key] = (self.basis, filters)
        return entry[1]

    def spectrum(self, y: torch.Tensor) -> torch.Tensor:
        """(B, C): each channel's coefficient of its group's DCT basis function, on y adaptively
        average-pooled to dct_size x dct_size where it has another size.

        The pooling is never materialised: the coefficient of the pooled map equals that of y with
        the basis resampled to y's size (resampled_basis), so a branch smaller than the DCT grid (a
        stage at under 224 px) is not first blown up to it. One (C/n x HW) @ (HW x 1) product per
        group, instead of the authors' multiply by a C x H x W filter and sum: no feature-map-sized
        temporary, and the filters are stored once per group rather than once per channel.
        """
        b, c, height, width = y.shape
        n = self.basis.shape[0]
        filters = self._filters(y)
        groups = y.reshape(b, n, c // n, height * width)
        return (groups @ filters.reshape(n, height * width, 1)).reshape(b, c)

    def factors(self, y: torch.Tensor) -> torch.Tensor:
        """The per-channel factors (B, C, 1, 1) in y's dtype (the gate is computed in the FCs' dtype
        under autocast), so that the block output keeps the branch's dtype."""
        return self.gate(self.fc(self.spectrum(y)))[:, :, None, None].to(y.dtype)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.factors(y)


__all__ = [
    "FREQUENCY_SELECTIONS",
    "MultiSpectralAttention",
    "adaptive_pool_matrix",
    "dct_basis",
    "dct_basis_1d",
    "dct_filters",
    "fca_dct_size",
    "frequency_pairs",
    "resampled_basis",
]
