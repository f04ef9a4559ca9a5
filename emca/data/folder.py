"""Listing ImageFolder trees (train/<class>/*, val/<class>/*) and screening out corrupt images.

Shared by the DALI and torchvision loaders so both see the same files, labels and class names.

Corrupt-image policy: a cheap structural check at construction time rather than a full decode
(a full decode of ImageNet costs hours of CPU). Every file is opened with PIL, which parses the
header and rejects non-images, and JPEG/PNG files must end with their end marker (EOI / IEND);
together these catch the common failures (garbage, empty or truncated downloads) before DALI could
crash mid-epoch on them. Files that pass are remembered in a small cache keyed by
(path, size, mtime, permissions), so later runs only stat the files. A file that passes the check
yet fails to decode still stops the run with a DatasetError naming the file (see the loaders).

The check also refuses files the two loaders would decode to different pixels (a pixel format in
_AGREED_MODES was measured to agree; tests/test_pixel_formats.py holds the measurements), and it
names file-system problems (permissions, broken links, vanished files) as such, not as corruption.
Folders that cannot be listed stop the run whatever dataset.on_bad_image says: skipping them would
silently drop classes.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from emca.data.errors import DatasetError, printable

log = logging.getLogger(__name__)

# torchvision's ImageFolder extensions; other files (txt, json, .DS_Store) are ignored like it does.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# An end marker is searched in the file's tail, not just its last bytes: some valid JPEGs carry
# padding or trailer data after EOI. Entropy-coded JPEG data cannot contain FFD9 (0xFF is stuffed).
_TAIL_BYTES = 4096
_END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND"}

# The pixel formats (PIL's format and mode at open) that the torchvision and DALI loaders decode to
# the same pixels, measured in tests/test_pixel_formats.py; files in any other are refused by both.
# MPO is a camera's multi-picture JPEG (both read its first picture); PPM covers PBM/PGM/PPM
# (mode I: 16-bit PGM). The other formats PIL recognises (GIF, ICO, JPEG 2000, ...) fail in DALI
# or were not measured.
_AGREED_MODES = {
    "JPEG": {"L", "RGB", "CMYK"},
    "MPO": {"L", "RGB"},
    "PNG": {"1", "L", "LA", "I;16", "P", "RGB", "RGBA"},
    "BMP": {"1", "L", "P", "RGB", "RGBA"},
    "TIFF": {"1", "L", "P", "RGB", "RGBA", "CMYK", "I;16", "I;16B"},
    "WEBP": {"RGB", "RGBA"},
    "PPM": {"1", "L", "I", "RGB"},
}
# Why the measured disagreements disagree, for the message.
_DISAGREEMENTS = {
    ("TIFF", "LA"): "DALI puts a greyscale+alpha TIFF's alpha into the green and blue channels",
    ("TIFF", "I"): "DALI cannot decode 32-bit integer TIFFs",
    ("TIFF", "F"): "DALI reads floating-point TIFFs on a 0-1 scale, PIL on 0-255",
    ("PPM", "F"): "DALI cannot decode PFM (floating-point) files",
}
_BITS_PER_SAMPLE = 258  # TIFF tag
_UNSUPPORTED_FIX = "convert it to an 8-bit PNG or JPEG"
_RENAME = "e.g. convmv -f latin1 -t utf8"


@dataclass(frozen=True)
class BadImage:
    """Why a file cannot be used: the kind of problem (corrupt, unreadable, missing, unsupported),
    the reason, and the fix."""

    kind: str
    reason: str
    fix: str

    def describe(self, path: str, others: str = "") -> str:
        return f"{self.kind} image {path}: {self.reason}{others}; {self.fix}"


@dataclass(frozen=True)
class ImageList:
    """The images of one split: absolute paths, integer labels and the class names they index."""

    paths: list[str]
    labels: np.ndarray  # int64, indices into classes
    classes: list[str]
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.paths)

    def open(self, index: int) -> tuple[str, int]:
        """What the torchvision loader decodes for sample `index` (its path), and its label."""
        return self.paths[index], int(self.labels[index])

    def describe(self, index: int, error: BaseException) -> str:
        """The one-line error for sample `index` failing to decode with `error`."""
        return describe_failure(self.paths[index], error).describe(self.paths[index])


def check_root(root: Path, dataset: str, splits: Sequence[str] = ("train", "val")) -> None:
    """Fail early, in one line, on the layouts that would otherwise break later."""
    wanted = " and ".join(f"{split}/" for split in splits)
    kind = _file_type(root)
    if kind is None:
        raise DatasetError(
            f"dataset root {root} {_absence(root)}; set dataset.root to a folder with {wanted} class folders"
        )
    if not stat.S_ISDIR(kind):
        raise DatasetError(
            f"dataset root {root} is not a folder; set dataset.root to a folder with {wanted} class folders"
        )
    if any(stat.S_ISREG(_file_type(root / name) or 0) for name in ("wnids.txt", "val/val_annotations.txt")):
        raise DatasetError(
            f"{root} is the raw Tiny ImageNet download (wnids.txt, val/val_annotations.txt); convert it once with "
            f"`python scripts/prepare_tiny_imagenet.py {root} OUT` and set dataset.root=OUT"
        )
    for split in splits:
        kind = _file_type(root / split)
        if kind is None or not stat.S_ISDIR(kind):
            link = f" ({split}/ {_absence(root / split)})" if kind is None and os.path.islink(root / split) else ""
            raise DatasetError(
                f"{root} has no {split}/ folder{link}; dataset '{dataset}' expects "
                f"{' and '.join(f'{root}/{name}/<class>/' for name in splits)} image folders"
            )


def _file_type(path: Path) -> Optional[int]:
    """The st_mode of what `path` leads to, None if nothing; an unreadable folder is a DatasetError."""
    try:
        return os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:
        if error.errno == errno.ELOOP:
            return None
        raise folder_error(path, error) from None


def _absence(path: Path) -> str:
    """'does not exist', or what is wrong with the symlink standing in its place."""
    if not os.path.islink(path):
        return "does not exist"
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "is a symlink loop"
    return f"is a broken symlink to {os.readlink(path)}"


def folder_error(path, error: OSError) -> DatasetError:
    """The one-line error for a folder that cannot be read, whatever dataset.on_bad_image says."""
    if isinstance(error, PermissionError):
        denied = denied_path(str(path))
        return DatasetError(f"cannot read {denied}: permission denied; {permission_fix(denied)}")
    return DatasetError(
        f"cannot read folder {path}: {error.strerror or error}; check the disk and the file system it is on"
    )


def denied_path(path: str) -> str:
    """What a denied read of `path` is stuck on: `path` itself (no read permission), or the nearest
    folder above it without search permission, the first one up the tree that stat can reach."""
    while os.path.dirname(path) != path:
        try:
            os.stat(path)
            break
        except PermissionError:
            path = os.path.dirname(path)
        except OSError:
            break
    return path


def permission_fix(denied: str) -> str:
    if os.path.isdir(denied):
        return f"make the folder readable and searchable by this user (e.g. chmod a+rx {denied})"
    return f"make the file readable by this user (e.g. chmod a+r {denied})"


def find_classes(split_dir: Path) -> list[str]:
    try:
        with os.scandir(split_dir) as entries:
            classes = sorted(
                entry.name for entry in entries if not entry.name.startswith(".") and _is_class_folder(entry)
            )
    except OSError as error:
        raise folder_error(split_dir, error) from None
    if not classes:
        raise DatasetError(f"{split_dir} has no class folders; put images in {split_dir}/<class name>/")
    misnamed = next((name for name in classes if not _is_utf8(name)), None)
    if misnamed is not None:  # its images would all be refused, leaving an empty class
        raise DatasetError(f"class folder {split_dir / misnamed}: its name is not valid UTF-8; rename it ({_RENAME})")
    return classes


def _is_utf8(name: str) -> bool:
    """False for a name with bytes that are not UTF-8, which os.fsdecode keeps as surrogates."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_class_folder(entry: os.DirEntry) -> bool:
    """Whether a split folder's entry is a class folder; a link that leads nowhere would silently
    drop a class, so it is an error rather than an ignored file."""
    try:
        if entry.is_dir():
            return True
        if not entry.is_symlink() or os.path.exists(entry.path):
            return False  # a file, or a link to one
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise folder_error(entry.path, error) from None
    raise DatasetError(f"{entry.path} {_absence(Path(entry.path))}; point the link at a class folder or remove it")


