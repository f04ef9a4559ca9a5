"""scripts/prepare_tiny_imagenet.py: raw Tiny ImageNet layout -> ImageFolder of symlinks."""
import subprocess
import sys

import pytest

from emca.data import DatasetConfig, LoaderConfig, build_loaders


@pytest.fixture
def raw(shared_data):
    return shared_data / "tinyimagenet-raw-mini" / "tiny-imagenet-200"


def prepare(repo_root, *args):
    return subprocess.run([sys.executable, str(repo_root / "scripts" / "prepare_tiny_imagenet.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=repo_root)


def test_every_val_image_lands_in_its_annotated_class(repo_root, raw, tmp_path):
    out = tmp_path / "tiny"
    result = prepare(repo_root, raw, out)
    assert result.returncode == 0, result.stderr
    annotated = {}
    for line in (raw / "val" / "val_annotations.txt").read_text().splitlines():
        name, wnid = line.split("\t")[:2]
        annotated[name] = wnid
    placed = {path.name: path.parent.name for path in (out / "val").rglob("*.JPEG")}
    assert placed == annotated and len(placed) == 1000
    wnids = (raw / "wnids.txt").read_text().split()
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(wnids)
    for wnid in wnids:
        links = sorted((out / "train" / wnid).iterdir())
        assert [p.name for p in links] == sorted(p.name for p in (raw / "train" / wnid / "images").iterdir())
        assert all(p.is_symlink() and p.resolve().parent == (raw / "train" / wnid / "images").resolve() for p in links)
    assert str(out) in result.stdout


def test_prepared_tree_loads(repo_root, raw, tmp_path, emca_cache):
    out = tmp_path / "tiny"
    assert prepare(repo_root, raw.parent, out).returncode == 0  # the folder containing tiny-imagenet-200 works too
    dataset = DatasetConfig(name="tiny_imagenet", root=str(out), image_size=64, val_resize=64, batch_size=50, workers=1,
                            train_crop="pad_random")
    bundle = build_loaders(dataset, LoaderConfig(name="dali"))
    assert (bundle.num_classes, bundle.num_train, bundle.num_val) == (20, 1000, 1000)


def test_refuses_to_overwrite_unless_forced(repo_root, raw, tmp_path):
    out = tmp_path / "tiny"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused = prepare(repo_root, raw, out)
    assert refused.returncode == 1 and "--force" in refused.stderr and not (out / "train").exists()
    assert prepare(repo_root, raw, out, "--force").returncode == 0
    assert prepare(repo_root, raw, out, "--force").returncode == 0  # replaces its own earlier output
    assert (out / "keep.txt").read_text() == "mine" and len(list((out / "val").rglob("*.JPEG"))) == 1000


def test_wrong_raw_folder(repo_root, tmp_path):
    result = prepare(repo_root, tmp_path, tmp_path / "out")
    assert result.returncode == 1 and "wnids.txt" in result.stderr
    missing = prepare(repo_root, tmp_path / "nowhere", tmp_path / "out")
    assert missing.returncode == 1 and "not a folder" in missing.stderr
    (tmp_path / "wnids.txt").write_text("n0001\n")
    no_val = prepare(repo_root, tmp_path, tmp_path / "out")
    assert no_val.returncode == 1 and "val_annotations.txt" in no_val.stderr
