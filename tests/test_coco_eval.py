"""emca/engine/coco_eval.py against hand-computed APs and against pycocotools' COCOeval run directly
on rows built here; two gloo ranks give the figures of one process."""

import datetime
import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from emca.engine.coco_eval import CocoEvaluator
from emca.engine.distributed import DistributedContext

ONE_PROCESS = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
CATEGORIES = (1, 3, 18)  # COCO's person, car, dog: ids with gaps, used as labels as they are
IMAGES = {1: (100, 100), 2: (200, 150), 3: (64, 64)}  # id: (width, height)
# (image, category, [x, y, width, height], iscrowd); COCO's areas: small < 32², medium < 96², large.
OBJECTS = [
    (1, 1, [10, 10, 20, 20], 0),  # small
    (1, 3, [40, 30, 50, 60], 0),  # medium
    (2, 1, [20, 20, 120, 100], 0),  # large
    (2, 18, [150, 10, 30, 30], 0),  # small
    (2, 1, [0, 100, 200, 50], 1),  # a crowd: a detection on it is neither a hit nor a false positive
    (3, 3, [5, 5, 40, 40], 0),  # medium
]


@pytest.fixture
def annotations(tmp_path) -> Path:
    return write_annotations(tmp_path)


def write_annotations(folder: Path) -> Path:
    path = folder / "instances.json"
    path.write_text(json.dumps({
        "images": [{"id": i, "width": w, "height": h, "file_name": f"{i}.jpg"} for i, (w, h) in IMAGES.items()],
        "categories": [{"id": c, "name": f"c{c}"} for c in CATEGORIES],
        "annotations": [
            {"id": n, "image_id": i, "category_id": c, "bbox": [x, y, w, h], "area": w * h, "iscrowd": crowd,
             "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]}
            for n, (i, c, (x, y, w, h), crowd) in enumerate(OBJECTS, start=1)  # COCOeval reads id 0 as unmatched
        ],
    }))
    return path


def output(boxes, labels, scores, masks=None) -> dict:
    out = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
           "labels": torch.tensor(labels, dtype=torch.int64), "scores": torch.tensor(scores, dtype=torch.float32)}
    if masks is not None:
        out["masks"] = masks
    return out


def shifted_outputs(shift: float) -> tuple[list[dict], list[dict]]:
    """Every object found once, its box moved right by `shift` x its width, as xyxy."""
    outputs, targets = [], []
    for image_id in IMAGES:
        found = [(c, [x + shift * w, y, x + shift * w + w, y + h]) for i, c, (x, y, w, h), crowd in OBJECTS
                 if i == image_id and not crowd]
        outputs.append(output([box for _, box in found], [c for c, _ in found], [0.9] * len(found)))
        targets.append({"image_id": image_id})
    return outputs, targets


def evaluate(annotations, outputs, targets, iou_types=("bbox",)) -> dict:
    evaluator = CocoEvaluator(annotations, iou_types)
    evaluator.update(outputs, targets)
    return evaluator.summarize(ONE_PROCESS)


def bbox_figures(ap, ap50, ap75, small, medium, large) -> dict:
    return dict(zip(("bbox_ap", "bbox_ap50", "bbox_ap75", "bbox_ap_s", "bbox_ap_m", "bbox_ap_l"),
                    (ap, ap50, ap75, small, medium, large), strict=True))


