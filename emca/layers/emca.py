"""EMCA: Efficient Multi-scale Channel Attention (Bakr et al., IEEE Access 2022, Algorithm 1).

The module gates the residual branch x0 of one block using x0's own pooled descriptor together with
the pooled descriptors of R - 1 earlier block outputs (the coverage region):

    SDA   every input is pooled to a (B, C_j, K) descriptor (done once per forward by the backbone)
    CDA   descriptors with fewer channels are aligned to C0 (repeat, or a learnable linear map)
    stack S = (B, R, C0, K)
    MAB   X_a = ReLU(sum_r w_r * S[:, r])          (the paper's W_m1: R weights, shared by channels)
          Z   = sigmoid(W_m2(X_a))                 (W_m2 = any excitation of the attention table)
    out   x0 * Z   (gating='multiply')  or  x0 * (1 + Z)  (gating='residual', the authors' code)

Aligning pooled vectors instead of feature maps is exact (pooling commutes with channel repetition)
and never materialises a repeated feature map.
"""

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from emca.layers.pooling import POOLINGS, pool_descriptor

ALIGNMENTS = ("repeat", "linear")
GATINGS = ("multiply", "residual")


class EMCA(nn.Module):
    per_channel_gate = True  # emca.models.attention_modules: its `gate` output (B, C0) is the learned scales

    def __init__(
        self,
        channels: int,
        source_channels: Sequence[int],
        excitation: nn.Module,
        *,
        align: str = "repeat",
        gating: str = "multiply",
        pooling: str = "mean",
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {list(POOLINGS)}, got '{pooling}'")
        if align not in ALIGNMENTS:
            raise ValueError(f"align must be one of {ALIGNMENTS}, got '{align}'")
        if gating not in GATINGS:
            raise ValueError(f"gating must be one of {GATINGS}, got '{gating}'")
        self.channels = channels
        self.source_channels = tuple(source_channels)
        self.align = align
        self.gating = gating
        self.pooling = pooling  # what W_m2 reads; the sources are pooled the same way (by the backbone)
        self.excitation = excitation
        self.gate = nn.Sigmoid()

        if align == "repeat":
            for c in self.source_channels:
                if channels % c:
                    raise ValueError(
                        f"align=repeat needs {channels} channels to be a multiple of every source's channels, "
                        f"but a source has {c}: use align=linear"
                    )
            self.aligners = None
            self.source_runs = _equal_width_runs(self.source_channels)
        else:
            self.aligners = nn.ModuleList(nn.Linear(c, channels, bias=False) for c in self.source_channels)
            for aligner, c in zip(self.aligners, self.source_channels, strict=True):
                _init_as_repeat(aligner.weight, c)

        # With a single scale there is nothing to fuse: the module is then exactly the plain
        # attention module (coverage 'none' == integration 'first', as in the paper's tables).
        if self.source_channels:
            # Uniform start: the fused vector begins as the average of the aligned descriptors.
            self.scale_weights = nn.Parameter(torch.full((self.num_scales,), 1.0 / self.num_scales))
        else:
            self.register_parameter("scale_weights", None)

    @property
    def num_scales(self) -> int:
        """R_i: the block's own branch plus the covered earlier outputs."""
        return 1 + len(self.source_channels)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, R={self.num_scales}, sources={list(self.source_channels)}, "
                f"align={self.align}, gating={self.gating}, pooling={self.pooling}")

    def fuse(self, own: torch.Tensor, sources: Sequence[torch.Tensor]) -> torch.Tensor:
        """Channel alignment, stacking and the MAB's scale fusion: -> (B, C0, K)."""
        weights = self.scale_weights
        if weights is None:
            return own
        if self.aligners is not None:
            # Linear acts on the channel axis: (B, C_j, K) -> (B, K, C_j) -> (B, K, C0) -> (B, C0, K)
            aligned = [
                aligner(s.transpose(1, 2)).transpose(1, 2) for aligner, s in zip(self.aligners, sources, strict=True)
            ]
            return F.relu(torch.stack([own, *aligned], dim=-1) @ weights)
        # Repeating a descriptor commutes with the weighted sum, so each run of equally wide sources
        # (one per covered stage) is summed at its own width and added to every repeat of it through a
        # broadcast view: a few small ops per run instead of a repeat, a copy and a multiply per source.
        batch, _, statistics = own.shape
        fused = own * weights[0]
        for start, stop, width in self.source_runs:
            run = torch.stack(sources[start:stop], dim=-1) @ weights[1 + start : 1 + stop]  # (B, width, K)
            fused = (fused.view(batch, -1, width, statistics) + run.unsqueeze(1)).view(batch, self.channels, statistics)
        return F.relu(fused)

    def factors(self, y: torch.Tensor, sources: Sequence[torch.Tensor]) -> torch.Tensor:
        """The per-channel factors (B, C0, 1, 1) that the module multiplies y by, in y's dtype (under
        autocast the float32 scale weights and SRM's cfc give float32 factors, which would promote
        the block output and so every later block to float32)."""
        if len(sources) != len(self.source_channels):
            raise ValueError(f"EMCA expects {len(self.source_channels)} source descriptors, got {len(sources)}")
        own = pool_descriptor(y, self.pooling)
        scales = self.gate(self.excitation(self.fuse(own, sources)))[:, :, None, None]
        return (1 + scales if self.gating == "residual" else scales).to(y.dtype)

    def forward(self, y: torch.Tensor, sources: Sequence[torch.Tensor]) -> torch.Tensor:
        return y * self.factors(y, sources)


def _equal_width_runs(widths: Sequence[int]) -> tuple[tuple[int, int, int], ...]:
    """(start, stop, width) of each run of equal consecutive widths: [64, 64, 256] -> ((0, 2, 64), (2, 3, 256))."""
    runs: list[tuple[int, int, int]] = []
    for index, width in enumerate(widths):
        if runs and runs[-1][2] == width:
            runs[-1] = (runs[-1][0], index + 1, width)
        else:
            runs.append((index, index + 1, width))
    return tuple(runs)


def _init_as_repeat(weight: torch.Tensor, source_channels: int) -> None:
    """Start a learnable alignment as the 'repeat' alignment (identity tiles), when shapes allow."""
    out_channels = weight.shape[0]
    with torch.no_grad():
        weight.zero_()
        rows = torch.arange(out_channels)
        weight[rows, rows % source_channels] = 1.0
