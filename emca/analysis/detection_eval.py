"""eval.py's work on a task=detection run's checkpoint: COCO's box AP (and mask AP for Mask R-CNN)
of its detector on the validation split, as the run validated it, into one eval.json.

The detector is rebuilt from the checkpoint's configuration (emca.models.loading.restore_detector)
and scored by the task's own pass (emca.engine.tasks.detection.evaluate) with CocoEvaluator, so
that the same images, batches and settings give the run's results.json figures. Only the
validation split is read: its annotation file must hold the categories the run trained on. The
classification measurements (rotations, learned scales, speeds) do not apply to a detector and
are left out; Grad-CAM maps are refused.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from emca.analysis.checkpoint_eval import (
    EvalError,
    data_configs,
    gradcam_option,
    gradcam_requested,
    measured,
    precision,
    write_report,
)
from emca.analysis.speed import describe_device
from emca.data.coco import DetectionData, build_detection_loaders
from emca.engine.coco_eval import CocoEvaluator
from emca.engine.distributed import DistributedContext
from emca.engine.tasks.detection import IOU_TYPES, evaluate
from emca.models import coverage_name
from emca.models.loading import restore_detector
from emca.models.summary import count_parameters

log = logging.getLogger(__name__)

# How the summary names CocoEvaluator's figures (f"{iou}_{figure}") after AP itself, in its order.
FIGURE_LABELS = {"ap50": "AP50", "ap75": "AP75", "ap_s": "APs", "ap_m": "APm", "ap_l": "APl"}
IOU_LABELS = {"bbox": "box AP", "segm": "mask AP"}


def evaluate_detection(cfg: DictConfig, ctx: DistributedContext, state: dict[str, Any], checkpoint: Path,
                       output: Path) -> Optional[dict[str, Any]]:
    """COCO AP of the checkpoint's detector over the validation split (each image once over the
    ranks); writes eval.json and returns its content on rank 0, None on the other ranks."""
    train_cfg = state["config"]
    kind = train_cfg["detector"]["name"]
    if gradcam_requested(cfg.gradcam):
        raise EvalError(f"{checkpoint} is a {kind} detection run's checkpoint and Grad-CAM maps are drawn for "
                        f"classifiers; drop {gradcam_option(cfg.gradcam)}")
    amp, amp_dtype, channels_last = precision(cfg, train_cfg.get("trainer", {}))
    model = restore_detector(checkpoint, state, cfg.ema, EvalError, "drop ema=true")
    model = model.to(ctx.device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    dataset_cfg, loader_cfg = data_configs(train_cfg, cfg)
    data = validation_data(state, dataset_cfg, loader_cfg, ctx, masks=kind == "mask_rcnn",
                           seed=train_cfg["trainer"]["seed"], checkpoint=checkpoint)
    if ctx.is_main:
        log.info(f"evaluating {checkpoint} on {data.num_val} images of {data.val_annotations} with "
                 f"{ctx.world_size} process(es) on {ctx.device}")
    figures = evaluate(model, data.val, ctx, CocoEvaluator(data.val_annotations, IOU_TYPES[kind]), amp_dtype)
    if not ctx.is_main:
        return None
    return write_report({
        "task": "detection",
        "checkpoint": str(checkpoint),
        "checkpoint_epoch": (state.get("progress") or {}).get("epoch"),
        "weights": "ema" if cfg.ema else "trained",
        "model": state["fingerprint"]["architecture"],
        # What the figures depend on besides the weights: the resize and the proposals kept.
        "detector": train_cfg["detector"],
        "dataset": {
            "name": dataset_cfg["name"],
            "root": str(dataset_cfg["root"]),
            "val_split": dataset_cfg["val_split"],
            "annotations": str(data.val_annotations),
            "num_val": data.num_val,
            "num_classes": data.num_classes,
            "categories": len(data.categories),
        },
        "loader": loader_cfg["name"],
        "device": describe_device(ctx.device),
        "world_size": ctx.world_size,
        "amp": amp,
        "channels_last": channels_last,
        "val": figures,
        "params": count_parameters(model),
        "ignored": ignored_options(cfg),
    }, output)


def validation_data(state: dict[str, Any], dataset_cfg: dict[str, Any], loader_cfg: dict[str, Any],
                    ctx: DistributedContext, *, masks: bool, seed: int, checkpoint: Path) -> DetectionData:
    """This rank's share of the validation split (the train split is not read), whose categories must
    be the ones the checkpoint was trained on: a detector's labels are their ids."""
    if loader_cfg["name"] != "torchvision":
        raise EvalError(f"a detection run's images are read with loader=torchvision, not loader={loader_cfg['name']}; "
                        "drop the loader option")
    data = build_detection_loaders(OmegaConf.create(dataset_cfg), OmegaConf.create(loader_cfg), rank=ctx.rank,
                                   world_size=ctx.world_size, seed=seed, masks=masks, device=ctx.device, train=False)
    trained = {category["id"]: category["name"] for category in state["categories"]}
    found = {category["id"]: category["name"] for category in data.categories}
    if found != trained:
        first = min(set(trained) ^ set(found) or {key for key in trained if trained[key] != found[key]})
        raise EvalError(
            f"the categories of {data.val_annotations} differ from the {len(trained)} that {checkpoint} was trained "
            f"on (id {first}: {found.get(first)!r} there, {trained.get(first)!r} in the checkpoint); set dataset.root "
            "(and dataset.val_split) to a COCO folder annotated with the run's categories"
        )
    return data


def ignored_options(cfg: DictConfig) -> list[str]:
    """The classification measurements this evaluation asks for, which a detector has none of."""
    rotations, learned_scales, speeds = measured(cfg)
    asked = {"rotations": len(rotations) > 1, "learned_scales": learned_scales, "speed": speeds}
    return [option for option, on in asked.items() if on]


def _figure(value: Optional[float]) -> str:
    # None (JSON's null) or nan: no ground truth in that area range (coco_eval), nothing to find rather than 0.
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}"


def format_detection_summary(report: dict[str, Any]) -> str:
    """What eval.py prints for a detector: one line per measurement."""
    model, dataset, detector = report["model"], report["dataset"], report["detector"]
    coverage = model.get("coverage")
    weights = ", EMA weights" if report["weights"] == "ema" else ""
    lines = [
        f"checkpoint  {report['checkpoint']} (epoch {report['checkpoint_epoch']}{weights})",
        f"model       {model['detector']} on {model['backbone']}-FPN attention={model['attention']}"
        + (f" coverage={coverage_name(coverage['stages'], coverage['blocks'])}" if coverage else "")
        + f", {dataset['categories']} categories; {report['params'] / 1e6:.3f} M parameters",
        f"data        {dataset['name']} {dataset['val_split']} ({dataset['annotations']}), {dataset['num_val']} images "
        f"resized to {detector['min_size']} (at most {detector['max_size']}); {report['world_size']} process(es), "
        f"amp {report['amp']}",
    ]
    for iou, label in IOU_LABELS.items():
        figures = report["val"]
        if f"{iou}_ap" in figures:
            lines.append(f"{label:<12}{_figure(figures[f'{iou}_ap'])}  " + "  ".join(
                f"{name} {_figure(figures[f'{iou}_{figure}'])}" for figure, name in FIGURE_LABELS.items()))
    if report["ignored"]:
        lines.append(f"ignored     {', '.join(report['ignored'])}: classification measurements, none of a detector's")
    lines.append(f"wrote       {report['output']}")
    return "\n".join(lines)
