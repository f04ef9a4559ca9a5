"""EMCA-ResNet backbones for torchvision's detectors: detection_backbone(...) -> BackboneWithFPN.

The counterpart of torchvision's `resnet_fpn_backbone` for every backbone and attention method of
this project: the result goes into `FasterRCNN`, `MaskRCNN` and `RetinaNet` as torchvision's does,
with the same options (frozen BatchNorm by default, `trainable_layers`, `returned_layers`,
`extra_blocks`) and the same state_dict keys for the ResNet's own parts (`body.conv1.weight`,
`body.layer1.0.bn1.running_mean`, ..., `fpn.*`)::

    from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from emca.models import detection_backbone

    backbone = detection_backbone("resnet50", attention="emca_se", coverage="prev_stage_all",
                                  weights="run/checkpoints/best.pt")
    faster = FasterRCNN(backbone, num_classes=91)
    mask = MaskRCNN(detection_backbone("resnet50", attention="emca_se"), num_classes=91)
    # RetinaNet as torchvision's retinanet_resnet50_fpn: C3-C5 and P6/P7 from P5
    retina = RetinaNet(detection_backbone("resnet50", attention="emca_se", returned_layers=[2, 3, 4],
                                          extra_blocks=LastLevelP6P7(256, 256)), num_classes=91)

Why not torchvision's BackboneWithFPN constructor itself: it wraps the model in an
IntermediateLayerGetter, which calls the model's children one after another. An EMCA model's blocks
read pooled descriptors of earlier blocks' outputs that the backbone shares between blocks and
stages (and a stage_end method such as BAM sits outside layer1..layer4), so that chain computes
other features. The body here is the EMCAResNet itself (`StageFeatures`), run through its own
`forward_intermediates`; `EMCABackboneWithFPN` is a BackboneWithFPN (isinstance holds, its forward
is torchvision's: fpn(body(x))) whose constructor takes that body instead.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from os import PathLike
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from emca.models.initialisation import initialise_from
from emca.models.resnet import EMCAResNet

log = logging.getLogger(__name__)

# torchvision's order: trainable_layers=n trains the first n of these (5 also bn1).
LAYERS_FROM_TOP = ("layer4", "layer3", "layer2", "layer1", "conv1")


class FrozenBatchNorm1d(FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d for (N, C) and (N, C, L) inputs: the BatchNorm1d inside some
    attention modules (SRM's excitation, BAM's channel gate), frozen with the rest. Frozen, it also
    runs on a batch of one image, where a training BatchNorm1d over (1, C) raises."""

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(shape) + bias.reshape(shape)


class EvalBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm whose statistics are frozen and whose affine parameters train: it stays in eval
    mode whatever model.train() says, as MMDetection's `norm_eval=True` with `requires_grad=True`
    keeps its backbones' BatchNorm (the setting the paper's detection figures were trained with).
    Its state_dict is a BatchNorm2d's, so ImageNet weights load into it unchanged."""

    def train(self, mode: bool = True) -> "EvalBatchNorm2d":
        return super().train(False)


class EvalBatchNorm1d(nn.BatchNorm1d):
    """EvalBatchNorm2d's rule for the BatchNorm1d inside some attention modules (SRM, BAM)."""

    def train(self, mode: bool = True) -> "EvalBatchNorm1d":
        return super().train(False)


class StageFeatures(EMCAResNet):
    """An EMCAResNet without its head whose forward returns the selected stages' outputs as an
    OrderedDict {"0": ..., "1": ...} (IntermediateLayerGetter's output), computed by the model's own
    forward_intermediates, so EMCA's shared descriptors flow as in classification. Stages after the
    last selected one are removed, as IntermediateLayerGetter drops them."""

    def __init__(self, returned_layers: Sequence[int] = (1, 2, 3, 4), **kwargs: Any):
        super().__init__(num_classes=0, **kwargs)
        self.returned_layers = list(returned_layers)
        self.prune_intermediate_layers(self.returned_layers, prune_head=True)

    def forward(self, x: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        maps = self.forward_intermediates(x, self.returned_layers, stop_early=True, intermediates_only=True)
        return OrderedDict((str(number), feature) for number, feature in enumerate(maps))


class EMCABackboneWithFPN(BackboneWithFPN):
    """torchvision's BackboneWithFPN over a body that returns its own OrderedDict of feature maps
    (StageFeatures), instead of an IntermediateLayerGetter over the model's children (see the module
    docstring). Attributes and forward are torchvision's: body, fpn, out_channels."""

    def __init__(self, body: nn.Module, in_channels_list: list[int], out_channels: int,
                 extra_blocks: Optional[ExtraFPNBlock] = None, norm_layer: Optional[Callable[..., nn.Module]] = None):
        nn.Module.__init__(self)
        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels_list=in_channels_list, out_channels=out_channels,
                                         extra_blocks=extra_blocks if extra_blocks is not None else LastLevelMaxPool(),
                                         norm_layer=norm_layer)
        self.out_channels = out_channels


