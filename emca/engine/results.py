"""results.json: the summary of a completed run, written once at the end (atomically), never by a
run that failed or was pre-empted."""

from __future__ import annotations

import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from emca.common.files import atomic_write

RESULTS = "results.json"
VERSIONED_PACKAGES = ("torch", "torchvision", "hydra-core", "omegaconf", "timm", "numpy", "emca-train")
DALI_PREFIX = "nvidia-dali"  # published per CUDA version: nvidia-dali-cuda120, nvidia-dali-cuda130, ...
REPO_ROOT = Path(__file__).resolve().parents[2]


def git_commit() -> dict[str, Any]:
    """The commit the code ran from and whether the tree had uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    for distribution in metadata.distributions():
        if (distribution.metadata["Name"] or "").startswith(DALI_PREFIX):
            versions[distribution.metadata["Name"]] = distribution.version
    return versions


def write_results(run_dir: Path, results: dict[str, Any]) -> Path:
    path = Path(run_dir) / RESULTS
    atomic_write(path, lambda file: file.write((json.dumps(results, indent=2) + "\n").encode()))
    return path
