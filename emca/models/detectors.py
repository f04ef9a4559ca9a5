"""The detectors of task=detection: torchvision's FasterRCNN, MaskRCNN and RetinaNet around an
EMCA-ResNet with a feature pyramid (emca.models.detection.detection_backbone), built from the config
groups as build_model builds a classifier.

Labels are COCO category ids (0 is the background, as torchvision's references train on COCO with
num_classes=91), so a detector's predictions need no mapping back for COCO's evaluation.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from emca.layers.create_attn import option_defaults
from emca.models import _field
from emca.models.detection import EvalBatchNorm2d, detection_backbone
from emca.models.initialisation import initialise_from
from emca.models.resnet import BACKBONES
from emca.options import option_value, require_int

DETECTORS = {"faster_rcnn": FasterRCNN, "mask_rcnn": MaskRCNN, "retinanet": RetinaNet}
NORMS = {"mmdet": EvalBatchNorm2d, "frozen": FrozenBatchNorm2d}
FPN_CHANNELS = 256  # torchvision's and MMDetection's FPN width


def build_detector(detector: Any, backbone: Any, attention: Any, coverage: Any, num_classes: int,
                   weights: Optional[str] = None) -> nn.Module:
    """The detector of the config groups (detector, backbone, attention, coverage), its backbone
    initialised from `weights` (a classification run's checkpoint or a torchvision ResNet's state_dict)
    when given. Its `initialisation` says what the file gave (None without weights)."""
    name = option_value(_field(detector, "name"))
    require_int("detector.min_size", _field(detector, "min_size"), 1)
    require_int("detector.max_size", _field(detector, "max_size"), _field(detector, "min_size"))
    retinanet = name == "retinanet"
    options = {key: _field(attention, key) for key in ("integration", "gating", "align", *option_defaults())}
    body = detection_backbone(
        _field(backbone, "name"), _field(attention, "name"),
        {"stages": _field(coverage, "stages"), "blocks": _field(coverage, "blocks")},
        trainable_layers=_field(detector, "trainable_layers"),
        norm_layer=NORMS[option_value(_field(detector, "norm"))],
        # RetinaNet's levels P3-P7: C3-C5 and two extra levels (torchvision's retinanet_resnet50_fpn).
        returned_layers=[2, 3, 4] if retinanet else None,
        extra_blocks=_retinanet_extra(detector, backbone) if retinanet else None,
        include_stem=bool(_field(attention, "include_stem")),
        zero_init_residual=bool(_field(backbone, "zero_init_residual")),
        **{key: option for key, option in options.items() if option is not None},
    )
    # Loaded into the built backbone (its norms already converted: a frozen norm's buffers take the
    # file's statistics by the same names), so the run's log names the option, model.init_from.
    initialisation = initialise_from(body.body, weights, exclude=["fc"]) if weights else None
    model = DETECTORS[name](body, num_classes=num_classes, min_size=_field(detector, "min_size"),
                            max_size=_field(detector, "max_size"), **({} if retinanet else _rcnn_options(detector)))
    model.initialisation = initialisation
    return model


def _rcnn_options(detector: Any) -> dict[str, int]:
    """torchvision's keywords for the two-stage detectors' proposal and RoI counts."""
    proposals, rois = _field(detector, "proposals"), _field(detector, "rois_per_image")
    require_int("detector.proposals", proposals, 1)
    require_int("detector.rois_per_image", rois, 1)
    return {"rpn_post_nms_top_n_train": proposals, "rpn_post_nms_top_n_test": proposals,
            "box_batch_size_per_image": rois}


def _retinanet_extra(detector: Any, backbone: Any) -> LastLevelP6P7:
    # torchvision's LastLevelP6P7 starts from P5 when its input width equals its output width, else from C5.
    if option_value(_field(detector, "retinanet_extra")) == "p5":
        return LastLevelP6P7(FPN_CHANNELS, FPN_CHANNELS)
    last_stage = BACKBONES[_field(backbone, "name")].block.expansion * 512  # C5's width: 512 (R-18/34), 2048
    return LastLevelP6P7(last_stage, FPN_CHANNELS)


def detector_architecture(model: nn.Module, detector: Any, num_classes: int) -> dict[str, Any]:
    """What a detection checkpoint must match: the backbone's description and the detector's."""
    return {**model.backbone.body.architecture(), "num_classes": num_classes,
            "detector": option_value(_field(detector, "name"))}
