"""Bad inputs: each one stops build_loaders with a one-line DatasetError naming problem and fix."""
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from emca.data import DatasetConfig, DatasetError, LoaderConfig, build_loaders, builder, folder

LOADERS = ["dali", "torchvision"]


@pytest.fixture(autouse=True)
def _private_cache(emca_cache):
    """Each test starts with an empty image-check cache."""


def build(root, loader="torchvision", **overrides):
    fields = dict(name="imagefolder", root=str(root), image_size=32, val_resize=32, batch_size=2, workers=1)
    fields.update(overrides)
    return build_loaders(OmegaConf.structured(DatasetConfig(**fields)), OmegaConf.structured(LoaderConfig(name=loader)))


def error_of(root, **kwargs) -> str:
    with pytest.raises(DatasetError) as caught:
        build(root, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.fixture
def tree(image_tree):
    return image_tree({"train": {"a": 3, "b": 3}, "val": {"a": 2, "b": 2}})


def test_missing_root(tmp_path):
    assert "does not exist" in error_of(tmp_path / "nowhere") and "dataset.root" in error_of(tmp_path / "nowhere")


def test_root_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    assert "is not a folder" in error_of(tmp_path / "file")


@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_split_folder(tree, split):
    shutil.rmtree(tree / split)
    assert f"has no {split}/ folder" in error_of(tree)


def test_split_without_class_folders(tree):
    shutil.rmtree(tree / "train")
    (tree / "train").mkdir()
    (tree / "train" / "loose.JPEG").write_bytes(b"")
    assert "has no class folders" in error_of(tree)


def test_empty_class_folder(tree):
    (tree / "train" / "c").mkdir()
    message = error_of(tree)
    assert str(tree / "train" / "c") in message and "has no images" in message


def test_class_folder_with_only_non_images(tree):
    (tree / "train" / "c").mkdir()
    (tree / "train" / "c" / "notes.txt").write_text("not an image")
    assert "has no images" in error_of(tree)


@pytest.mark.parametrize("loader", LOADERS)
def test_non_image_files_are_ignored(tree, loader):
    (tree / "train" / "a" / "README.txt").write_text("ignored like ImageFolder does")
    (tree / "val" / "b" / "labels.json").write_text("{}")
    bundle = build(tree, loader)
    assert (bundle.num_train, bundle.num_val) == (6, 4)
    bundle.val.set_epoch(0)
    assert sum(len(labels) for _, labels in bundle.val) == 4


def test_num_classes_mismatch(tree):
    message = error_of(tree, num_classes=5)
    assert "num_classes=5" in message and "2 class folders" in message
    assert build(tree, num_classes=2).num_classes == 2


def test_val_class_missing_from_train(tree):
    shutil.copytree(tree / "val" / "b", tree / "val" / "zebra")
    assert "zebra" in error_of(tree)


def test_val_classes_may_be_a_subset_and_map_by_name(image_tree):
    root = image_tree({"train": {"a": 2, "b": 2, "c": 2}, "val": {"c": 2}})
    bundle = build(root)
    bundle.val.set_epoch(0)
    assert torch.cat([labels for _, labels in bundle.val]).tolist() == [2, 2]


def test_raw_tiny_imagenet_layout_names_the_preparation_script(shared_data):
    raw = shared_data / "tinyimagenet-raw-mini" / "tiny-imagenet-200"
    message = error_of(raw, name="tiny_imagenet")
    assert f"python scripts/prepare_tiny_imagenet.py {raw} OUT" in message


def test_raw_tiny_imagenet_layout_without_shared_data(tree):
    (tree / "wnids.txt").write_text("a\nb\n")
    assert "scripts/prepare_tiny_imagenet.py" in error_of(tree)


def test_root_that_is_a_broken_symlink(tmp_path):
    os.symlink(tmp_path / "unmounted", tmp_path / "root")
    assert error_of(tmp_path / "root").startswith(
        f"dataset root {tmp_path / 'root'} is a broken symlink to {tmp_path / 'unmounted'}; set dataset.root"
    )


def test_split_folder_that_is_a_broken_symlink(tree, tmp_path):
    shutil.rmtree(tree / "val")
    os.symlink(tmp_path / "unmounted", tree / "val")
    assert error_of(tree).startswith(
        f"{tree} has no val/ folder (val/ is a broken symlink to {tmp_path / 'unmounted'}); "
    )


# Folder problems stop the run in both on_bad_image modes: skipping a folder would drop a class.
@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("on_bad_image", ["error", "skip"])
@pytest.mark.parametrize("target", ["nowhere", "self"])
def test_class_folder_link_that_leads_nowhere(tree, tmp_path, target, loader, on_bad_image):
    link = tree / "train" / "c"
    os.symlink(tmp_path / "nowhere" if target == "nowhere" else "c", link)
    problem = f"is a broken symlink to {tmp_path / 'nowhere'}" if target == "nowhere" else "is a symlink loop"
    assert (
        error_of(tree, loader=loader, on_bad_image=on_bad_image)
        == f"{link} {problem}; point the link at a class folder or remove it"
    )


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("on_bad_image", ["error", "skip"])
def test_class_folder_name_that_is_not_utf8(tree, loader, on_bad_image):
    os.rename(tree / "train" / "b", os.fsencode(tree / "train") + b"/caf\xe9")
    shown = f"{tree / 'train'}/caf\\xe9"  # the undecodable byte, shown as \xe9
    expected = f"class folder {shown}: its name is not valid UTF-8; rename it (e.g. convmv -f latin1 -t utf8)"
    assert error_of(tree, loader=loader, on_bad_image=on_bad_image) == expected


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("on_bad_image", ["error", "skip"])
@pytest.mark.parametrize("target", [".", "../.."])
def test_folder_link_loop_inside_a_class_folder(tree, target, loader, on_bad_image):
    # "." points at its own folder; "../.." at the split, whose class folder a/ then comes round again.
    (tree / "train" / "a" / "sub").mkdir()
    os.symlink(target, tree / "train" / "a" / "sub" / "back")
    looped, real = (
        (tree / "train/a/sub/back", tree / "train/a/sub")
        if target == "."
        else (tree / "train/a/sub/back/a", tree / "train/a")
    )
    message = error_of(tree, loader=loader, on_bad_image=on_bad_image)
    assert message == f"symlink loop: {looped} leads back to {real}; remove the link or point it elsewhere"


def write_corrupt(path, kind):
    if kind == "garbage":
        path.write_bytes(b"this is not a JPEG at all" * 10)
    elif kind == "truncated":
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"")


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty"])
def test_corrupt_image_error_names_the_file(tree, kind):
    bad = tree / "train" / "b" / "broken.JPEG"
    write_corrupt(bad, kind)
    message = error_of(tree)
    assert str(bad) in message and "on_bad_image=skip" in message


