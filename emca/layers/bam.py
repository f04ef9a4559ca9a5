"""BAM: Bottleneck Attention Module (Park, Woo, Lee and Kweon, BMVC 2018, arXiv:1807.06514).

A stage_end module: it refines a whole stage's output F (B, C, H, W) with a 3-D attention map built
from two parallel branches,

    M_c(F) = MLP(AvgPool(F))                                    (B, C, 1, 1)  channel branch
    M_s(F) = conv1x1(DC3x3(DC3x3(conv1x1(F))))                  (B, 1, H, W)  spatial branch
    F'     = F * (1 + sigmoid(M_c(F) + M_s(F)))                 broadcast to (B, C, H, W)

The layers follow the authors' code (github.com/Jongchan/attention-module, MODELS/bam.py), whose
parameters are the published model's (osmr's conversion of the authors' R-50 weights has
25,915,099 parameters, as this module gives): every Linear and Conv2d keeps its bias, the channel
MLP has one hidden layer of C/r units with BatchNorm1d + ReLU, the spatial branch has BatchNorm2d +
ReLU after the 1x1 reduction and after each of the two 3x3 dilated convolutions, and neither branch
has a BatchNorm on its output (the paper's equations put one there; the code does not).

The paper (eq. 2 and its ablation, Table 2b) combines the branches by a sum; the authors' code
multiplies them (its issues #1, #39, #52). `combine="sum"` is the paper, `combine="product"` the
code that trained the released weights; both have the same parameters.

In the authors' ResNet (MODELS/model_resnet.py) a BAM follows layer1, layer2 and layer3, i.e. sits
at each bottleneck of the network where the next stage downsamples; there is none after layer4.
"""

import torch
from torch import nn

COMBINATIONS = ("sum", "product")


class BAM(nn.Module):
    """x -> x * (1 + sigmoid(channel(x) [+ or *] spatial(x))), see the module docstring.

    The channel branch's BatchNorm1d normalises over the batch: as in the authors' code, a training
    forward needs more than one sample. The sigmoid is a named child (`gate`) so that the learned
    attention (before the 1 +) can be read with a forward hook.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        dilation: int = 4,
        num_dilated_convs: int = 2,
        combine: str = "sum",
    ):
        super().__init__()
        if reduction < 1 or channels < reduction:
            raise ValueError(f"BAM needs 1 <= reduction <= channels, got reduction={reduction}, channels={channels}")
        if dilation < 1:
            raise ValueError(f"BAM's dilation must be a positive integer, got {dilation}")
        if num_dilated_convs < 0:
            raise ValueError(f"BAM's num_dilated_convs must be >= 0, got {num_dilated_convs}")
        if combine not in COMBINATIONS:
            raise ValueError(f"BAM's combine must be one of {COMBINATIONS}, got '{combine}'")
        self.combine = combine
        # The authors use C // r for both branches' hidden width.
        hidden = channels // reduction

        self.channel_gate = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),
        )
        spatial = [nn.Conv2d(channels, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)]
        for _ in range(num_dilated_convs):
            # padding = dilation keeps H x W, so that the map can be broadcast back onto x.
            spatial += [
                nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=True),
            ]
        spatial.append(nn.Conv2d(hidden, 1, 1))
        self.spatial_gate = nn.Sequential(*spatial)
        self.gate = nn.Sigmoid()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' initialisation (their ResNet's __init__, which also reaches the BAMs): Kaiming
        normal (fan_out) convolutions, every bias zero, BatchNorm weights one; the Linear weights keep
        PyTorch's default. Their key filter meant to zero the spatial BN weights never matches a
        key ("SpatialGate" is a class name, not part of any key), so those stay one here too."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.ones_(module.weight)
            if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.zeros_(module.bias)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The factor (B, C, H, W) that x is multiplied by, 1 + sigmoid(...), in x's dtype: under
        autocast the Linear/Conv outputs are bfloat16 while a BatchNorm may give float32, which
        would otherwise promote the stage output and everything after it."""
        channel = self.channel_gate(x.mean(dim=(2, 3)))[:, :, None, None]  # (B, C, 1, 1)
        spatial = self.spatial_gate(x)  # (B, 1, H, W)
        logits = channel + spatial if self.combine == "sum" else channel * spatial
        return (1 + self.gate(logits)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)