def _images_under(class_dir: Path) -> list[str]:
    """The image files under class_dir, following links to folders but not round a loop of them."""

    def fail(error: OSError):
        raise folder_error(error.filename, error) from None

    found = []
    # The real folders on the way down to each folder still to visit: a link back to one is a loop.
    above = {str(class_dir): {os.path.realpath(class_dir)}}
    for dirpath, dirnames, filenames in os.walk(class_dir, onerror=fail, followlinks=True):
        chain = above.pop(dirpath)
        if filenames:
            try:  # a folder that lists but cannot be searched (r without x) would fail file by file
                os.stat(os.path.join(dirpath, os.curdir))
            except OSError as error:
                fail(error)
        dirnames.sort()
        for name in dirnames:
            sub = os.path.join(dirpath, name)
            real = os.path.realpath(sub)
            if real in chain:
                raise DatasetError(f"symlink loop: {sub} leads back to {real}; remove the link or point it elsewhere")
            above[sub] = chain | {real}
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS))
    return found


def list_split(split_dir: Path, classes: Optional[Sequence[str]] = None) -> ImageList:
    """List split_dir/<class>/**/<image>; labels index `classes` (default: this folder's classes).

    Validation passes the train classes (or a trained model's): its class folders must be a subset
    of them, mapped by name.
    """
    own = find_classes(split_dir)
    classes = list(own if classes is None else classes)
    index = {name: i for i, name in enumerate(classes)}
    unknown = [name for name in own if name not in index]
    if unknown:
        raise DatasetError(
            f"{split_dir} has class folders that the training classes lack "
            f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}); "
            "validation classes must be a subset of the training classes"
        )
    paths, labels = [], []
    for name in own:
        files = _images_under(split_dir / name)
        if not files:
            raise DatasetError(
                f"class folder {split_dir / name} has no images ({', '.join(IMG_EXTENSIONS)}); add images or remove "
                "the folder"
            )
        paths.extend(files)
        labels.extend([index[name]] * len(files))
    return ImageList(paths, np.asarray(labels, dtype=np.int64), classes)


