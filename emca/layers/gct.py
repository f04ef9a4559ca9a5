"""GCT: the Gated Channel Transformation (Yang, Zhu, Wu and Yang, "Gated Channel Transformation for Visual
Recognition", CVPR 2020, arXiv 1909.11519; authors' code github.com/z-x-yang/GCT, TensorFlow/convnet_builder.py
`GCT` and PyTorch/GCT.py, read at 68983ed).

For an input x (B, C, H, W), with per-channel parameters alpha (init 1), gamma and beta (init 0):

    embedding      s_c     = alpha_c * sqrt(sum_hw x_c^2 + eps)                    (the paper's l2 mode)
    normalisation  s_hat_c = s_c / sqrt(mean_c' s_c'^2 + eps)     = sqrt(C) s_c / ||s||_2, up to eps
    gate           g_c     = 1 + tanh(gamma_c * s_hat_c + beta_c)
    out            x * g

gamma = beta = 0 makes g = 1: a GCT starts as the identity, so it can be put in front of every convolution of
a network without changing it at initialisation. eps = 1e-5 is added inside both square roots as in both of the
authors' implementations (the normalisation's eps is added to the channel *mean*, not to the sum). The authors
also have an l1 mode (sum |x| and a mean-|s| normalisation); their README and ImageNet models use l2, the only
mode offered here. Gamma appears once, in the gate; the paper's figure calls alpha the embedding weight and
gamma, beta the gating weight and bias.

Where it sits (the released ResNet-50, both implementations): in front of every convolution, i.e. a GCT on
the input of each block's conv1, conv2, conv3 and of the projection shortcut's 1x1 conv (`convs="all"`,
the default). The authors' README reports that one GCT per block (before the first or the last 1x1 conv,
`convs="first"` / `"last"`) loses only 0.1-0.2 % top-1. Their ResNets also gate the image in front of the
stem's 7x7 conv (GCT(3): 9 parameters); a block method edits blocks only, so ours does not. Their ResNet-50
strides in the first 1x1 (MSRA ResNet v1), torchvision in the 3x3 (v1.5): the GCT before conv2 sees the map
before its stride here, after it there (same parameters, a negligible difference in cost).

As EMCA's W_m2 (emca_gct) the excitation is GCTExcitation on the `l2` pooling (emca.layers.pooling), and
EMCA's own gate applies: sigmoid. The excitation returns 2 (gamma s_hat + beta), so that EMCA's
sigmoid(2 t) = (1 + tanh t) / 2 is GCT's gate, halved; the module here gates with 1 + tanh(logits / 2),
which is exactly the authors' 1 + tanh(t). (EMCA's gating='residual', x (1 + Z), is then not GCT's gate.)
"""

import torch
from torch import nn

from emca.layers.pooling import L2_EPS, pool_descriptor

GCT_EPS = L2_EPS  # the authors' epsilon, in the embedding's (the `l2` pooling's) and the normalisation's roots
# Which convolutions of a block get a GCT in front: the authors' every conv (shortcut included), or one per block.
GCT_CONVS = ("all", "first", "last")


class GCTExcitation(nn.Module):
    """The GCT's channel step: an `l2`-pooled descriptor (B, C, 1) -> logits (B, C), 2 (gamma s_hat + beta).

    The factor 2 makes a sigmoid of the logits GCT's gate halved: sigmoid(2 t) = (1 + tanh t) / 2 (module
    docstring). Parameters are kept (C,) for the state_dict; the authors keep them (1, C, 1, 1).
    """

    def __init__(self, channels: int, eps: float = GCT_EPS):
        super().__init__()
        self.eps = eps
        self.alpha = nn.Parameter(torch.ones(channels))
        self.gamma = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, descriptor: torch.Tensor) -> torch.Tensor:
        embedding = self.alpha * descriptor.squeeze(-1)
        # Channel normalisation: each embedding over the channels' root mean square (sqrt(C) s / ||s||).
        normalised = embedding * torch.rsqrt(embedding.square().mean(dim=1, keepdim=True) + self.eps)
        return 2 * (self.gamma * normalised + self.beta)


class GatedChannelTransformation(nn.Module):
    """x -> x * (1 + tanh(gamma s_hat + beta)) (module docstring); the identity at initialisation."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.excitation = GCTExcitation(channels)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.excitation(pool_descriptor(x, "l2"))
        # In x's dtype: under autocast the float32 parameters give a float32 gate, which would promote the
        # convolution's input (and so every later layer) away from the dtype the block runs in.
        gate = 1 + torch.tanh(logits / 2)
        return x * gate[:, :, None, None].to(x.dtype)


def gated(conv: nn.Conv2d) -> nn.Sequential:
    """A GCT in front of a convolution, as the authors write it (nn.Sequential(GCT, conv))."""
    return nn.Sequential(GatedChannelTransformation(conv.in_channels), conv)


def gct_block(block: nn.Module, convs: str = "all") -> None:
    """Put a GCT in front of the convolutions of a torchvision block that `convs` names: all of them (the
    authors' ResNet-50: conv1, conv2, conv3 and the projection shortcut's conv), or the block's first or
    last conv alone (conv1; conv3 of a Bottleneck, conv2 of a BasicBlock)."""
    if convs not in GCT_CONVS:
        raise ValueError(f"gct convs must be one of {GCT_CONVS}, got {convs!r}")
    names = [name for name in ("conv1", "conv2", "conv3") if hasattr(block, name)]
    chosen = names if convs == "all" else names[:1] if convs == "first" else names[-1:]
    for name in chosen:
        setattr(block, name, gated(getattr(block, name)))
    if convs == "all" and block.downsample is not None:
        block.downsample[0] = gated(block.downsample[0])
