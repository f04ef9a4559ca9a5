"""CECA: circular Efficient Channel Attention, timm's variant of ECA (timm.layers.eca.CecaModule,
contributed by Chris Ha in huggingface/pytorch-image-models#82, 2020; no paper).

ECA (Wang et al., CVPR 2020) convolves the mean descriptor along the channel axis with one kernel of
k weights, zero-padded at both ends. CECA pads circularly instead: channel 0's neighbours include
channel C - 1, so every channel sees k channels, as the channels have no order that makes the two
ends special:

    d = mean_hw y                                     (B, C)
    z_c = sum_{j=0}^{k-1} w_j d_{(c + j - k // 2) mod C}
    out = y * sigmoid(z)

k is ECA's adaptive size at each width (emca.layers.excitation.eca_kernel_size, the rule timm's
CecaModule applies with gamma=2, beta=1: 5, 5, 5, 7 on ResNet-50's stages), or one odd size per stage
(option `kernel`, as ECA's). timm ships the module but no CECA model or weights (models/ uses it
nowhere), so where it sits follows ECA's released ResNet-50: every block's residual branch, before the
shortcut add (integration all). No bias: timm's conv has one only with its experimental act_layer.

As EMCA's W_m2 (attention=emca_ceca) the circular convolution runs on EMCA's fused mean descriptor.
"""

import torch

from emca.layers.excitation import ECAExcitation


class CECAExcitation(ECAExcitation):
    """ECA's excitation with circular instead of zero padding; `kernel` as ECAExcitation's."""

    def __init__(self, channels: int, kernel: int | str | None = "adaptive"):
        super().__init__(channels, kernel)
        size = self.conv.kernel_size[0]
        if size // 2 > channels:
            # A wrap of more than one turn would read some channels twice on one side.
            raise ValueError(f"CECA kernel {size} wraps more than once around {channels} channels: "
                             f"use an odd kernel of at most {2 * channels + 1}")
        # The weight stays in ECA's Conv1d (timm's `conv.weight`, (1, 1, k)); the module's own padding is
        # set to the circular one, so that self.conv(d) computes what forward does.
        self.conv.padding_mode = "circular"

    def padded(self, d: torch.Tensor, half: int) -> torch.Tensor:
        """(B, C) -> (B, C + 2 half), wrapped around: ECAExcitation's k-window product then runs on it (its
        comment says why not conv1d). By concatenation, not F.pad(mode='circular'): the same values, one
        Concat in ONNX."""
        if not half:  # a Python int: k = 1 has nothing to wrap (d[:, -0:] would be all of d)
            return d
        return torch.cat((d[:, -half:], d, d[:, :half]), dim=1)


__all__ = ["CECAExcitation"]