@pytest.mark.parametrize("loader", LOADERS)
def test_skip_drops_corrupt_images_and_reports_the_count(tree, loader, caplog):
    write_corrupt(tree / "train" / "a" / "broken.JPEG", "truncated")
    write_corrupt(tree / "train" / "b" / "broken.JPEG", "garbage")
    write_corrupt(tree / "val" / "a" / "broken.JPEG", "empty")
    with caplog.at_level(logging.WARNING, logger="emca.data.folder"):
        bundle = build(tree, loader, on_bad_image="skip")
    assert (bundle.num_train, bundle.num_val) == (6, 4)
    assert any("skipped 2 image(s)" in record.message and "(2 corrupt)" in record.message for record in caplog.records)
    assert any("skipped 1 image(s)" in record.message and "(1 corrupt)" in record.message for record in caplog.records)
    for split in (bundle.train, bundle.val):
        split.set_epoch(0)
        assert all(images.shape[1:] == (3, 32, 32) for images, _ in split)


def put_bad_file(kind, folder, monkeypatch):
    """One file of `kind` in `folder`; returns the message that must name it, its problem and the fix."""
    path = folder / f"{kind}.JPEG"
    relink = "point the link at an existing image or remove it"
    if kind == "broken-symlink":
        os.symlink(folder / "gone.JPEG", path)
        return f"missing image {path}: a broken symlink to {folder / 'gone.JPEG'}; {relink}"
    if kind == "symlink-loop":
        os.symlink(path.name, path)
        return f"missing image {path}: a symlink loop; {relink}"
    if kind == "pipe":  # opening it would wait forever for a writer
        os.mkfifo(path)
        return f"unsupported image {path}: not a regular file (a pipe, socket or device); remove it"
    if kind == "empty":
        path.write_bytes(b"")
        return f"corrupt image {path}: empty file (0 bytes); remove it or copy it again"
    if kind == "latin-1-name":
        shutil.copy(folder / "b_0.JPEG", os.fsencode(folder) + b"/caf\xe9.JPEG")
        # Shown with the undecodable byte as \xe9, which any terminal or log file can take.
        return (f"unsupported image {folder}/caf\\xe9.JPEG: its name is not valid UTF-8, which DALI cannot open; "
                "rename it (e.g. convmv -f latin1 -t utf8)")
    # "vanished": listed, then gone before screening reads it.
    shutil.copy(folder / "b_0.JPEG", path)
    listed = builder.list_split

    def list_then_delete(*args):
        images = listed(*args)
        path.unlink(missing_ok=True)
        return images

    monkeypatch.setattr(builder, "list_split", list_then_delete)
    return (f"missing image {path}: no such file (moved or deleted after its folder was listed); "
            "restore it, or start again so that the folder is listed afresh")


