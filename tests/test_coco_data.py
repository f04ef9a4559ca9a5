"""emca/data/coco.py (COCO-format detection loaders) and scripts/tiny_imagenet_to_coco.py.

Real data: the raw Tiny ImageNet mini download (../shared/data) converted with a few images per class;
the rest on small COCO folders written here, one defect at a time.
"""
import copy
import itertools
import json
import logging
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from emca.data.coco import build_detection_loaders
from emca.data.config import LoaderConfig
from emca.data.errors import DatasetError

PER_CLASS = 4  # tiny: 20 classes x 4 images in each split


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """The machine's cores are shared: in-process loading on one intra-op thread."""


def config(root, **fields):
    """The dataset node's fields the loaders read (COCO 2017's split names unless told)."""
    values = dict(root=str(root), train_split="train2017", val_split="val2017", batch_size=2, workers=0, hflip=False)
    return SimpleNamespace(**{**values, **fields})


def build(root, masks=False, rank=0, world_size=1, seed=0, **fields):
    return build_detection_loaders(config(root, **fields), LoaderConfig(name="torchvision"), rank=rank,
                                   world_size=world_size, seed=seed, masks=masks)


def epoch_batches(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


def by_image(batches) -> dict:
    """image id -> (image, target) over a list of batches."""
    return {target["image_id"]: (image, target) for images, targets in batches
            for image, target in zip(images, targets, strict=True)}


def same_batches(a, b) -> bool:
    def flat(batches):
        return [(t["image_id"], image, t["boxes"], t["labels"]) for images, targets in batches
                for image, t in zip(images, targets, strict=True)]

    return all(x[0] == y[0] and all(torch.equal(p, q) for p, q in zip(x[1:], y[1:], strict=True))
               for x, y in zip(flat(a), flat(b), strict=True)) and len(flat(a)) == len(flat(b))


# --- scripts/tiny_imagenet_to_coco.py on the real raw download ----------------------------------


def convert(repo_root, *args):
    return subprocess.run([sys.executable, str(repo_root / "scripts" / "tiny_imagenet_to_coco.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=repo_root)


@pytest.fixture(scope="module")
def raw(shared_data):
    return shared_data / "tinyimagenet-raw-mini" / "tiny-imagenet-200"


@pytest.fixture(scope="module")
def tiny(raw, repo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-coco") / "coco"
    result = convert(repo_root, raw, out, "--limit-per-class", PER_CLASS)
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    return out


def read(path):
    return json.loads(path.read_text())


def test_conversion_matches_the_source(tiny, raw):
    train, val = (read(tiny / "annotations" / f"instances_{split}.json") for split in ("train", "val"))
    wnids = (raw / "wnids.txt").read_text().split()
    words = dict(line.split("\t") for line in (raw / "words.txt").read_text().splitlines())
    assert train["categories"] == val["categories"]
    assert [(c["id"], c["name"]) for c in train["categories"]] == [(i, words[w]) for i, w in enumerate(wnids, 1)]
    assert train["categories"][0]["name"] == "goldfish, Carassius auratus"
    for content in (train, val):
        assert len(content["images"]) == len(content["annotations"]) == 20 * PER_CLASS
        assert all((image["width"], image["height"]) == (64, 64) for image in content["images"])
    # The first boxes line, converted by hand: inclusive x1 = 63 is the last column, so width 64.
    assert (raw / "train" / wnids[0] / f"{wnids[0]}_boxes.txt").read_text().splitlines()[0].split() == \
        ["n01443537_0.JPEG", "0", "10", "63", "58"]
    image = next(i for i in train["images"] if i["file_name"] == "n01443537_0.JPEG")
    annotation = next(a for a in train["annotations"] if a["image_id"] == image["id"])
    assert (annotation["bbox"], annotation["area"], annotation["category_id"]) == ([0, 10, 64, 49], 3136, 1)
    # Every val box against val_annotations.txt.
    source = {f[0]: (f[1], [int(v) for v in f[2:]]) for f in
              (line.split() for line in (raw / "val" / "val_annotations.txt").read_text().splitlines())}
    names = {i["id"]: i["file_name"] for i in val["images"]}
    for a in val["annotations"]:
        wnid, (x0, y0, x1, y1) = source[names[a["image_id"]]]
        assert (wnids[a["category_id"] - 1], a["bbox"]) == (wnid, [x0, y0, x1 - x0 + 1, y1 - y0 + 1])
    links = sorted((tiny / "val").iterdir())
    assert len(links) == 20 * PER_CLASS
    assert all(p.is_symlink() and p.resolve() == (raw / "val" / "images" / p.name).resolve() for p in links)


def fake_raw(root, boxes_line="x.JPEG\t1\t2\t10\t12"):
    """A raw download of one class and one image per split, with the given train boxes line."""
    wnid = "n0001"
    (root / "train" / wnid / "images").mkdir(parents=True)
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text(f"{wnid}\n")
    (root / "words.txt").write_text(f"{wnid}\tthing\n")
    for path in (root / "train" / wnid / "images" / "x.JPEG", root / "val" / "images" / "v.JPEG"):
        Image.new("RGB", (16, 16)).save(path, format="JPEG")
    (root / "train" / wnid / f"{wnid}_boxes.txt").write_text(boxes_line + "\n")
    (root / "val" / "val_annotations.txt").write_text(f"v.JPEG\t{wnid}\t0\t0\t15\t15\n")
    return root


def test_converter_errors(repo_root, tmp_path):
    good = fake_raw(tmp_path / "good")
    ok = convert(repo_root, good, tmp_path / "out")
    assert ok.returncode == 0, ok.stderr
    assert read(tmp_path / "out" / "annotations" / "instances_train.json")["annotations"][0]["bbox"] == [1, 2, 10, 11]
    again = convert(repo_root, good, tmp_path / "out")
    assert again.returncode != 0 and "not an empty folder" in again.stderr
    missing = convert(repo_root, tmp_path / "nowhere", tmp_path / "out2")
    assert missing.returncode != 0 and "not a folder" in missing.stderr
    bad = fake_raw(tmp_path / "bad", boxes_line="x.JPEG\t1\t2\t10")
    malformed = convert(repo_root, bad, tmp_path / "out3")
    assert malformed.returncode != 0 and "n0001_boxes.txt:1" in malformed.stderr and "x0 y0 x1 y1" in malformed.stderr
    assert len(malformed.stderr.strip().splitlines()) == 1 and not (tmp_path / "out3").exists()


# --- the loaders on the converted Tiny ImageNet ----------------------------------------------------


def tiny_build(tiny, **fields):
    return build(tiny, **{"train_split": "train", "val_split": "val", "batch_size": 8, "hflip": True, **fields})


def test_tiny_batches(tiny):
    data = tiny_build(tiny)
    assert (data.num_classes, data.num_train, data.num_val, len(data.train)) == (21, 80, 80, 10)
    assert data.val_annotations == tiny / "annotations" / "instances_val.json" and data.workers == 0
    batches = epoch_batches(data.train, 0)
    assert len(batches) == 10
    for images, targets in batches:
        assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 8
        for image, target in zip(images, targets, strict=True):
            assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
            boxes, labels = target["boxes"], target["labels"]
            assert boxes.dtype == torch.float32 and labels.dtype == torch.int64 and boxes.shape == (1, 4)
            assert (boxes >= 0).all() and (boxes <= 64).all() and (boxes[:, 2:] > boxes[:, :2]).all()
            assert 1 <= labels.min() and labels.max() <= 20 and isinstance(target["image_id"], int)


def test_flip_moves_boxes_with_the_image(tiny):
    flipped, plain = (by_image(epoch_batches(tiny_build(tiny, hflip=hflip).train, 0)) for hflip in (True, False))
    assert flipped.keys() == plain.keys()
    kinds = set()
    for image_id, (image, target) in flipped.items():
        original, source = plain[image_id]
        x0, y0, x1, y1 = source["boxes"][0].tolist()
        if torch.equal(image, original):
            assert torch.equal(target["boxes"], source["boxes"])
            kinds.add("kept")
        else:
            assert torch.equal(image, original.flip(-1))
            assert target["boxes"][0].tolist() == [64 - x1, y0, 64 - x0, y1]
            kinds.add("flipped")
    assert kinds == {"kept", "flipped"}


def test_an_epoch_depends_only_on_seed_and_epoch(tiny):
    walked = tiny_build(tiny)
    epoch_batches(walked.train, 0)
    third = epoch_batches(walked.train, 3)
    fresh = tiny_build(tiny).train
    assert same_batches(third, epoch_batches(fresh, 3))
    assert not same_batches(third, epoch_batches(fresh, 4))
    # The trainer resumes mid-epoch by skipping batches: the rest are the same batches.
    fresh.set_epoch(3)
    assert same_batches(third[4:], list(itertools.islice(fresh, 4, None)))
    assert not same_batches(third, epoch_batches(tiny_build(tiny, seed=1).train, 3))
    # Loader workers decode in other processes; the batches stay the same.
    assert same_batches(third, epoch_batches(tiny_build(tiny, workers=2).train, 3))


def test_ranks_share_out_train_and_val(tiny):
    ranks = [tiny_build(tiny, rank=rank, world_size=2) for rank in (0, 1)]
    assert len(ranks[0].train) == len(ranks[1].train) == 10
    shards = [by_image(epoch_batches(data.train, 1)) for data in ranks]
    assert len(shards[0]) == len(shards[1]) == 40 and not shards[0].keys() & shards[1].keys()
    seen = [image_id for data in ranks for images, targets in epoch_batches(data.val, 1)
            for image_id in (target["image_id"] for target in targets)]
    assert sorted(seen) == sorted(i["id"] for i in read(tiny / "annotations" / "instances_val.json")["images"])


# --- small synthetic COCO folders --------------------------------------------------------------


def polygon(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


# Image 1 has a box, an overhanging box and a crowd region; 2 (a greyscale JPEG) one box; 3 nothing;
# 4 only a crowd. Category ids 1 and 3: labels are the ids themselves.
COCO = {
    "images": [
        {"id": 1, "file_name": "a.png", "width": 20, "height": 16},
        {"id": 2, "file_name": "b.jpg", "width": 24, "height": 20},
        {"id": 3, "file_name": "c.png", "width": 16, "height": 16},
        {"id": 4, "file_name": "d.png", "width": 16, "height": 12},
    ],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 8], "area": 80, "iscrowd": 0,
         "segmentation": polygon(2, 3, 10, 8)},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [-0.5, 1, 6, 5], "area": 30, "iscrowd": 0,
         "segmentation": polygon(0, 1, 5.5, 5)},
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4], "area": 10, "iscrowd": 1,
         "segmentation": {"counts": [5, 10, 305], "size": [16, 20]}},
        {"id": 4, "image_id": 2, "category_id": 3, "bbox": [4.5, 2.25, 19.5, 17.75], "area": 346, "iscrowd": 0,
         "segmentation": polygon(4.5, 2.25, 19.5, 17.75)},
        {"id": 5, "image_id": 4, "category_id": 3, "bbox": [1, 1, 8, 8], "area": 64, "iscrowd": 1,
         "segmentation": polygon(1, 1, 8, 8)},
    ],
    "categories": [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}],
}


