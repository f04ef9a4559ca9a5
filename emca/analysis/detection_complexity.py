"""#P and GFLOPs of the detectors of Tables 6 and 8 as the paper counts them: MMDetection's
tools/get_flops.py (v1.x, docs/paper.md#tables-6-and-8), without MMDetection.

What MMDetection's counter does, and what is done here to the same effect:

- #P: parameters with requires_grad (mmdet.utils.get_model_complexity_info), of the detector with the
  paper's settings (DetectorConfig's defaults: stem and stage 1 frozen, the other stages' BatchNorm
  affine values trained), in 10^6. Heads of MMDetection v1.x's class counts: 81 classes (background
  included) for the R-CNN classifier, box regression and mask logits, which is torchvision's layout at
  num_classes=81; 80 sigmoid classes for RetinaNet.
- GFLOPs: multiply-adds of `forward_dummy` on one (1, 3, 1280, 800) image (H 1280, W 800: get_flops'
  default shape (3, 1280, 800)) in eval mode, in 10^9. Its hooks count convolutions (k*k*C_in*C_out
  per output element, plus 1 per output element for a bias; a transposed convolution is a _ConvNd
  there, so the mask head's deconvolution is counted so too), linear layers (no bias), 2 per
  BatchNorm input element, 1 per element of a ReLU module's output, and 1 per element a pooling module
  reads. Functional calls (F.relu, F.interpolate, F.max_pool2d), RoIAlign, sigmoid, softmax, additions,
  anchors, box decoding and NMS count nothing. The RoI heads run on exactly 1000 proposals, the mask
  head on the first 100 of them, as forward_dummy does.
- Where torchvision's modules differ from MMDetection's in what such a counter sees, the count follows
  MMDetection's: the RPN head's ReLU (a module in torchvision, F.relu in MMDetection) and the ReLU
  torchvision applies between P6 and P7 (MMDetection's RetinaNet has none) are not counted; the box
  head's two ReLUs (F.relu in torchvision, modules in MMDetection) are.
- The attention modules are ours (the paper's implementations are not published with the figures):
  their convolutions, linear layers and matrix products count as multiply-adds, their spatial means as
  the pooling modules they replace, their ReLUs as modules.

Counting runs on the meta device (shapes only): a detector takes a fraction of a second, and the count
equals that of a real forward (tests/test_detection_tables.py).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.pooling import _AvgPoolNd, _MaxPoolNd
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count
from torchvision.models.detection import RetinaNet

from emca.analysis.paper_reference import DETECTION_GFLOP_UNIT, DETECTION_PARAM_UNIT
from emca.analysis.variants import paper_options
from emca.layers.create_attn import is_emca
from emca.models import COVERAGE_PRESETS
from emca.models.config import DetectorConfig, DetectorName
from emca.models.detectors import build_detector

INPUT_SHAPE = (1280, 800)  # (H, W) of MMDetection's get_flops default (3, 1280, 800)
PROPOSALS = 1000  # forward_dummy's torch.randn(1000, 4) proposals through the box head
MASK_ROIS = 100  # ... and rois[:100] through the mask head
PAPER_COVERAGE = "prev_stage_all"  # the EMCA coverage of the paper's detection rows (its default)

# Classes of each detector's heads: MMDetection v1.x's (the paper's figures), or those a COCO run of
# task=detection trains (labels are COCO's category ids 1..90, 0 the background: 91).
COUNTINGS = {
    "mmdet": {"faster_rcnn": 81, "mask_rcnn": 81, "retinanet": 80},
    "coco_ids": {"faster_rcnn": 91, "mask_rcnn": 91, "retinanet": 91},
}

_ATEN = torch.ops.aten


def _doubled(count: Callable[..., int]) -> Callable[..., int]:
    # FlopCounterMode's unit is 2 per multiply-add (count_detector_macs halves its total).
    return lambda *args, **kwargs: 2 * count(*args, **kwargs)


def _conv(x_shape, w_shape, bias, stride, padding, dilation, transposed, *args, out_shape=None, **kwargs) -> int:
    # Every convolution as MMDetection v1.x's _ConvNd hook: the kernel at each output element, transposed
    # ones too (conv_flop_count's transposed=False), and one addition per output element for a bias.
    return conv_flop_count(x_shape, w_shape, out_shape, False) // 2 + (math.prod(out_shape) if bias is not None else 0)


def _input_elements(x_shape, *args, out_shape=None, **kwargs) -> int:
    return math.prod(x_shape)


def _output_elements(*args, out_shape=None, **kwargs) -> int:
    return math.prod(out_shape)


_OPS = {_ATEN.convolution: _doubled(_conv), _ATEN.mean: _doubled(_input_elements)}
_RELU = {_ATEN.relu: _doubled(_output_elements), _ATEN.relu_: _doubled(_output_elements)}


@dataclass(frozen=True)
class DetectorCount:
    params: int  # trainable (requires_grad) parameters
    macs: int  # multiply-adds of one image, MMDetection's way

    @property
    def params_m(self) -> float:
        return self.params / DETECTION_PARAM_UNIT

    @property
    def gflops(self) -> float:
        return self.macs / DETECTION_GFLOP_UNIT


def build_counted_detector(detector: str, backbone: str = "resnet50", attention: str = "none",
                           coverage: Optional[str] = PAPER_COVERAGE, counting: str = "mmdet",
                           device: Any = "meta") -> nn.Module:
    """The detector of a Table 6 / 8 row with the paper's settings (DetectorConfig's defaults, the paper's
    attention options) and the heads of `counting` (COUNTINGS), in eval mode, built on `device`."""
    if counting not in COUNTINGS:
        raise ValueError(f"counting must be one of {sorted(COUNTINGS)}, got {counting!r}")
    if detector not in COUNTINGS[counting]:
        raise ValueError(f"detector must be one of {sorted(COUNTINGS[counting])} (configs/detector), got {detector!r}")
    stages, blocks = COVERAGE_PRESETS[coverage if is_emca(attention) and coverage else "none"]
    options = {"name": attention, **paper_options(attention)}
    with torch.device(device):
        model = build_detector(DetectorConfig(name=DetectorName(detector)), {"name": backbone}, options,
                               {"stages": stages, "blocks": blocks}, COUNTINGS[counting][detector])
    return model.eval()


class _Counter:
    """Multiply-adds of the pieces of one forward: FlopCounterMode for the operators, forward hooks for the
    modules MMDetection's counter sees as such (BatchNorm, pooling)."""

    def __init__(self, model: nn.Module):
        self.macs = 0
        self.hooks = [module.register_forward_hook(self._norm) for module in model.modules()
                      if isinstance(module, _BatchNorm)]
        self.hooks += [module.register_forward_hook(self._pool) for module in model.modules()
                       if isinstance(module, (_MaxPoolNd, _AvgPoolNd))]

    def _norm(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        self.macs += inputs[0].numel() * (2 if module.affine else 1)

    def _pool(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        self.macs += inputs[0].numel()

    def run(self, piece: Callable[[Any], Any], argument: Any, relu: bool) -> Any:
        """piece(argument), its operators counted; its ReLUs only where MMDetection's are modules (`relu`)."""
        with FlopCounterMode(display=False, custom_mapping={**_OPS, **(_RELU if relu else {})}) as mode:
            output = piece(argument)
        self.macs += mode.get_total_flops() // 2
        return output

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()


@torch.no_grad()
def count_detector_macs(model: nn.Module, image_shape: tuple[int, int] = INPUT_SHAPE) -> int:
    """Multiply-adds of one image of `image_shape` (H, W) through a build_detector model, as MMDetection's
    get_flops counts its forward_dummy (module docstring), on the device the model is on."""
    parameter = next(model.parameters())
    image = torch.zeros(1, 3, *image_shape, device=parameter.device, dtype=parameter.dtype)
    counter = _Counter(model)
    try:
        features = counter.run(model.backbone.body, image, relu=True)
        levels = list(counter.run(model.backbone.fpn, features, relu=False).values())
        if isinstance(model, RetinaNet):
            counter.run(model.head, levels, relu=True)
        else:
            counter.run(model.rpn.head, levels, relu=False)
            heads = model.roi_heads
            counter.run(lambda rois: heads.box_predictor(heads.box_head(rois)),
                        _pooled_rois(model, heads.box_roi_pool, PROPOSALS), relu=True)
            if heads.has_mask():
                counter.run(lambda rois: heads.mask_predictor(heads.mask_head(rois)),
                            _pooled_rois(model, heads.mask_roi_pool, MASK_ROIS), relu=True)
    finally:
        counter.close()
    return counter.macs


def _pooled_rois(model: nn.Module, pool: nn.Module, count: int) -> Tensor:
    """What RoIAlign hands the head for `count` boxes (RoIAlign itself counts nothing, there as here)."""
    parameter = next(model.parameters())
    return torch.zeros(count, model.backbone.out_channels, *pool.output_size, device=parameter.device,
                       dtype=parameter.dtype)


@functools.lru_cache(maxsize=None)
def count_detector(detector: str, backbone: str = "resnet50", attention: str = "none",
                   coverage: Optional[str] = PAPER_COVERAGE, counting: str = "mmdet") -> DetectorCount:
    """Trainable parameters and multiply-adds (MMDetection's count) of a row's detector; cached."""
    model = build_counted_detector(detector, backbone, attention, coverage, counting)
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    return DetectorCount(trainable, count_detector_macs(model))


def detector_complexity(detector: str, backbone: str = "resnet50", attention: str = "none",
                        coverage: Optional[str] = PAPER_COVERAGE, counting: str = "mmdet") -> tuple[float, float]:
    """(#P in 10^6 trainable parameters, GFLOPs in 10^9 multiply-adds at 1280 x 800) of a detector, counted
    as MMDetection's get_flops counts (module docstring). coverage: EMCA's preset (the paper's
    prev_stage_all by default), ignored for other attentions."""
    count = count_detector(detector, backbone, attention, coverage, counting)
    return count.params_m, count.gflops
