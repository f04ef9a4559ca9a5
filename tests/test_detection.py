"""emca.models.detection_backbone in torchvision's detectors (issue 15): FasterRCNN, MaskRCNN and
RetinaNet with an EMCA-SE R-50 backbone train and evaluate on CPU; the backbone's parameter increase
over the plain ResNet's is the classifier's; the plain backbone is torchvision's resnet_fpn_backbone."""

import pytest
import timm
import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from emca.common.checkpoint_file import CheckpointError
from emca.models import detection_backbone
from emca.models.detection import FrozenBatchNorm1d

DETECTORS = ("faster_rcnn", "mask_rcnn", "retinanet")
SMALL = dict(min_size=64, max_size=96)  # torchvision's transform resizes to this: fast on CPU
# Fewer proposals and sampled RoIs than torchvision's defaults (2000 / 512): two small images need few.
FEW_ROIS = dict(rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100,
                rpn_post_nms_top_n_test=50, box_batch_size_per_image=64, box_detections_per_img=20)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_detector(kind: str, attention: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "retinanet":  # as torchvision's retinanet_resnet50_fpn
        backbone = detection_backbone("resnet50", attention, returned_layers=[2, 3, 4],
                                      extra_blocks=LastLevelP6P7(256, 256))
        return RetinaNet(backbone, num_classes=3, **SMALL, topk_candidates=100, detections_per_img=20)
    detector = FasterRCNN if kind == "faster_rcnn" else MaskRCNN
    return detector(detection_backbone("resnet50", attention), num_classes=3, **SMALL, **FEW_ROIS)


@pytest.fixture(scope="module")
def detectors(one_torch_thread):
    """Each R-50 detector built once per module, on first use: {(kind, attention): detector}."""
    built = {}

    def get(kind: str, attention: str = "emca_se") -> nn.Module:
        if (kind, attention) not in built:
            built[kind, attention] = build_detector(kind, attention)
        return built[kind, attention]

    return get


def synthetic_batch(with_masks: bool):
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 80, 96, generator=generator), torch.rand(3, 72, 64, generator=generator)]
    targets = []
    for image, boxes in zip(images, ([[8.0, 10.0, 50.0, 60.0], [30.0, 5.0, 90.0, 40.0]], [[4.0, 6.0, 40.0, 50.0]]),
                            strict=True):
        target = {"boxes": torch.tensor(boxes), "labels": torch.tensor([1, 2][:len(boxes)])}
        if with_masks:
            masks = torch.zeros(len(boxes), *image.shape[1:], dtype=torch.uint8)
            for mask, (x0, y0, x1, y1) in zip(masks, boxes, strict=True):
                mask[int(y0):int(y1), int(x0):int(x1)] = 1
            target["masks"] = masks
        targets.append(target)
    return images, targets


@pytest.mark.parametrize("kind", DETECTORS)
def test_an_emca_se_r50_detector_trains_and_evaluates_on_cpu(detectors, kind):
    detector = detectors(kind)
    assert isinstance(detector.backbone, BackboneWithFPN)
    body = detector.backbone.body
    trained, frozen = body.layer4[0].conv1.weight, body.conv1.weight
    trained_attn, frozen_attn = body.layer4[0].attn.excitation.fc1.weight, body.layer1[0].attn.excitation.fc1.weight
    assert trained.requires_grad and trained_attn.requires_grad
    assert not frozen.requires_grad and not frozen_attn.requires_grad  # layer1 and its EMCA module freeze
    before = {name: tensor.clone() for name, tensor in
              (("trained", trained), ("trained_attn", trained_attn), ("frozen", frozen), ("frozen_attn", frozen_attn),
               ("bn_mean", body.layer4[0].bn1.running_mean))}

    images, targets = synthetic_batch(with_masks=kind == "mask_rcnn")
    detector.train()
    optimizer = torch.optim.SGD([p for p in detector.parameters() if p.requires_grad], lr=0.01)
    losses = detector(images, targets)
    expected = {"faster_rcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
                "retinanet": {"classification", "bbox_regression"}}
    assert set(losses) == expected.get(kind, expected["faster_rcnn"] | {"loss_mask"})
    assert all(torch.isfinite(loss) for loss in losses.values())
    optimizer.zero_grad()
    sum(losses.values()).backward()
    assert frozen.grad is None and frozen_attn.grad is None
    optimizer.step()
    assert not torch.equal(trained, before["trained"]) and not torch.equal(trained_attn, before["trained_attn"])
    assert torch.equal(frozen, before["frozen"]) and torch.equal(frozen_attn, before["frozen_attn"])
    assert torch.equal(body.layer4[0].bn1.running_mean, before["bn_mean"])  # frozen BatchNorm in training too

    detector.eval()
    with torch.no_grad():
        outputs = detector(images)
    assert len(outputs) == 2
    for output, image in zip(outputs, images, strict=True):
        assert {"boxes", "labels", "scores"} <= set(output)
        assert output["boxes"].shape[1:] == (4,) and len(output["labels"]) == len(output["scores"])
        if kind == "mask_rcnn":
            assert output["masks"].shape[1:] == (1, *image.shape[1:])