@pytest.fixture
def coco(tmp_path):
    """write(content=COCO) -> a COCO folder: COCO's images in train2017/ and val2017/, `content` the
    annotation file of both."""

    def write(content=COCO):
        root = tmp_path / "coco"
        (root / "annotations").mkdir(parents=True)
        rng = np.random.default_rng(0)
        for split in ("train2017", "val2017"):
            (root / split).mkdir()
            for entry in COCO["images"]:
                pixels = rng.integers(0, 255, (entry["height"], entry["width"], 3), dtype=np.uint8)
                image = Image.fromarray(pixels)
                image = image.convert("L") if entry["file_name"].endswith(".jpg") else image
                image.save(root / split / entry["file_name"])
            (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))
        return root

    return write


def test_train_leaves_out_crowds_and_empty_images_val_keeps_all(coco):
    data = build(coco())
    assert (data.num_classes, data.num_train, data.num_val, len(data.train), len(data.val)) == (4, 2, 4, 1, 2)
    assert data.categories == COCO["categories"]
    train = by_image(epoch_batches(data.train, 0))
    assert sorted(train) == [1, 2]
    image, target = train[1]
    assert image.shape == (3, 16, 20) and target["labels"].tolist() == [1, 3]  # no crowd
    assert target["boxes"].tolist() == [[2, 3, 12, 11], [0, 1, 5.5, 6]]  # the overhang clamped away
    grey, target = train[2]
    assert grey.shape == (3, 20, 24) and torch.equal(grey[0], grey[1])
    assert target["boxes"].tolist() == [[4.5, 2.25, 24, 20]]
    val = by_image(epoch_batches(data.val, 0))
    assert sorted(val) == [1, 2, 3, 4]
    assert val[1][1]["labels"].tolist() == [1, 3, 1] and val[1][1]["boxes"][1].tolist() == [-0.5, 1, 5.5, 6]
    empty = val[3][1]
    assert empty["boxes"].shape == (0, 4) and empty["boxes"].dtype == torch.float32
    assert empty["labels"].shape == (0,) and empty["labels"].dtype == torch.int64
    assert val[4][1]["labels"].tolist() == [3]  # the crowd region, as the file gives it