def open_image(path: str) -> Image.Image:
    """Image.open for dataset files, without PIL's decompression-bomb limit.

    PIL warns above Image.MAX_IMAGE_PIXELS (89 Mpx) and refuses twice that, a guard against hostile
    files; a dataset is the user's own, and a large photo or scan in it is valid (DALI decodes it
    too). The limit is a PIL global, read at open and again at load: it is lifted on every read, so
    that it holds in whichever process reads the file, whatever other code set it to.
    """
    Image.MAX_IMAGE_PIXELS = None
    return Image.open(path)


def check_image(path: str) -> Optional[BadImage]:
    """Why `path` is not a usable image, or None when it passes the cheap structural check."""
    if not _is_utf8(path):
        return BadImage("unsupported", "its name is not valid UTF-8, which DALI cannot open", f"rename it ({_RENAME})")
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):  # opening a pipe would wait for a writer
            return BadImage("unsupported", "not a regular file (a pipe, socket or device)", "remove it")
        if info.st_size == 0:
            return BadImage("corrupt", "empty file (0 bytes)", "remove it or copy it again")
        with open_image(path) as image:
            problem = _pixel_format_problem(image, path)
            image_format, (width, height) = image.format, image.size
        if problem is None and (width <= 0 or height <= 0):
            problem = BadImage("corrupt", "image has no pixels", "remove or replace it")
        marker = _END_MARKERS.get(image_format)
        if problem is None and marker is not None and not _has_end_marker(path, info.st_size, marker):
            problem = BadImage("corrupt", f"truncated {image_format} (no end marker)", "remove or replace it")
    except Exception as error:  # PIL raises several types for unreadable files
        return describe_failure(path, error)
    return problem


def _has_end_marker(path: str, size: int, marker: bytes) -> bool:
    with open(path, "rb") as handle:
        handle.seek(max(0, size - _TAIL_BYTES))
        return marker in handle.read()


def _pixel_format_problem(image: Image.Image, path: str) -> Optional[BadImage]:
    """Why the two loaders would decode `image` to different pixels (or one not at all), if they would."""
    if image.format not in _AGREED_MODES:
        reason = f"{image.format} data, not one of the formats both loaders decode alike ({', '.join(_AGREED_MODES)})"
    elif image.mode not in _AGREED_MODES[image.format]:
        reason = _DISAGREEMENTS.get(
            (image.format, image.mode),
            f"a {image.format} in PIL mode {image.mode}, which the loaders are not known to decode alike",
        )
    elif image.format == "TIFF" and _BITS_PER_SAMPLE not in image.tag_v2:
        reason = "a TIFF without a BitsPerSample tag (1-bit, written without libtiff), which DALI refuses to decode"
    elif image.format == "WEBP" and "exif" in image.info and _exif_after_odd_chunk(path):
        reason = "a WebP whose EXIF chunk follows an odd-sized chunk, which DALI's WebP parser cannot step over"
    elif image.format == "PPM" and _pnm_maxval(image) not in (None, 255, 65535):
        reason = (
            f"a PGM/PPM with maxval {_pnm_maxval(image)}, which DALI does not rescale (only 255 and 65535 decode alike)"
        )
    else:
        return None
    return BadImage("unsupported", reason, _UNSUPPORTED_FIX)


def _exif_after_odd_chunk(path: str) -> bool:
    """Whether DALI would fail on this WebP: it looks for the EXIF chunk (for the orientation) by
    stepping over the chunks before it without RIFF's pad byte after an odd-sized one."""
    odd = False
    with open(path, "rb") as handle:
        handle.seek(12)  # RIFF, size, WEBP
        while len(header := handle.read(8)) == 8:
            tag, size = header[:4], int.from_bytes(header[4:], "little")
            if tag == b"EXIF":
                return odd
            odd = odd or size % 2 == 1
            handle.seek(size + size % 2, os.SEEK_CUR)
    return False