BAD_FILES = ["broken-symlink", "symlink-loop", "pipe", "empty", "latin-1-name", "vanished"]


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_file_stops_the_run_in_one_line_naming_it_and_the_fix(tree, kind, loader, monkeypatch):
    expected = put_bad_file(kind, tree / "train" / "b", monkeypatch)
    message = error_of(tree, loader=loader)
    assert message == f"{expected}, or set dataset.on_bad_image=skip"
    message.encode("utf-8")  # printable as it is


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_file_is_left_out_and_counted_with_skip(tree, kind, loader, monkeypatch, caplog):
    expected = put_bad_file(kind, tree / "train" / "b", monkeypatch)
    with caplog.at_level(logging.WARNING, logger="emca.data.folder"):
        bundle = build(tree, loader, on_bad_image="skip")
    assert (bundle.num_train, bundle.num_val) == (6, 4)
    problem = expected.split(" image ")[0]
    assert [record.message for record in caplog.records] == [
        f"skipped 1 image(s) in {tree / 'train'} (1 {problem}), e.g. {expected}"
    ]
    for split in (bundle.train, bundle.val):
        split.set_epoch(0)
        assert sum(len(labels) for _, labels in split) == (6 if split is bundle.train else 4)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("on_bad_image", ["error", "skip"])
def test_an_image_deleted_after_screening_is_named_by_the_loader(tree, loader, on_bad_image):
    # In-process torchvision loading (workers=0); the worker path is in the permission tests.
    bundle = build(tree, loader, on_bad_image=on_bad_image, workers=0)
    gone = tree / "val" / "b" / "b_1.JPEG"
    gone.unlink()
    bundle.val.set_epoch(0)
    with pytest.raises(DatasetError) as caught:
        list(bundle.val)
    assert str(caught.value) == (
        f"missing image {gone}: no such file (moved or deleted after its folder was listed); "
        "restore it, or start again so that the folder is listed afresh"
    )


@pytest.mark.parametrize("loader", LOADERS)
def test_images_above_pils_pixel_limit_are_accepted(tree, loader, monkeypatch):
    # PIL refuses images above twice Image.MAX_IMAGE_PIXELS (179 Mpx by default) as possible
    # decompression bombs; lowered here so that the tree's 48x40 images stand in for huge ones.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tree / "val" / "a" / "a_0.JPEG")
    bundle = build(tree, loader)
    assert (bundle.num_train, bundle.num_val) == (6, 4)
    for split in (bundle.train, bundle.val):
        split.set_epoch(0)
        assert sum(len(labels) for _, labels in split) == (6 if split is bundle.train else 4)


# --- permissions: only an unprivileged process is refused a chmod 000 file, so these run in one ---

# Root keeps file ownership (so it may chmod its test files) but loses the override of permissions.
DROP_OVERRIDE = ["--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search", "--"]

# For each case: chmod as told, build both loaders in both on_bad_image modes, chmod the
# after_build paths, read one epoch of each split; print the outcomes as JSON.
UNPRIVILEGED_BUILDS = r"""
import gc, json, logging, os, sys
from emca.data import DatasetConfig, DatasetError, LoaderConfig, build_loaders
# A torchvision loader stopped by an error leaves its workers running, with the stop signals blocked
# (emca.engine.preemption): collecting the loader, or multiprocessing at exit, would wait for them.
gc.disable()
outcomes = {}
for name, case in json.loads(sys.argv[1]).items():
    for loader in ("dali", "torchvision"):
        for mode in ("error", "skip"):
            warnings = []
            handler = logging.Handler()
            handler.emit = lambda record: warnings.append(record.getMessage())
            logging.getLogger("emca.data").addHandler(handler)
            for path, bits in case["before"].items():
                os.chmod(path, bits)
            try:
                dataset = DatasetConfig(name="imagefolder", root=case["root"], image_size=32, val_resize=32,
                                        batch_size=2, workers=1, on_bad_image=mode)
                bundle = build_loaders(dataset, LoaderConfig(name=loader, persistent_workers=False))
                for path, bits in case["after_build"].items():
                    os.chmod(path, bits)
                counts = []
                for split in (bundle.train, bundle.val):
                    split.set_epoch(0)
                    counts.append(sum(len(labels) for _, labels in split))
                outcome = dict(counts=counts, warnings=warnings)
            except DatasetError as error:
                outcome = dict(error=str(error))
            for path in {**case["before"], **case["after_build"]}:
                os.chmod(path, 0o755)
            logging.getLogger("emca.data").removeHandler(handler)
            outcomes[f"{name} {loader} {mode}"] = outcome
print(json.dumps(outcomes), flush=True)
os._exit(0)
"""


