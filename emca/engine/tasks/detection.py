"""COCO object detection and instance segmentation (the paper's Tables 6 and 8): torchvision's
FasterRCNN, MaskRCNN or RetinaNet around an EMCA-ResNet, fine-tuned from an ImageNet run's weights.

As torchvision's references/detection: `evaluate` is a plain function of a model and a loader (COCO's
official evaluation of its predictions, gathered over ranks); the task gives the run (emca/engine/
trainer.py) its COCO-format data, the detector, the step's loss (the sum of the detector's own losses,
as torchvision's train_one_epoch sums them) and its lines for the log, checkpoints and results.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from emca.common.checkpoint_file import architecture_fingerprint
from emca.data.coco import DetectionData, build_detection_loaders
from emca.data.sampling import derive_seed
from emca.engine.coco_eval import CocoEvaluator
from emca.engine.distributed import DistributedContext
from emca.engine.metrics import HostCountedSums
from emca.engine.precision import autocast
from emca.engine.task import Task, TaskStep
from emca.models import coverage_name
from emca.models.config import check_model_options, warn_ignored_model_options
from emca.models.detectors import build_detector, detector_architecture
from emca.options import option_value

# The losses each detector returns in training (torchvision's names), summed into the step's loss.
LOSSES = {
    "faster_rcnn": ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"),
    "mask_rcnn": ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"),
    "retinanet": ("classification", "bbox_regression"),
}
# What COCO's evaluation scores for each detector: boxes, and Mask R-CNN's masks too.
IOU_TYPES = {"faster_rcnn": ("bbox",), "mask_rcnn": ("bbox", "segm"), "retinanet": ("bbox",)}


def to_device(images: list[torch.Tensor], targets: list[dict[str, Any]], device: torch.device):
    """A batch's images and the tensors of its targets on `device` (image ids and the like stay)."""
    moved = [{key: item.to(device, non_blocking=True) if isinstance(item, torch.Tensor) else item
              for key, item in target.items()} for target in targets]
    return [image.to(device, non_blocking=True) for image in images], moved


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, ctx: DistributedContext, evaluator: CocoEvaluator,
             amp_dtype: Optional[torch.dtype] = None,
             should_stop: Callable[[], bool] = lambda: False) -> Optional[dict[str, float]]:
    """COCO's AP figures (percent) of `model`'s predictions over the whole validation set, each image
    counted once over the ranks; None when `should_stop()` became true on any rank."""
    model.eval()
    for images, targets in loader:
        # Checked locally: ranks hold different numbers of validation batches, so they agree once, below.
        if should_stop():
            break
        images, _ = to_device(images, [], ctx.device)
        with autocast(ctx.device.type, amp_dtype):
            outputs = model(images)
        evaluator.update([{key: item.float().cpu() for key, item in output.items()} for output in outputs], targets)
    if ctx.any_rank(should_stop()):
        return None
    return evaluator.summarize(ctx)


@dataclass(frozen=True)
class DetectionMetrics:
    """The detector's training losses over some steps: their sum (`loss`) and each part."""

    loss: float
    parts: dict[str, float]
    count: int

    def line(self) -> str:
        return f"loss {self.loss:.4f} (" + " ".join(f"{name} {part:.3f}" for name, part in self.parts.items()) + ")"

    def scalars(self) -> dict[str, float]:
        return {"loss": self.loss, **self.parts}


class LossSums(HostCountedSums):
    """Running sums of the step's loss and its parts, weighted by images; no host synchronisation until read."""

    def __init__(self, names: tuple[str, ...], device: torch.device, start: Optional[list[float]] = None):
        self.names = names
        super().__init__(len(names) + 2, device, start)  # loss x images, each part x images, images

    def update(self, loss: torch.Tensor, parts: dict[str, torch.Tensor], targets: list) -> None:
        values = [loss.detach(), *(parts[name].detach() for name in self.names)]
        self.add(torch.stack(values).double() * len(targets), len(targets))

    def reduce(self, ctx: DistributedContext) -> DetectionMetrics:
        return self._metrics(self.reduce_totals(ctx))

    def local(self) -> DetectionMetrics:
        return self._metrics(self.local_totals())

    def _metrics(self, totals: list[float]) -> DetectionMetrics:
        count = max(totals[-1], 1.0)
        parts = {name: total / count for name, total in zip(self.names, totals[1:-1], strict=True)}
        return DetectionMetrics(totals[0] / count, parts, int(totals[-1]))


