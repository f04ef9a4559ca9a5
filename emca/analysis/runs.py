"""Finding training runs under sweep folders and reading what they measured.

A run folder is any folder holding .hydra/config.yaml (what Hydra writes for every job of a run
or a multirun). Its results.json (written by train.py when the run completed) gives accuracy,
parameters, GFLOPs and the per-epoch validation curve; an eval.json (written by eval.py, in the run
folder or next to its checkpoints) adds the paper's speeds, the rotated accuracies (Table 9) and
the learned-scale statistics (Figure 6). A run without either is listed as
incomplete: a gap in the tables, not an error.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from omegaconf import OmegaConf

from emca.analysis.tables import SCALE_STATISTICS
from emca.analysis.variants import Variant, variant_from_config
from emca.engine.checkpoint import CHECKPOINT_DIR, GENERATIONS
from emca.engine.results import RESULTS

log = logging.getLogger(__name__)

EVAL = "eval.json"
ACCURACIES = ("final", "best")


@dataclass
class Run:
    path: Path
    variant: Variant
    dataset: Optional[str]
    results: Optional[dict[str, Any]]
    evaluation: Optional[dict[str, Any]]

    @property
    def complete(self) -> bool:
        return self.results is not None or self.evaluation is not None

    def measurement(self, accuracy: str = "final") -> dict[str, float]:
        """The table metrics this run has (params in millions); absent keys are gaps."""
        values: dict[str, float] = {}
        results, evaluation = self.results or {}, self.evaluation or {}
        if accuracy not in ACCURACIES:
            raise ValueError(f"accuracy must be one of {ACCURACIES}, got {accuracy!r}")
        chosen = results.get(accuracy) or {}
        if "val_top1" in chosen:
            values.update(top1=chosen["val_top1"], top5=chosen["val_top5"])
        elif "val" in evaluation:
            values.update(top1=evaluation["val"]["top1"], top5=evaluation["val"]["top5"])
        params = evaluation.get("params", results.get("params"))
        if params is not None:
            values["params"] = params / 1e6
        gflops = evaluation.get("gflops", results.get("gflops"))
        if gflops is not None:
            values["gflops"] = gflops
        for key, speed in (evaluation.get("speed") or {}).items():
            if isinstance(speed, dict) and "images_per_second" in speed:
                values[key] = speed["images_per_second"]
        for degrees, rotated in (evaluation.get("rotation") or {}).items():
            if degrees != "0":
                values[f"top1_rot{degrees}"] = rotated["top1"]
        for stage in evaluation.get("learned_scales") or []:
            for key, (_, _, factor) in SCALE_STATISTICS.items():
                values[f"scales_{key}_s{stage['stage']}"] = stage[key] * factor
        return values

    def top1_curve(self) -> list[Optional[float]]:
        return list((self.results or {}).get("val_top1_per_epoch") or [])


JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean", type(None): "null"}


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    """A results.json / eval.json that can fill the tables; None when it is absent, or (with a
    warning naming the file and what is wrong) when it is not what train.py / eval.py write."""
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:  # ValueError: invalid JSON, an empty file among them
        problem = f"not valid JSON ({' '.join(str(error).split())})"
    else:
        problem = _contents_problem(document, evaluation=path.name == EVAL)
    if problem:
        fix = "rerun eval.py to rewrite it" if path.name == EVAL else "its run is a gap in the tables until the file is restored"
        log.warning("ignoring %s: %s; %s", path, problem, fix)
        return None
    return document


def _contents_problem(document: Any, evaluation: bool) -> Optional[str]:
    """Why a parsed document cannot fill the tables (None: it can). What the tables read is read
    here once, so that a hand-edited or foreign file is one warning rather than a traceback later."""
    if not isinstance(document, dict):
        return f"it holds {JSON_TYPES.get(type(document), 'something')}, not a JSON object"
    run = Run(Path(), None, None, None if evaluation else document, document if evaluation else None)  # type: ignore[arg-type]
    try:
        numbers = [value for accuracy in ACCURACIES for value in run.measurement(accuracy).values()]
        numbers += [value for value in run.top1_curve() if value is not None]
        device = (document.get("speed") or {}).get("device") if evaluation else None
    except (AttributeError, KeyError, TypeError) as error:
        return f"its fields differ from those train.py / eval.py write ({type(error).__name__}: {error})"
    numbers += [document["image_size"]] if "image_size" in document else []
    if not all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in numbers):
        return "a measurement in it is not a number"
    if device is not None and not isinstance(device, str):
        return "speed.device is not a string"
    return None


def _newest_eval(run_dir: Path) -> Optional[dict[str, Any]]:
    found = [path for path in (run_dir / EVAL, run_dir / CHECKPOINT_DIR / EVAL) if path.is_file()]
    return _read_json(max(found, key=lambda path: path.stat().st_mtime)) if found else None


def read_run(run_dir: Path) -> Optional[Run]:
    """The run in run_dir, or None (with a warning) when its config cannot be read."""
    config_path = run_dir / ".hydra" / "config.yaml"
    try:
        cfg = OmegaConf.load(config_path)
        variant = variant_from_config(cfg)
        dataset = OmegaConf.select(cfg, "dataset.name", default=None, throw_on_resolution_failure=False)
    except Exception as error:  # a hand-edited or foreign config: skip the folder, say why
        log.warning("ignoring %s: cannot read its model from %s (%s)", run_dir, config_path, " ".join(str(error).split())[:200])
        return None
    return Run(run_dir, variant, dataset, _read_json(run_dir / RESULTS), _newest_eval(run_dir))


def find_runs(roots: Iterable[Path]) -> list[Run]:
    """Every run folder under the roots (recursively), in path order."""
    runs = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            log.warning("%s is not a folder; skipped", root)
            continue
        for folder, subfolders, _ in os.walk(root):
            subfolders[:] = sorted(name for name in subfolders if name not in (".hydra", CHECKPOINT_DIR, GENERATIONS))
            if (Path(folder) / ".hydra" / "config.yaml").is_file():
                run = read_run(Path(folder))
                if run is not None:
                    runs.append(run)
    return runs


def measurements(runs: Iterable[Run], accuracy: str = "final") -> tuple[dict[Variant, dict[str, float]], list[str]]:
    """{table cell: metrics} from the completed runs, and notes on what was set aside.

    When several runs fill one cell the most recently finished one is used and the others named.
    """
    by_cell: dict[Variant, list[Run]] = {}
    notes = []
    for run in runs:
        if not run.complete:
            notes.append(f"incomplete (no usable {RESULTS} or {EVAL}): {run.path}")
            continue
        by_cell.setdefault(run.variant.cell(), []).append(run)
    measured, chosen_runs = {}, []
    for cell, candidates in by_cell.items():
        candidates.sort(key=_finished_at)
        chosen = candidates[-1]
        chosen_runs.append(chosen)
        measured[cell] = chosen.measurement(accuracy)
        if len(candidates) > 1:
            others = ", ".join(str(run.path) for run in candidates[:-1])
            notes.append(f"{len(candidates)} runs of {cell.describe()}: using {chosen.path} (newest), not {others}")
        if chosen.variant.options:
            notes.append(f"{chosen.path} differs from the paper's options: {chosen.variant.describe()}")
    # What our numbers depend on besides the model: the resolution of GFLOPs and the speed device.
    sizes = sorted({size for run in chosen_runs if (size := (run.evaluation or run.results or {}).get("image_size"))})
    if sizes:
        notes.append(f"GFLOPs at {', '.join(f'{size} px' for size in sizes)} (the paper's: 224 px).")
    devices = sorted({(run.evaluation.get("speed") or {}).get("device") for run in chosen_runs if run.evaluation} - {None})
    if devices:
        notes.append(f"Our speeds on {'; '.join(devices)} (eval.py); the paper's on the authors' Titan-XP machines.")
    return measured, notes


def _finished_at(run: Run) -> float:
    times = [path.stat().st_mtime for path in (run.path / RESULTS, run.path / EVAL, run.path / CHECKPOINT_DIR / EVAL) if path.is_file()]
    return max(times, default=0.0)