# pycocotools 2.0.11's mask decoding calls numpy 2 the old way (np.array(copy=False) on its own type).
def test_masks(coco):
    data = build(coco(), masks=True)
    image, target = by_image(epoch_batches(data.train, 0))[1]
    masks = target["masks"]
    assert masks.shape == (2, 16, 20) and masks.dtype == torch.uint8 and set(masks.unique().tolist()) <= {0, 1}
    rows, columns = masks[0].nonzero(as_tuple=True)
    assert (rows.min(), rows.max(), columns.min(), columns.max()) == (3, 10, 2, 11)  # the 10x8 polygon
    val = by_image(epoch_batches(data.val, 0))
    assert val[3][1]["masks"].shape == (0, 16, 16) and val[3][1]["masks"].dtype == torch.uint8
    assert val[1][1]["masks"].shape == (3, 16, 20) and val[1][1]["masks"][2].sum() == 10  # the crowd's RLE


def test_zero_size_box_left_out_of_training(coco, caplog):
    content = copy.deepcopy(COCO)
    content["annotations"][3]["bbox"] = [4, 2, 6, 0]  # image 2's only box, as COCO's own annotation 918
    with caplog.at_level(logging.WARNING, logger="emca.data.coco"):
        data = build(coco(content), batch_size=1)
    assert data.num_train == 1 and data.num_val == 4
    assert "1 non-crowd boxes have no area" in caplog.text and "instances_train2017.json" in caplog.text


