"""COCO's box and mask AP (pycocotools' COCOeval) for task=detection, over every rank's images.

Each rank turns its model's outputs into COCO result rows (update) and keeps them; summarize
gathers every rank's rows and rank 0 runs COCOeval once over all of them. Per-rank APs could not be
averaged instead: AP ranks all detections of a category by score across every image before it
integrates precision over recall, so it is not a sum over images and a mean of per-rank APs is not
the AP of the whole set.

- Labels are COCO category ids as they are (torchvision's references' convention: num_classes=91
  for COCO, the unused ids included, no remapping); a label that is no category of the ground
  truth is never evaluated.
- Figures are percent (COCOeval's stats[0..5] x 100, as papers print AP): f"{iou}_ap" (AP at IoU
  0.50:0.95), _ap50, _ap75, and _ap_s / _ap_m / _ap_l for small / medium / large objects.
- A figure is None where its area range has no ground truth among the evaluated images (COCOeval's
  -1): there is nothing to find, so the figure is missing, not 0 (None, not nan: results.json stays
  JSON, and a resumed run's records compare equal to the uninterrupted run's). Where there is ground truth and
  no detection, it is 0.0 (on COCO's val set every area range has ground truth, so a model that
  detects nothing scores 0.0 everywhere).
- Only the images given to update are evaluated: the ground truth of an image no rank reached
  (a run stopped mid-validation) counts neither as found nor as missed. An image given twice, on
  one rank or two (a sampler that pads its last batch with repeats), counts once, with the rows it
  was first given (lowest rank first).

Rank 0's COCOeval takes about a minute per IoU type on COCO's 5000 val images while the other ranks
wait in the broadcast of its figures: trainer.dist_timeout_s must allow for it.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from emca.engine.distributed import DistributedContext

IOU_TYPES = ("bbox", "segm")
# The names of COCOeval's stats[0..5], in its order.
FIGURES = ("ap", "ap50", "ap75", "ap_s", "ap_m", "ap_l")


def quiet() -> contextlib.AbstractContextManager:
    """pycocotools reports every step on stdout; the run's log says what matters."""
    return contextlib.redirect_stdout(io.StringIO())


def box_rows(image_id: int, output: dict) -> list[dict]:
    """COCO result rows of one image's boxes: xyxy in pixels -> [x, y, width, height]."""
    boxes = output["boxes"].detach().float().cpu()
    xywh = torch.cat((boxes[:, :2], boxes[:, 2:] - boxes[:, :2]), dim=1)
    columns = zip(xywh.tolist(), output["labels"].tolist(), output["scores"].tolist(), strict=True)
    return [{"image_id": image_id, "category_id": label, "bbox": box, "score": score} for box, label, score in columns]