def detection_backbone(
    backbone: str = "resnet50",
    attention: str = "emca_se",
    coverage: Any = "prev_stage_all",
    *,
    weights: Union[str, PathLike, None] = None,
    trainable_layers: int = 3,
    norm_layer: Optional[Callable[..., nn.Module]] = FrozenBatchNorm2d,
    returned_layers: Optional[Sequence[int]] = None,
    extra_blocks: Optional[ExtraFPNBlock] = None,
    out_channels: int = 256,
    **model_options: Any,
) -> EMCABackboneWithFPN:
    """An EMCA-ResNet with a feature pyramid on top, for torchvision's FasterRCNN, MaskRCNN and RetinaNet.

    backbone, attention, coverage: as in the configs (resnet18..resnet152; an attention of
        emca.models.ATTENTIONS, 'none' for the plain ResNet; an EMCA coverage preset or {stages, blocks}).
    model_options: EMCAResNet's other keywords (integration, gating, align, include_stem, drop_path_rate,
        the attention options such as se_reduction); num_classes has no place here (the detector has its own).
    weights: a path to one of our checkpoints or to a torchvision ResNet state_dict, loaded with
        emca.models.initialisation.initialise_from (the classifier excluded): the tensors the file
        and the backbone share are loaded, the rest keep their initialisation (an attention module a
        torchvision ResNet lacks, say); the result's `initialisation` says which, and it is logged.
        A tensor of another shape is a one-line CheckpointError. None: Kaiming initialisation.
    norm_layer: FrozenBatchNorm2d (torchvision's default) turns every BatchNorm of the backbone into
        a frozen one that keeps its statistics and affine values as buffers, the attention modules'
        included (BatchNorm1d ones become FrozenBatchNorm1d); EvalBatchNorm2d freezes the statistics
        only and trains the affine values (MMDetection's norm_eval, the paper's setting); nn.BatchNorm2d
        or None keeps the BatchNorms trainable as built. Another norm is refused (the weights could not
        carry over).
    trainable_layers: as torchvision's, 0..5: which of layer4, layer3, layer2, layer1, conv1 (counted
        from layer4) keep requires_grad; 5 trains all, bn1 too. The attention modules inside a frozen
        stage freeze with it (a stage_end module such as BAM's goes with the stage it follows); an
        EMCA module of a trained stage still reads the descriptors of frozen stages.
    returned_layers: the stages (1..4) whose outputs feed the FPN, increasing; default [1, 2, 3, 4].
        RetinaNet as torchvision builds it: [2, 3, 4] with extra_blocks=LastLevelP6P7(256, 256).
    extra_blocks: the FPN's extra levels; default LastLevelMaxPool() (Faster / Mask R-CNN's 'pool').
    out_channels: the FPN's width (torchvision: 256).
    """
    returned = _check_arguments(model_options, trainable_layers, returned_layers)
    convert_norms = _norm_conversion(norm_layer)

    body = StageFeatures(returned, backbone=backbone, attention=attention, coverage=coverage, **model_options)
    initialisation = None
    if weights is not None:
        initialisation = initialise_from(body, str(weights), exclude=["fc"])
        log.info(initialisation.summary().replace("model.init_from", "detection_backbone weights"))
    if convert_norms is not None:
        convert_norms(body)
    _freeze_layers(body, trainable_layers)

    channels = [body.feature_info[k]["num_chs"] for k in returned]  # (stage_channels reads BatchNorm widths)
    result = EMCABackboneWithFPN(body, channels, out_channels, extra_blocks=extra_blocks)
    result.initialisation = initialisation
    return result