class DetectionStep(TaskStep):
    """Images of any size with their boxes (lists, as torchvision's detectors take them): the loss is
    the sum of the detector's losses; micro-batches are slices of the lists."""

    def __init__(self, device: torch.device, seed: int):
        self.device, self.seed = device, seed

    def prepare(self, images: list[torch.Tensor], targets: list[dict[str, Any]], step: int):
        # The detectors draw from the global generator (the RPN's and the box head's sampling of positive
        # and negative anchors / proposals): seeded by the step, a run resumed mid-epoch draws what the
        # uninterrupted one drew, whatever the skipped steps consumed.
        torch.manual_seed(derive_seed(self.seed, step))
        images, targets = to_device(images, targets, self.device)
        return images, targets, targets

    def loss(self, model: nn.Module, images: list[torch.Tensor], targets: list[dict[str, Any]]):
        losses = model(images, targets)
        return sum(losses.values()), {name: part.detach() for name, part in losses.items()}

    def split(self, images: list, targets: list, parts: int) -> list[tuple[list, list]]:
        size = len(images) // parts  # trainer.accumulate divides the rank's batch (check_accumulation)
        return [(images[i:i + size], targets[i:i + size]) for i in range(0, len(images), size)]

    def join(self, outputs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        # Equal micro-batches: the batch's mean of each loss is the mean of theirs.
        return {name: torch.stack([output[name] for output in outputs]).mean() for name in outputs[0]}


class DetectionTask(DetectionStep, Task):
    name = "detection"
    best = "bbox_ap"
    best_label = "box AP"

    def __init__(self, cfg: DictConfig, ctx: DistributedContext):
        self.cfg, self.ctx = cfg, ctx
        _check_options(cfg)
        self.kind = option_value(cfg.detector.name)
        self.data: DetectionData = build_detection_loaders(
            cfg.dataset, cfg.loader, rank=ctx.rank, world_size=ctx.world_size, seed=cfg.trainer.seed,
            masks=self.kind == "mask_rcnn", device=ctx.device)
        self.train_loader, self.val_loader = self.data.train, self.data.val
        check_model_options(cfg.backbone, cfg.attention)
        model = build_detector(cfg.detector, cfg.backbone, cfg.attention, cfg.coverage, self.data.num_classes,
                               weights=cfg.model.init_from)
        self.initialisation = model.initialisation
        self.parameters = sum(p.numel() for p in model.parameters())
        self.trained_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        architecture = detector_architecture(model, cfg.detector, self.data.num_classes)
        self.fingerprint = architecture_fingerprint(model, architecture)
        coverage = architecture["coverage"]  # None without EMCA
        self.coverage_name = coverage_name(coverage["stages"], coverage["blocks"]) if coverage else None
        self.model = model
        super().__init__(ctx.device, derive_seed(cfg.trainer.seed, ctx.rank))

    def sums(self, device: torch.device, start: Optional[list[float]] = None) -> LossSums:
        return LossSums(LOSSES[self.kind], device, start=start)

    def evaluate(self, model: nn.Module, ctx: DistributedContext, epoch: int, *, amp_dtype, should_stop, trackers,
                 trained: bool) -> Optional[dict[str, float]]:
        """COCO's box AP figures (and mask AP for Mask R-CNN), percent, over the validation set."""
        self.val_loader.set_epoch(epoch)
        evaluator = CocoEvaluator(self.data.val_annotations, IOU_TYPES[self.kind])
        return evaluate(model, self.val_loader, ctx, evaluator, amp_dtype=amp_dtype, should_stop=should_stop)

    # ----------------------------------------------------------------------------- what the run says
    def describe(self, steps_per_epoch: int) -> list[str]:
        cfg, ctx, data = self.cfg, self.ctx, self.data
        lines = [self.initialisation.summary() if self.initialisation is not None else
                 "model.init_from=null: the backbone starts from random weights (give an ImageNet run's best.pt)"]
        warn_ignored_model_options(cfg.attention, cfg.coverage)
        coverage = f" coverage={self.coverage_name}" if self.coverage_name else ""
        detector = cfg.detector
        lines.append(
            f"model {self.kind} on {cfg.backbone.name}-FPN attention={cfg.attention.name}{coverage}: "
            f"{self.parameters:,} parameters, {self.trained_parameters:,} trained "
            f"({self.trained_parameters / 1e6:.2f} M, M = 10^6 as MMDetection counts); images resized to "
            f"{detector.min_size} (longer side at most {detector.max_size}), backbone BatchNorm "
            f"{option_value(detector.norm)}, {detector.trainable_layers} stages trained")
        lines.append(
            f"data {cfg.dataset.name} (COCO format, {cfg.dataset.root}): {data.num_train} train / {data.num_val} val "
            f"images, {len(data.categories)} categories, global batch {cfg.dataset.batch_size} over {ctx.world_size} "
            f"process(es), {steps_per_epoch} steps/epoch on {ctx.device}, {data.workers} loader workers")
        return lines

    def recipe(self) -> list[str]:
        return ["horizontal flip" if self.cfg.dataset.hflip else None]

    def epoch_line(self, record: dict[str, Any]) -> str:
        text = f"train loss {record['train_loss']:.4f}"
        for prefix, label in (("val", "val"), ("ema_val", "EMA")):
            if f"{prefix}_bbox_ap" in record:
                text += f"; {label} " + ", ".join(
                    f"{iou} AP {record[f'{prefix}_{iou}_ap']:.2f} AP50 {record[f'{prefix}_{iou}_ap50']:.2f}"
                    for iou in IOU_TYPES[self.kind])
        return text

    def checkpoint_entries(self) -> dict[str, Any]:
        # COCO's categories (labels are their ids), so that a checkpoint names what it detects.
        return {"categories": list(self.data.categories)}

    def results(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "model": {"detector": self.kind, "backbone": cfg.backbone.name, "attention": cfg.attention.name,
                      "coverage": self.coverage_name},
            "dataset": cfg.dataset.name,
            "num_train": self.data.num_train,
            "num_val": self.data.num_val,
            "init_from": self.initialisation.record() if self.initialisation is not None else None,
            "params": self.parameters,
            "params_trained": self.trained_parameters,
            # Indexed by epoch - 1; null where the epoch was not validated (trainer.eval_every > 1).
            "val_bbox_ap_per_epoch": [record.get("val_bbox_ap") for record in history],
        }

    def params(self) -> dict[str, Any]:
        return {"model.coverage": self.coverage_name or "none (not an EMCA model)"}


def _check_options(cfg: DictConfig) -> None:
    """The combinations a detection run cannot train, each refused in one line naming the fix."""
    if cfg.get("detector") is None:
        raise ValueError("task=detection needs a detector: add detector=faster_rcnn (or mask_rcnn, retinanet)")
    if cfg.dataset.format != "coco":
        raise ValueError(f"task=detection reads COCO-format datasets, not dataset.format={cfg.dataset.format} "
                         f"(dataset={cfg.dataset.name}); use dataset=coco or dataset=tiny_imagenet_boxes")
    if cfg.loader.name != "torchvision":
        raise ValueError(f"task=detection reads its images with loader=torchvision, not loader={cfg.loader.name}")
    mixup = cfg.trainer.mixup
    if mixup.mixup_alpha or mixup.cutmix_alpha:
        raise ValueError("trainer.mixup mixes classification labels; set trainer.mixup.mixup_alpha=0 and "
                         "trainer.mixup.cutmix_alpha=0 for task=detection")
    if cfg.trainer.sync_bn:
        raise ValueError("trainer.sync_bn=true would train the statistics task=detection keeps frozen "
                         "(detector.norm); leave trainer.sync_bn=false")