def mask_rows(image_id: int, output: dict) -> list[dict]:
    """COCO result rows of one image's masks: probabilities > 0.5, run-length encoded."""
    masks = output["masks"].detach().cpu()[:, 0] > 0.5
    if masks.shape[0] == 0:
        return []
    # pycocotools encodes a height x width x N uint8 array laid out column-major.
    rles = mask_util.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))
    columns = zip(rles, output["labels"].tolist(), output["scores"].tolist(), strict=True)
    # counts as str, not bytes: the rows are pickled to rank 0 and may be written as json.
    return [{"image_id": image_id, "category_id": label, "score": score,
             "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}}
            for rle, label, score in columns]


ROWS: dict[str, Callable[[int, dict], list[dict]]] = {"bbox": box_rows, "segm": mask_rows}


def empty_results(ground_truth: COCO) -> COCO:
    """What COCO.loadRes would give for no detections (it reads the first row, so it cannot take none)."""
    results = COCO()
    results.dataset = {"images": ground_truth.dataset["images"], "annotations": [],
                       "categories": ground_truth.dataset["categories"]}
    results.createIndex()
    return results


def coco_figures(ground_truth: COCO, rows: list[dict], image_ids: list[int], iou_type: str) -> list[Optional[float]]:
    """COCOeval's stats[0..5] over `image_ids` in percent, None for its -1 (no ground truth)."""
    with quiet():
        # loadRes writes id, area and iscrowd into the rows it is given: give it copies.
        results = ground_truth.loadRes([dict(row) for row in rows]) if rows else empty_results(ground_truth)
        evaluation = COCOeval(ground_truth, results, iouType=iou_type)
        evaluation.params.imgIds = image_ids
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return [None if stat < 0 else 100.0 * float(stat) for stat in evaluation.stats[: len(FIGURES)]]


class CocoEvaluator:
    """One validation pass's COCO AP: update with each batch, then summarize on every rank."""

    def __init__(self, annotations: Path | str, iou_types: Sequence[str]):
        """`annotations`: the COCO instances json of the images evaluated; `iou_types`: ("bbox",)
        for box detectors, ("bbox", "segm") for Mask R-CNN."""
        if not iou_types or any(iou_type not in IOU_TYPES for iou_type in iou_types):
            raise ValueError(f"CocoEvaluator iou_types={tuple(iou_types)!r}: expected ('bbox',) or ('bbox', 'segm')")
        self.annotations = Path(annotations)
        self.iou_types = tuple(iou_types)
        with quiet():
            self.ground_truth = COCO(str(self.annotations))
        # image id -> iou type -> that image's result rows; an image given twice keeps its first rows.
        self.images: dict[int, dict[str, list[dict]]] = {}

    def update(self, outputs: list[dict], targets: list[dict]) -> None:
        """Keep the result rows of a batch: a detection model's eval outputs and the batch's targets."""
        if len(outputs) != len(targets):
            raise ValueError(f"CocoEvaluator.update: {len(outputs)} outputs for {len(targets)} targets "
                             "(pass the model's outputs of the batch the targets came with)")
        for output, target in zip(outputs, targets, strict=True):
            image_id = int(target["image_id"])
            if image_id not in self.images:
                self.check(image_id, output)
                self.images[image_id] = {iou_type: ROWS[iou_type](image_id, output) for iou_type in self.iou_types}

    def check(self, image_id: int, output: dict) -> None:
        """Refuse what COCOeval would get wrong silently or fail on with a bare assertion."""
        image = self.ground_truth.imgs.get(image_id)
        if image is None:
            raise ValueError(f"image_id {image_id} is not an image of {self.annotations}: "
                             "the targets' image_id must be the COCO image id")
        if "segm" not in self.iou_types:
            return
        if "masks" not in output:
            raise ValueError("CocoEvaluator iou_types includes 'segm' but the outputs have no 'masks' "
                             "(evaluate a Mask R-CNN, or use iou_types=('bbox',))")
        size = tuple(output["masks"].shape[-2:])
        if size != (image["height"], image["width"]):
            raise ValueError(f"image {image_id}: masks of {size[0]}x{size[1]} for an image of "
                             f"{image['height']}x{image['width']} (the masks must be pasted into the original image)")

    def summarize(self, ctx: DistributedContext) -> dict[str, float]:
        """The figures over every rank's images, on every rank (a collective: every rank calls it).

        Keys f"{iou}_{figure}" for each iou type and each of FIGURES, in percent.
        """
        merged: dict[int, dict[str, list[dict]]] = {}
        for rank_images in ctx.all_gather_object(self.images):
            for image_id, rows in rank_images.items():
                merged.setdefault(image_id, rows)  # an image on two ranks counts once
        if not merged:
            raise ValueError("CocoEvaluator.summarize: no image was evaluated (call update with the outputs first)")
        figures = None
        if ctx.is_main:
            image_ids = sorted(merged)
            figures = {}
            for iou_type in self.iou_types:
                rows = [row for image_id in image_ids for row in merged[image_id][iou_type]]
                values = coco_figures(self.ground_truth, rows, image_ids, iou_type)
                figures.update({f"{iou_type}_{name}": value for name, value in zip(FIGURES, values, strict=True)})
        return ctx.broadcast_from_main(figures)