def assert_same_figures(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == (None if value is None else pytest.approx(value, abs=1e-9)), key


def test_perfect_boxes_score_100_and_a_detection_on_a_crowd_is_ignored(annotations):
    outputs, targets = shifted_outputs(0.0)
    crowd = outputs[1]  # image 2: a detection exactly on its crowd region
    for key, value in output([[0, 100, 200, 150]], [1], [0.95]).items():
        crowd[key] = torch.cat((crowd[key], value))
    assert evaluate(annotations, outputs, targets) == pytest.approx(bbox_figures(100, 100, 100, 100, 100, 100))


def test_boxes_at_iou_two_thirds_are_hits_up_to_iou_0_65(annotations):
    # A box moved right by a fifth of its width: IoU = (4/5) / (6/5) = 2/3, a hit at the thresholds
    # 0.50, 0.55, 0.60, 0.65 and a miss at the six above, so AP 0.50:0.95 = 4/10 of 100.
    figures = evaluate(annotations, *shifted_outputs(0.2))
    assert figures == pytest.approx(bbox_figures(40.0, 100.0, 0.0, 40.0, 40.0, 40.0))


def test_boxes_are_read_as_xyxy_and_written_as_xywh(annotations):
    evaluator = CocoEvaluator(annotations, ("bbox",))
    evaluator.update([output([[40, 30, 90, 90]], [3], [0.5])], [{"image_id": torch.tensor(1)}])
    assert evaluator.images == {1: {"bbox": [{"image_id": 1, "category_id": 3, "bbox": [40.0, 30.0, 50.0, 60.0],
                                              "score": 0.5}]}}
    # The ground truth's own [x, y, w, h] numbers taken for xyxy: a 10 x 30 box inside the 50 x 60 one.
    outputs, targets = shifted_outputs(0.0)
    outputs[0] = output([[10, 10, 20, 20], [40, 30, 50, 60]], [1, 3], [0.9, 0.9])
    # Of the two medium cars (images 1 and 3) only image 3's is found: precision 1 up to recall 1/2, 51 of
    # COCOeval's 101 recall points (the 10 x 30 miss is small, so no false positive among medium objects).
    assert evaluate(annotations, outputs, targets)["bbox_ap_m"] == pytest.approx(100 * 51 / 101)


def test_no_detections_score_0_and_an_area_without_ground_truth_is_none(annotations):
    empty = output([], [], [], masks=torch.zeros(0, 1, 100, 100))
    figures = evaluate(annotations, [empty], [{"image_id": 1}], ("bbox", "segm"))
    # Image 1 holds a small and a medium object and nothing large.
    for iou in ("bbox", "segm"):
        assert {k: v for k, v in figures.items() if k.startswith(iou) and k != f"{iou}_ap_l"} == {
            f"{iou}_{name}": 0.0 for name in ("ap", "ap50", "ap75", "ap_s", "ap_m")}
        assert figures[f"{iou}_ap_l"] is None
    # Only the evaluated images count: image 3's one object found is 100 everywhere it has ground truth.
    outputs, targets = shifted_outputs(0.0)
    assert_same_figures(evaluate(annotations, outputs[2:], targets[2:]),
                        bbox_figures(100.0, 100.0, 100.0, None, 100.0, None))


def random_outputs(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Jittered copies of the objects and boxes anywhere, with labels, scores and rectangular
    masks (probability 0.7 inside, 0.2 outside) at random."""
    generator = torch.Generator().manual_seed(seed)
    outputs, targets = [], []
    for image_id, (width, height) in IMAGES.items():
        boxes = [[x, y, x + w, y + h] for i, _, (x, y, w, h), _ in OBJECTS if i == image_id]
        boxes = torch.tensor(boxes * 2, dtype=torch.float32)
        boxes += torch.randn(boxes.shape, generator=generator) * 6
        anywhere = torch.rand(4, 2, 2, generator=generator) * torch.tensor([width, height])
        boxes = torch.cat((boxes, torch.cat((anywhere.min(1).values, anywhere.max(1).values), dim=1)))
        boxes = torch.maximum(boxes.round(), torch.zeros(())).minimum(torch.tensor([width, height] * 2) - 1)
        boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)  # at least a pixel wide and high
        masks = torch.full((len(boxes), 1, height, width), 0.2)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist(), strict=True):
            mask[0, y0:y1, x0:x1] = 0.7
        labels = torch.tensor(CATEGORIES)[torch.randint(len(CATEGORIES), (len(boxes),), generator=generator)]
        outputs.append({"boxes": boxes, "labels": labels, "scores": torch.rand(len(boxes), generator=generator),
                        "masks": masks})
        targets.append({"image_id": image_id})
    return outputs, targets


def reference_figures(annotations: Path, outputs: list[dict], targets: list[dict]) -> dict:
    """pycocotools' COCOeval on result rows written here, one RLE per mask."""
    rows = {"bbox": [], "segm": []}
    for out, target in zip(outputs, targets, strict=True):
        for (x0, y0, x1, y1), label, score, mask in zip(out["boxes"].tolist(), out["labels"].tolist(),
                                                        out["scores"].tolist(), out["masks"], strict=True):
            common = {"image_id": target["image_id"], "category_id": label, "score": score}
            rows["bbox"].append({**common, "bbox": [x0, y0, x1 - x0, y1 - y0]})
            rle = mask_util.encode(np.asfortranarray((mask[0] > 0.5).numpy().astype(np.uint8)))
            rows["segm"].append({**common, "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    ground_truth = COCO(str(annotations))
    figures = {}
    for iou, iou_rows in rows.items():
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(iou_rows), iouType=iou)
        evaluation.params.imgIds = [target["image_id"] for target in targets]
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
        names = ("ap", "ap50", "ap75", "ap_s", "ap_m", "ap_l")  # stats[0..5]
        stats = zip(names, evaluation.stats[:6], strict=True)
        figures.update({f"{iou}_{name}": 100 * s if s >= 0 else None for name, s in stats})
    return figures


def test_random_detections_score_what_cocoeval_gives_directly(annotations):
    outputs, targets = random_outputs()
    figures = evaluate(annotations, outputs, targets, ("bbox", "segm"))
    assert_same_figures(figures, reference_figures(annotations, outputs, targets))
    assert 0 < figures["bbox_ap"] < 100 and 0 < figures["segm_ap"] < 100  # a case that discriminates


# pycocotools 2.0.11's mask decoding under numpy 2, in annToMask here.
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
def test_perfect_masks_score_100(annotations):
    ground_truth = COCO(str(annotations))
    outputs, targets = shifted_outputs(0.0)
    for out, target in zip(outputs, targets, strict=True):
        objects = ground_truth.loadAnns(ground_truth.getAnnIds(imgIds=target["image_id"], iscrowd=False))
        out["masks"] = torch.stack([torch.from_numpy(ground_truth.annToMask(o)).float()[None] for o in objects])
    figures = evaluate(annotations, outputs, targets, ("bbox", "segm"))
    assert figures == pytest.approx({f"{iou}_{name}": 100.0 for iou in ("bbox", "segm")
                                     for name in ("ap", "ap50", "ap75", "ap_s", "ap_m", "ap_l")})


def test_errors_name_the_fix(annotations):
    with pytest.raises(ValueError, match=r"iou_types=\('keypoints',\): expected"):
        CocoEvaluator(annotations, ("keypoints",))
    evaluator = CocoEvaluator(annotations, ("bbox", "segm"))
    with pytest.raises(ValueError, match="image_id 7 is not an image of .*instances.json: the targets' image_id"):
        evaluator.update([output([], [], [])], [{"image_id": 7}])
    with pytest.raises(ValueError, match="the outputs have no 'masks'"):
        evaluator.update([output([], [], [])], [{"image_id": 1}])
    with pytest.raises(ValueError, match="masks of 64x64 for an image of 100x100"):
        evaluator.update([output([], [], [], masks=torch.zeros(0, 1, 64, 64))], [{"image_id": 1}])
    with pytest.raises(ValueError, match="no image was evaluated"):
        evaluator.summarize(ONE_PROCESS)


def rank_worker(rank: int, folder: Path) -> None:
    torch.set_num_threads(1)
    # The group setup_distributed makes on CPU (gloo; its host group is then the default group).
    dist.init_process_group("gloo", init_method=f"file://{folder / 'rendezvous'}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    ctx = DistributedContext(rank=rank, local_rank=rank, world_size=2, device=torch.device("cpu"))
    outputs, targets = random_outputs()
    mine = [0, 1] if rank == 0 else [1, 2]  # image 2 on both ranks: counted once, rank 0's rows
    evaluator = CocoEvaluator(folder / "instances.json", ("bbox", "segm"))
    if rank == 1:  # rank 1's copy of image 2 differs: were it counted, the figures would change
        outputs[1] = random_outputs(seed=1)[0][1]
    evaluator.update([outputs[i] for i in mine], [targets[i] for i in mine])
    (folder / f"rank{rank}.json").write_text(json.dumps(evaluator.summarize(ctx)))
    dist.destroy_process_group()


def test_two_ranks_give_the_figures_of_one_process(tmp_path):
    annotations = write_annotations(tmp_path)
    mp.spawn(rank_worker, args=(tmp_path,), nprocs=2)
    outputs, targets = random_outputs()
    expected = evaluate(annotations, outputs, targets, ("bbox", "segm"))
    for rank in (0, 1):
        assert_same_figures(json.loads((tmp_path / f"rank{rank}.json").read_text()), expected)