def _pnm_maxval(image: Image.Image) -> Optional[int]:
    # PIL's PPM reader passes maxval to its decoder as the last tile argument, except for the
    # maxvals it reads raw (255, and 65535 for greyscale) and for PBM.
    args = image.tile[0][3] if image.tile else None
    return args[-1] if isinstance(args, tuple) else None


def describe_failure(path: str, error: BaseException) -> BadImage:
    """The problem behind an exception raised while opening or decoding `path`.

    PIL's own decoding errors are OSErrors too, but without an errno; one with an errno comes from
    the file system, and the file is not corrupt.
    """
    if isinstance(error, PermissionError):
        denied = denied_path(path)
        where = "" if denied == path else f" (on the folder {denied})"
        return BadImage("unreadable", f"permission denied{where}", permission_fix(denied))
    if isinstance(error, FileNotFoundError) and not os.path.islink(path):
        return BadImage(
            "missing",
            "no such file (moved or deleted after its folder was listed)",
            "restore it, or start again so that the folder is listed afresh",
        )
    if isinstance(error, OSError) and error.errno in (errno.ENOENT, errno.ELOOP):
        return BadImage(
            "missing", _absence(Path(path)).removeprefix("is "), "point the link at an existing image or remove it"
        )
    if isinstance(error, OSError) and error.errno is not None:
        return BadImage("unreadable", error.strerror or str(error), "check the disk and the file system it is on")
    return BadImage("corrupt", f"not a decodable image ({type(error).__name__}: {error})", "remove or replace it")


def _fingerprints(paths: Sequence[str]) -> np.ndarray:
    """One 64-bit digest of (path, size, mtime, permissions) per file: changes whenever the file does,
    or who may read it. 0 (never cached) for a file that cannot be stat'ed: check_image says why."""
    digests = np.zeros(len(paths), dtype=np.uint64)
    for i, path in enumerate(paths):
        try:
            info = os.stat(path)
        except OSError:
            continue
        key = os.fsencode(f"{path}\0{info.st_size}\0{info.st_mtime_ns}\0{info.st_mode}\0{info.st_uid}\0{info.st_gid}")
        digests[i] = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return digests


def _cache_file(split_dir: Path, cache_dir: Path) -> Path:
    name = hashlib.sha1(os.fsencode(split_dir.resolve())).hexdigest()[:16]
    return cache_dir / "image-checks" / f"{name}.npy"


def _load_known_good(cache_file: Path) -> np.ndarray:
    try:
        return np.load(cache_file)
    except (OSError, ValueError):
        return np.empty(0, dtype=np.uint64)


def _save_known_good(cache_file: Path, fingerprints: np.ndarray) -> None:
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache_file.parent, suffix=".npy", delete=False) as handle:
            np.save(handle, fingerprints)
        os.replace(handle.name, cache_file)  # atomic: concurrent ranks never read half a file
    except OSError as error:  # a read-only cache only costs a re-check next time
        log.warning("could not cache image checks in %s: %s", cache_file.parent, error)


def screen_images(
    images: ImageList, split_dir: Path, *, on_bad_image: str, cache_dir: Path, threads: int = 1
) -> ImageList:
    """Drop (on_bad_image='skip') or refuse (on_bad_image='error') files that fail check_image."""
    fingerprints = _fingerprints(images.paths)
    cache_file = _cache_file(split_dir, cache_dir)
    known_good = _load_known_good(cache_file)
    unchecked = np.flatnonzero(~np.isin(fingerprints, known_good))
    if unchecked.size == 0:
        return images
    with ThreadPoolExecutor(max(1, threads)) as pool:
        problems = list(pool.map(check_image, [images.paths[i] for i in unchecked]))
    bad = {int(i): why for i, why in zip(unchecked, problems, strict=True) if why is not None}
    good = np.ones(len(images), dtype=bool)
    good[list(bad)] = False
    _save_known_good(cache_file, np.union1d(known_good, fingerprints[good & (fingerprints != 0)]))
    if not bad:
        return images
    first = min(bad)
    if on_bad_image != "skip":
        others = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DatasetError(f"{bad[first].describe(images.paths[first], others)}, or set dataset.on_bad_image=skip")
    kinds = ", ".join(
        f"{count} {kind}" for kind, count in sorted(Counter(problem.kind for problem in bad.values()).items())
    )
    log.warning(
        "skipped %d image(s) in %s (%s), e.g. %s",
        len(bad),
        printable(str(split_dir)),
        kinds,
        printable(bad[first].describe(images.paths[first])),
    )
    keep = np.flatnonzero(good)
    return ImageList([images.paths[i] for i in keep], images.labels[keep], images.classes, images.skipped + len(bad))