def changed(**entries):
    """COCO with some entries changed: annotation_1={...} updates the fields of annotation 1 (image_3:
    image 3, category_1: category 1)."""
    content = copy.deepcopy(COCO)
    lists = {"annotation": "annotations", "image": "images", "category": "categories"}
    for key, fields in entries.items():
        kind, number = key.split("_")
        next(e for e in content[lists[kind]] if e["id"] == int(number)).update(fields)
    return content


def remove(path):
    shutil.rmtree(path) if path.is_dir() else path.unlink()


BAD = {
    "missing root": (lambda root: remove(root), ["does not exist", "dataset.root", "instances_<split>.json"]),
    "raw tiny imagenet": (lambda root: (root / "wnids.txt").write_text("n0001\n"), ["tiny_imagenet_to_coco.py"]),
    "missing split folder": (lambda root: remove(root / "val2017"), ["no val2017/ image folder", "dataset.val_split"]),
    "missing annotations": (lambda root: remove(root / "annotations" / "instances_train2017.json"),
                            ["instances_train2017.json is missing", "dataset.root"]),
    "not json": (lambda root: (root / "annotations" / "instances_val2017.json").write_text("{"),
                 ["instances_val2017.json is not valid JSON", "write or download it again"]),
    "no annotations list": ({"images": COCO["images"], "categories": COCO["categories"]},
                            ["instances_train2017.json has no 'annotations' list", "annotations and categories"]),
    "image missing on disk": (lambda root: remove(root / "train2017" / "c.png"),
                              ["train2017/c.png, listed in", "is missing", "put the split's images in"]),
    "box outside": (changed(annotation_1={"bbox": [15, 3, 10, 8]}),
                    ["annotation 1 in", "[15, 3, 10, 8]", "a.png (20x16)", "outside the image", "fix the box"]),
    "negative width": (changed(annotation_4={"bbox": [4, 2, -3, 5]}),
                       ["annotation 4 in", "b.jpg", "negative width", "fix or remove it"]),
    "unknown category": (changed(annotation_1={"category_id": 7}),
                         ["annotation 1 in", "category_id 7", "(1, 3)", "add the category"]),
    "unknown image": (changed(annotation_1={"image_id": 9}), ["annotation 1 in", "image_id 9", "add the image"]),
    "malformed annotation": (changed(annotation_1={"bbox": [1, 2, 3]}), ["annotation 1 in", "bbox", "fix the entry"]),
    "background category": (changed(category_1={"id": 0}), ["category 'cat'", "ids start at 1", "renumber"]),
    "no images": ({"images": [], "annotations": [], "categories": COCO["categories"]},
                  ["instances_train2017.json lists no images", "empty split"]),
    "nothing to train on": (changed(**{f"annotation_{i}": {"iscrowd": 1} for i in (1, 2, 4)}),
                            ["instances_train2017.json", "nothing to train on", "dataset.train_split"]),
    "val categories differ": (lambda root: (root / "annotations" / "instances_val2017.json").write_text(
        json.dumps({**COCO, "categories": [{"id": 1, "name": "cat"}, {"id": 3, "name": "wolf"}]})),
        ["instances_val2017.json differ", "same category ids and names"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_naming_file_and_fix(coco, case):
    defect, words = BAD[case]
    root = coco(defect) if isinstance(defect, dict) else coco()
    if callable(defect):
        defect(root)
    with pytest.raises(DatasetError) as caught:
        build(root)
    message = str(caught.value)
    assert "\n" not in message and all(word in message for word in words), message


def test_masks_need_segmentations(coco):
    content = copy.deepcopy(COCO)
    del content["annotations"][1]["segmentation"]
    root = coco(content)
    build(root)  # boxes alone do without
    with pytest.raises(DatasetError, match="annotation 2 in .*instances_train2017.json: no segmentation"):
        build(root, masks=True)


def test_fewer_images_than_a_global_batch(coco):
    with pytest.raises(DatasetError, match="2 images with a usable box, fewer than one global batch; lower "
                                           "dataset.batch_size=4"):
        build(coco(), batch_size=4)


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_found_mid_run(coco, workers):
    root = coco()
    jpeg = root / "train2017" / "b.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:200])  # truncated: its header still opens
    data = build(root, workers=workers)
    with pytest.raises(DatasetError) as caught:
        epoch_batches(data.train, 0)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"corrupt image {jpeg}") and "remove or replace it" in message


def test_image_size_differs_from_the_file(coco):
    data = build(coco(changed(image_3={"width": 17})))
    with pytest.raises(DatasetError, match=r"c.png is 16x16 but .*instances_val2017.json gives 17x16; fix its width"):
        epoch_batches(data.val, 0)


def test_train_false_reads_the_val_split_alone(coco):
    root = coco()
    full = by_image(epoch_batches(build(root).val, 0))
    remove(root / "train2017")  # what a user evaluating a checkpoint may lack
    remove(root / "annotations" / "instances_train2017.json")
    data = build_detection_loaders(config(root, batch_size=4), LoaderConfig(name="torchvision"), rank=0,
                                   world_size=1, seed=0, masks=False, train=False)
    assert data.train is None and (data.num_train, data.num_val, data.num_classes) == (0, 4, 4)
    assert data.categories == COCO["categories"]
    assert data.val_annotations == root / "annotations" / "instances_val2017.json"
    val = by_image(epoch_batches(data.val, 0))
    assert val.keys() == full.keys() and all(torch.equal(val[key][0], full[key][0]) for key in val)
    with pytest.raises(DatasetError, match="no train2017/ image folder"):
        build(root)  # a training run still needs the train split