def _check_arguments(model_options: dict, trainable_layers: Any, returned_layers: Any) -> list[int]:
    """The returned stages, after refusing what torchvision's resnet_fpn_backbone would not take."""
    if "num_classes" in model_options:
        raise TypeError("detection_backbone() takes no num_classes: the backbone has no classifier, give "
                        "num_classes to the detector (FasterRCNN(backbone, num_classes=...))")
    if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int) or not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be an integer in [0, 5] (as torchvision's), got {trainable_layers!r}")
    returned = [1, 2, 3, 4] if returned_layers is None else list(returned_layers)
    if not returned or any(isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 4 for k in returned) or (
            returned != sorted(set(returned))):
        raise ValueError(f"returned_layers must be increasing stage numbers in [1, 4], got {returned_layers!r}")
    return returned


def _norm_conversion(norm_layer: Optional[Callable[..., nn.Module]]) -> Optional[Callable[[nn.Module], nn.Module]]:
    """What becomes of the backbone's BatchNorms: frozen entirely, statistics frozen, or kept as built."""
    if isinstance(norm_layer, type) and issubclass(norm_layer, FrozenBatchNorm2d):
        return freeze_batchnorm
    if norm_layer is EvalBatchNorm2d:
        return freeze_statistics
    if norm_layer is None or norm_layer is nn.BatchNorm2d:
        return None
    raise ValueError(f"norm_layer must be torchvision.ops.misc.FrozenBatchNorm2d (frozen statistics and affine, "
                     f"the default), EvalBatchNorm2d (frozen statistics, trained affine: MMDetection's) or "
                     f"nn.BatchNorm2d (trained BatchNorm), got {norm_layer!r}")


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace, in place, every BatchNorm1d / BatchNorm2d under `module` by FrozenBatchNorm1d / 2d
    with its running statistics, affine values and eps (torchvision's frozen norm, as its detection
    backbones use). Returns `module`."""
    for name, child in list(module.named_children()):
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)) and not isinstance(child, nn.SyncBatchNorm):
            setattr(module, name, _frozen(child))
        else:
            freeze_batchnorm(child)
    return module


def freeze_statistics(module: nn.Module) -> nn.Module:
    """Turn, in place, every BatchNorm1d / BatchNorm2d under `module` into EvalBatchNorm1d / 2d (the
    same module, its class changed: parameters, buffers and hooks stay). Returns `module`."""
    for child in module.modules():
        if type(child) is nn.BatchNorm2d:
            child.__class__ = EvalBatchNorm2d
        elif type(child) is nn.BatchNorm1d:
            child.__class__ = EvalBatchNorm1d
        if isinstance(child, (EvalBatchNorm1d, EvalBatchNorm2d)):
            if child.running_mean is None:
                raise ValueError(f"cannot freeze {child}: it keeps no running statistics (track_running_stats=False)")
            child.eval()
    return module


def _frozen(bn: nn.modules.batchnorm._BatchNorm) -> FrozenBatchNorm2d:
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"cannot freeze {bn}: it keeps no running statistics (track_running_stats=False)")
    frozen = (FrozenBatchNorm2d if isinstance(bn, nn.BatchNorm2d) else FrozenBatchNorm1d)(bn.num_features, eps=bn.eps)
    with torch.no_grad():
        if bn.affine:
            frozen.weight.copy_(bn.weight)
            frozen.bias.copy_(bn.bias)
        frozen.running_mean.copy_(bn.running_mean)
        frozen.running_var.copy_(bn.running_var)
    return frozen.to(device=bn.running_mean.device)


def _freeze_layers(body: StageFeatures, trainable_layers: int) -> None:
    """torchvision's _resnet_fpn_extractor rule, with stage_attn.{i} counted as layer{i + 1}."""
    train = set(LAYERS_FROM_TOP[:trainable_layers]) | ({"bn1"} if trainable_layers == 5 else set())
    for name, parameter in body.named_parameters():
        top, _, rest = name.partition(".")
        if top == "stage_attn":
            top = f"layer{int(rest.partition('.')[0]) + 1}"
        if top not in train:
            parameter.requires_grad_(False)