@pytest.mark.parametrize("kind", DETECTORS)
def test_the_detectors_parameter_increase_is_the_classifiers(detectors, kind):
    """The classifier's fc is the same with and without attention and frozen BatchNorm holds no
    parameters on either side, so both increases are exactly the EMCA-SE modules' parameters."""
    increase = count(detectors(kind, "emca_se")) - count(detectors(kind, "none"))
    classifier = count(timm.create_model("emca_se_resnet50")) - count(timm.create_model("emca_resnet50"))
    attention = sum(p.numel() for name, p in detectors(kind).backbone.body.named_parameters() if ".attn." in name)
    assert increase == classifier == attention > 0


def test_the_plain_backbone_is_torchvisions_resnet_fpn_backbone(detectors):
    ours = detectors("faster_rcnn", "none").backbone
    theirs = resnet_fpn_backbone(backbone_name="resnet50", weights=None)
    assert count(ours) == count(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert {type(m) for m in ours.body.modules() if "Norm" in type(m).__name__} == {FrozenBatchNorm2d}
    ours = detection_backbone("resnet50", "none")  # a fresh one: the module's detectors were trained
    ours.load_state_dict(theirs.state_dict())
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        mine, reference = ours.eval()(image), theirs.eval()(image)
    assert list(mine) == list(reference) == ["0", "1", "2", "3", "pool"]
    assert all(torch.equal(mine[name], reference[name]) for name in reference)


def test_returned_layers_drop_the_stages_after_the_last_as_torchvision(one_torch_thread):
    ours = detection_backbone("resnet18", "none", returned_layers=[1, 2, 3])
    theirs = resnet_fpn_backbone(backbone_name="resnet18", weights=None, returned_layers=[1, 2, 3])
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert count(ours) == count(theirs)
    maps = ours(torch.rand(1, 3, 64, 64))
    assert list(maps) == ["0", "1", "2", "pool"]


def test_weights_of_ours_load_and_frozen_batchnorm_keeps_their_statistics(tmp_path, one_torch_thread):
    torch.manual_seed(0)
    classifier = timm.create_model("emca_se_resnet18", num_classes=10)
    with torch.no_grad():  # statistics that are not the initial ones
        for module in classifier.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
    torch.save(classifier.state_dict(), tmp_path / "ours.pt")
    backbone = detection_backbone("resnet18", "emca_se", weights=tmp_path / "ours.pt")
    body = backbone.body
    own = classifier.state_dict()
    assert all(torch.equal(tensor, own[name]) for name, tensor in body.state_dict().items())
    assert backbone.initialisation.kept == [] and set(backbone.initialisation.unused) >= {"fc.weight", "fc.bias"}
    image = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = classifier.eval().forward_intermediates(image, [1, 2, 3, 4], intermediates_only=True)
        got = list(body.train()(image).values())  # frozen: the same in training mode
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, expected, strict=True))


def test_a_torchvision_state_dict_loads_and_the_attention_keeps_its_initialisation(tmp_path, one_torch_thread):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "tv.pth")
    backbone = detection_backbone("resnet18", "emca_se", weights=str(tmp_path / "tv.pth"))
    kept = backbone.initialisation.kept
    assert kept and all(".attn." in name for name in kept)
    with pytest.raises(CheckpointError, match="shape"):
        detection_backbone("resnet50", "none", weights=tmp_path / "tv.pth")  # R-18's 3x3 where R-50 has 1x1


def test_trainable_layers_as_torchvision_with_stage_end_modules_in_their_stage(one_torch_thread):
    backbone = detection_backbone("resnet18", "bam", trainable_layers=2)
    trained = {name.split(".")[0] + ("." + name.split(".")[1] if name.startswith("stage_attn") else "")
               for name, p in backbone.body.named_parameters() if p.requires_grad}
    assert trained == {"layer3", "layer4", "stage_attn.2"}  # BAM sits after stages 1-3 (none after layer4)
    assert all(p.requires_grad for p in backbone.fpn.parameters())
    assert not any(p.requires_grad for p in detection_backbone("resnet18", "none", trainable_layers=0
                                                                ).body.parameters())
    assert all(p.requires_grad for p in detection_backbone("resnet18", "se", trainable_layers=5,
                                                           norm_layer=nn.BatchNorm2d).body.parameters())
    with pytest.raises(ValueError, match=r"trainable_layers must be an integer in \[0, 5\]"):
        detection_backbone("resnet18", trainable_layers=6)


def test_frozen_batchnorm_reaches_the_attention_modules_and_runs_on_one_image(one_torch_thread):
    body = detection_backbone("resnet18", "emca_srm").body
    assert any(isinstance(m, FrozenBatchNorm1d) for m in body.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in body.modules())
    assert all(torch.isfinite(v).all() for v in body.train()(torch.rand(1, 3, 64, 64)).values())
    kept = detection_backbone("resnet18", "emca_srm", norm_layer=nn.BatchNorm2d).body
    assert any(isinstance(m, nn.BatchNorm1d) for m in kept.modules())


@pytest.mark.parametrize("options, message", [
    (dict(returned_layers=[3, 2]), "returned_layers must be increasing"),
    (dict(returned_layers=[0, 1]), "returned_layers must be increasing"),
    (dict(norm_layer=nn.GroupNorm), "norm_layer must be"),
    (dict(num_classes=91), "takes no num_classes"),
])
def test_options_out_of_range_are_one_line(options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        detection_backbone("resnet18", **options)