def permission_cases(root):
    """case name -> (tree root, chmods before building, chmods after building)."""
    folders = dict(
        root=root, split=root / "train", **{"class": root / "val" / "a"}, subfolder=root / "train" / "a" / "more"
    )
    cases = {f"unreadable {name}": (root, {path: 0}, {}) for name, path in folders.items()}
    cases["class listable but not searchable"] = (root, {folders["class"]: 0o444}, {})
    cases["unreadable image"] = (root, {root / "train" / "a" / "a_1.JPEG": 0}, {})
    cases["image unreadable after screening"] = (root, {}, {root / "val" / "b" / "b_0.JPEG": 0})
    return cases


@pytest.fixture(scope="module")
def unprivileged_outcomes(tmp_path_factory, image_tree_module):
    """Every permission case's outcome, "<case> <loader> <mode>" -> outcome, from one unprivileged process."""
    prefix = [shutil.which("setpriv") or "setpriv", *DROP_OVERRIDE] if os.geteuid() == 0 else []
    probe = tmp_path_factory.mktemp("permission-probe")
    (probe / "open").write_text("x")
    (probe / "locked").write_text("x")
    (probe / "locked").chmod(0)

    def can_read(path):
        try:
            return subprocess.run([*prefix, "cat", str(path)], capture_output=True).returncode == 0
        except FileNotFoundError:
            return False

    if not can_read(probe / "open") or can_read(probe / "locked"):
        pytest.skip("no unprivileged process to test permissions with (root, and setpriv cannot drop the override)")
    root = image_tree_module(tmp_path_factory.mktemp("permissions") / "tree")
    cases = {
        name: dict(
            root=str(tree),
            before={str(p): bits for p, bits in before.items()},
            after_build={str(p): bits for p, bits in after.items()},
        )
        for name, (tree, before, after) in permission_cases(root).items()
    }
    cache = tmp_path_factory.mktemp("emca-cache")
    result = subprocess.run(
        [*prefix, sys.executable, "-c", UNPRIVILEGED_BUILDS, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "EMCA_CACHE": str(cache)},
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return root, json.loads(result.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def image_tree_module():
    """A tree like `tree`'s (train: a, b x 3; val: a, b x 2) plus an image in train/a/more/."""

    def make(root):
        rng = np.random.default_rng(0)
        for split, count in (("train", 3), ("val", 2)):
            for index, name in enumerate("ab"):
                (root / split / name).mkdir(parents=True)
                for i in range(count):
                    pixels = rng.integers(0, 60, (40, 48, 3), dtype=np.uint8)
                    pixels[..., index] += 180
                    Image.fromarray(pixels).save(root / split / name / f"{name}_{i}.JPEG", quality=95)
        (root / "train" / "a" / "more").mkdir()
        shutil.copy(root / "train" / "a" / "a_0.JPEG", root / "train" / "a" / "more" / "a_3.JPEG")
        return root

    return make


def outcomes_of(unprivileged_outcomes, case):
    root, outcomes = unprivileged_outcomes
    found = {key.removeprefix(case + " "): outcome for key, outcome in outcomes.items() if key.startswith(case + " ")}
    assert sorted(found) == ["dali error", "dali skip", "torchvision error", "torchvision skip"]
    return root, found


@pytest.mark.parametrize(
    "case",
    [
        "unreadable root",
        "unreadable split",
        "unreadable class",
        "unreadable subfolder",
        "class listable but not searchable",
    ],
)
def test_unreadable_folder_stops_both_loaders_in_both_modes(unprivileged_outcomes, case):
    root, outcomes = outcomes_of(unprivileged_outcomes, case)
    denied = dict(permission_cases(root)[case][1]).popitem()[0]
    expected = (f"cannot read {denied}: permission denied; "
                f"make the folder readable and searchable by this user (e.g. chmod a+rx {denied})")
    assert all(outcome == {"error": expected} for outcome in outcomes.values()), outcomes


def test_unreadable_image_is_named_as_such_or_skipped(unprivileged_outcomes):
    root, outcomes = outcomes_of(unprivileged_outcomes, "unreadable image")
    image = root / "train" / "a" / "a_1.JPEG"
    told = f"unreadable image {image}: permission denied; make the file readable by this user (e.g. chmod a+r {image})"
    for loader in LOADERS:
        assert outcomes[f"{loader} error"] == {"error": f"{told}, or set dataset.on_bad_image=skip"}
        # 6 train images, 1 left out, batches of 2 with the last partial one dropped; val untouched.
        assert outcomes[f"{loader} skip"] == {
            "counts": [6, 4],
            "warnings": [f"skipped 1 image(s) in {root / 'train'} (1 unreadable), e.g. {told}"],
        }


def test_image_made_unreadable_after_screening_is_named_by_both_loaders(unprivileged_outcomes):
    root, outcomes = outcomes_of(unprivileged_outcomes, "image unreadable after screening")
    image = root / "val" / "b" / "b_0.JPEG"
    told = f"unreadable image {image}: permission denied; make the file readable by this user (e.g. chmod a+r {image})"
    assert all(outcome == {"error": told} for outcome in outcomes.values()), outcomes


@pytest.mark.parametrize("loader", LOADERS)
def test_a_file_that_passes_the_check_but_fails_to_decode_is_named(tree, loader):
    # Valid header and end marker, scrambled entropy-coded data: only a full decode notices.
    bad = tree / "val" / "a" / "scrambled.JPEG"
    data = (tree / "val" / "a" / "a_0.JPEG").read_bytes()
    bad.write_bytes(data[:200] + bytes(np.random.default_rng(0).integers(0, 255, 2000, dtype=np.uint8)) + b"\xff\xd9")
    assert folder.check_image(str(bad)) is None
    bundle = build(tree, loader)
    bundle.val.set_epoch(0)
    with pytest.raises(DatasetError, match="scrambled.JPEG") as caught:
        list(bundle.val)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("loader", LOADERS)
def test_greyscale_and_cmyk_images_come_out_rgb(tmp_path, loader):
    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for mode in ("L", "CMYK", "RGB"):
            folder_path = tmp_path / split / mode
            folder_path.mkdir(parents=True)
            channels = {"L": (), "CMYK": (4,), "RGB": (3,)}[mode]
            pixels = rng.integers(0, 255, (40, 40, *channels), dtype=np.uint8)
            Image.fromarray(pixels, mode=mode).save(folder_path / "image.jpg", quality=95)
    bundle = build(tmp_path, loader, batch_size=3)
    bundle.val.set_epoch(0)
    images, labels = next(iter(bundle.val))
    assert images.shape == (3, 3, 32, 32)
    std, mean = torch.tensor(DatasetConfig().std).view(3, 1, 1), torch.tensor(DatasetConfig().mean).view(3, 1, 1)
    grey = images[bundle.classes.index("L")] * std + mean
    assert torch.allclose(grey[0], grey[1], atol=1e-3) and torch.allclose(grey[0], grey[2], atol=1e-3)


def test_image_checks_are_cached_until_a_file_changes(tree, monkeypatch):
    build(tree)
    monkeypatch.setattr(folder, "check_image", lambda path: pytest.fail(f"re-checked {path}"))
    build(tree)  # nothing changed: nothing re-checked
    checked = []
    monkeypatch.setattr(folder, "check_image", lambda path: checked.append(path))
    changed = tree / "train" / "a" / "a_0.JPEG"
    os.utime(changed, ns=(0, 0))
    build(tree)
    assert checked == [str(changed)]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (dict(batch_size=3, world_size=2), "multiple of the number of processes"),
        (dict(batch_size=64), "fewer than one global batch"),
        (dict(train_crop="center"), "train_crop"),
        (dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]), "0-255 scale"),
        (dict(on_bad_image="ignore"), "on_bad_image"),
        (dict(val_resize=16), "val_resize=16"),
        (dict(name="cifar"), "unknown dataset.name"),
        (dict(crop_scale=[0.5]), "crop_scale"),
    ],
)
def test_invalid_settings(tree, overrides, expected):
    world_size = overrides.pop("world_size", 1)
    fields = dict(name="imagefolder", root=str(tree), image_size=32, val_resize=32, batch_size=2, workers=1)
    fields.update(overrides)
    with pytest.raises(DatasetError, match=expected):
        build_loaders(OmegaConf.create(fields), LoaderConfig(name="torchvision"), world_size=world_size)


def test_unknown_loader_and_unknown_field(tree):
    with pytest.raises(DatasetError, match="unknown loader.name"):
        build_loaders(OmegaConf.create(dict(root=str(tree))), OmegaConf.create(dict(name="ffcv")))
    with pytest.raises(DatasetError, match="DatasetConfig"):
        build_loaders(OmegaConf.create(dict(root=str(tree), imagesize=32)), LoaderConfig())
