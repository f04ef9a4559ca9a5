"""Finding training runs under sweep folders and reading what they measured.

A run folder is any folder holding results.json or .hydra/config.yaml (which the trainer writes
for every run it accepts). Its results.json (written by train.py when the run completed) gives
accuracy, parameters, GFLOPs and the per-epoch validation curve; an eval.json (written by eval.py,
in the run folder or next to its checkpoints) adds the paper's speeds, the rotated accuracies
(Table 9) and the learned-scale statistics (Figure 6). A detection run (task=detection, Tables 6
and 8) gives its box and mask AP and its trained parameters from results.json alone. A run without
either is listed as incomplete: a gap in the tables, not an error.

What a run is (model, dataset, image size, run id) is read from what the run itself recorded:
results.json, or for a run eval.py measured before it completed, its checkpoint. Never from
.hydra/config.yaml, which a later command in the same folder may have rewritten.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from emca.analysis import paper_reference as paper
from emca.analysis.complexity import build_variant, count_macs
from emca.analysis.tables import AP_METRICS, SCALE_STATISTICS, TABLES, Measured
from emca.analysis.variants import PAPER_OPTIONS, Variant, variant_from_config
from emca.common.checkpoint_file import CHECKPOINT_DIR, LAST, load_checkpoint
from emca.engine.checkpoint import GENERATIONS
from emca.engine.results import RESULTS

log = logging.getLogger(__name__)

EVAL = "eval.json"
ACCURACIES = ("final", "best")


@dataclass
class Run:
    path: Path
    results: Optional[dict[str, Any]]
    evaluation: Optional[dict[str, Any]]
    # What the run recorded itself to be; None for an incomplete run.
    variant: Optional[Variant] = None
    dataset: Optional[str] = None
    image_size: Optional[int] = None
    run_id: Optional[str] = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.results is not None or self.evaluation is not None

    @property
    def protocol(self) -> tuple[Optional[str], Optional[int]]:
        """(dataset, image size): for a detection run, the size is the shorter side (detector.min_size)."""
        return self.dataset, self.image_size

    @property
    def task(self) -> str:
        return (self.results or {}).get("task") or "classification"

    @property
    def detector(self) -> Optional[str]:
        return (self.results or {}).get("model", {}).get("detector") if self.task == "detection" else None

    @property
    def paper_protocol(self) -> tuple[str, int]:
        """How the paper's runs of this task were measured: runs measured so compare with its figures."""
        return paper.DETECTION_PROTOCOL if self.task == "detection" else paper.PROTOCOL

    @property
    def cell(self) -> Any:
        """The table cell the run fills: its Variant (options dropped), with its detector for detection."""
        return (self.detector, self.variant.cell()) if self.task == "detection" else self.variant.cell()

    def describe(self, options: bool = True) -> str:
        """'resnet50 se integration=all', led by the detector for detection; `options`: with its options off the
        paper's (else the cell's description)."""
        text = (self.variant if options else self.variant.cell()).describe()
        return f"{self.detector} {text}" if self.task == "detection" else text

    def measurement(self, accuracy: str = "final") -> dict[str, float]:
        """The table metrics this run has, as recorded: params a count, gflops conv and linear
        multiply-accumulates / 1e9 (measurements() converts both to the paper's units); absent
        keys are gaps."""
        values: dict[str, float] = {}
        results, evaluation = self.results or {}, self.evaluation or {}
        if accuracy not in ACCURACIES:
            raise ValueError(f"accuracy must be one of {ACCURACIES}, got {accuracy!r}")
        chosen = results.get(accuracy) or {}
        if self.task == "detection":
            return _detection_measurement(results, chosen)
        if "val_top1" in chosen:
            values.update(top1=chosen["val_top1"], top5=chosen["val_top5"])
        elif "val" in evaluation:
            values.update(top1=evaluation["val"]["top1"], top5=evaluation["val"]["top5"])
        # The run's own counts first: eval.json's are of the same model.
        params = results.get("params", evaluation.get("params"))
        if params is not None:
            values["params"] = params
        gflops = results.get("gflops", evaluation.get("gflops"))
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


def _detection_measurement(results: dict[str, Any], chosen: dict[str, Any]) -> dict[str, float]:
    """A detection run's AP (percent) of the chosen epoch and its trainable parameters in the paper's 10^6."""
    # A figure without a value (None: no object of that size among the validation images) is a gap.
    values = {key: chosen[f"val_{key}"] for key in AP_METRICS if chosen.get(f"val_{key}") is not None}
    if results.get("params_trained") is not None:
        values["params_1e6"] = results["params_trained"] / paper.DETECTION_PARAM_UNIT
    return values


JSON_TYPES = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


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
        fix = (
            "rerun eval.py to rewrite it"
            if path.name == EVAL
            else "its run is a gap in the tables until the file is restored"
        )
        log.warning("ignoring %s: %s; %s", path, problem, fix)
        return None
    return document


def _contents_problem(document: Any, evaluation: bool) -> Optional[str]:
    """Why a parsed document cannot fill the tables (None: it can). What the tables read is read
    here once, so that a hand-edited or foreign file is one warning rather than a traceback later."""
    if not isinstance(document, dict):
        return f"it holds {JSON_TYPES.get(type(document), 'something')}, not a JSON object"
    run = Run(Path(), None if evaluation else document, document if evaluation else None)
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
    return None if evaluation else _label_problem(document)


def _label_problem(results: dict[str, Any]) -> Optional[str]:
    """Why results.json cannot say which run it is (None: it can)."""
    detection = results.get("task") == "detection"
    try:
        model, variant = results["model"], variant_from_config(results["config"])
        recorded = (model["backbone"], model["attention"], model.get("coverage"))
        described = (variant.backbone, variant.attention, variant.coverage)
        if detection:  # the detector too, and the image size is the detector's resize
            recorded, described = (model["detector"], *recorded), (results["config"]["detector"]["name"], *described)
        size = results["config"]["detector"]["min_size"] if detection else results.get("image_size")
    except Exception as error:  # missing or foreign fields (OmegaConf's errors among them)
        reason = " ".join(str(error).split())[:200]
        return f"it does not record its model as train.py does ({type(error).__name__}: {reason})"
    if recorded != described:
        detector = f"{described[0]} " if detection else ""
        return f"its model {recorded} is not the one its config describes ({detector}{variant.describe()})"
    if not isinstance(results.get("dataset"), str) or not isinstance(size, int) or isinstance(size, bool):
        return f"its dataset or {'detector.min_size' if detection else 'image_size'} is not what train.py writes"
    if detection and not isinstance(results.get("params_trained", 0), int):
        return "its params_trained is not a count"
    return None


def _newest_eval(run_dir: Path) -> Optional[dict[str, Any]]:
    found = [path for path in (run_dir / EVAL, run_dir / CHECKPOINT_DIR / EVAL) if path.is_file()]
    return _read_json(max(found, key=lambda path: path.stat().st_mtime)) if found else None


def read_run(run_dir: Path) -> Run:
    """The run in run_dir, labelled from its results.json, or (measured by eval.py alone) from
    the checkpoint its eval.json names; incomplete when neither can be read."""
    results = _read_json(run_dir / RESULTS)
    if results is not None and results.get("task") == "detection":
        # A detection run's figures are its results.json's: eval.py's eval.json recomputes the same COCO AP
        # (tests/test_detection_eval.py), and holds none of the classification figures read below.
        return Run(run_dir, results, None, variant_from_config(results["config"]), results["dataset"],
                   results["config"]["detector"]["min_size"], results.get("run_id"), results["config"])
    evaluation = _newest_eval(run_dir)
    if results is not None:
        run = Run(run_dir, results, evaluation, variant_from_config(results["config"]), results["dataset"],
                  results["image_size"], results.get("run_id"), results["config"])
        return _without_foreign_eval(run)
    if evaluation is None:
        return Run(run_dir, None, None)
    state = _checkpoint_of(run_dir, evaluation)
    if state is None:
        return Run(run_dir, None, None)
    dataset = evaluation.get("dataset") or {}
    return Run(run_dir, None, evaluation, variant_from_config(state["config"]), dataset.get("name"),
               evaluation.get("image_size"), state.get("run_id"), state["config"])


def _checkpoint_of(run_dir: Path, evaluation: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The checkpoint eval.json measured (or the run's last one, where that moved), for its config."""
    named = Path(str(evaluation.get("checkpoint") or run_dir / CHECKPOINT_DIR / LAST))
    path = named if named.is_file() else run_dir / CHECKPOINT_DIR / named.name
    try:
        state = load_checkpoint(path)
        variant_from_config(state["config"])
        return state
    except Exception as error:  # missing, damaged or foreign: the run is a gap, say why
        log.warning(
            "ignoring %s: its run has no results.json and the checkpoint it measured (%s) does not say which model "
            "it is (%s); rerun eval.py on the run's checkpoint",
            run_dir / EVAL,
            path,
            " ".join(str(error).split())[:200],
        )
        return None


def _without_foreign_eval(run: Run) -> Run:
    """The run, without an eval.json measured on another dataset or image size than it trained on."""
    evaluation = run.evaluation
    if evaluation is None or "dataset" not in evaluation:
        return run
    measured = ((evaluation["dataset"] or {}).get("name"), evaluation.get("image_size"))
    if measured == run.protocol:
        return run
    log.warning("ignoring the eval.json of %s: it measured %s at %s px, the run trained on %s at %s px; "
                "rerun eval.py without dataset overrides", run.path, *measured, *run.protocol)
    run.evaluation = None
    return run


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
            if (Path(folder) / RESULTS).is_file() or (Path(folder) / ".hydra" / "config.yaml").is_file():
                runs.append(read_run(Path(folder)))
    return runs


def _same_runs_once(runs: list[Run], notes: list[str]) -> list[Run]:
    """Each run once: a folder copied elsewhere holds the same run (its run_id), not a repeat."""
    by_id: dict[str, list[Run]] = {}
    for run in runs:
        by_id.setdefault(run.run_id or str(run.path), []).append(run)
    for run_id, copies in by_id.items():
        if len(copies) > 1:
            copies.sort(key=_finished_at)
            notes.append(f"one run (run_id {run_id}) in {len(copies)} folders, counted once from the newest, "
                         f"{copies[-1].path}: {', '.join(str(run.path) for run in copies[:-1])}")
    return [copies[-1] for copies in by_id.values()]


def measurements(runs: Iterable[Run], accuracy: str = "final") -> tuple[dict[Variant, Measured], list[str]]:
    """{table cell: what its runs measured} from the completed runs, and notes on what was set aside.

    Runs of one model (options included) on one dataset and image size are repeats (seeds): a cell
    holds all their values. Where runs of other options or datasets compete for a cell, the paper's
    protocol and options win, then the larger group; the others are named in the notes. Cells are
    Variants, and (detector, Variant) pairs for detection runs (Run.cell).
    """
    notes, groups = [], {}
    runs = list(runs)
    notes += [f"incomplete (no usable {RESULTS} or {EVAL}): {run.path}" for run in runs if not run.complete]
    for run in _same_runs_once([run for run in runs if run.complete], notes):
        groups.setdefault((run.detector, run.variant, run.protocol), []).append(run)
    by_cell: dict[Any, list[list[Run]]] = {}
    for group in groups.values():
        by_cell.setdefault(group[0].cell, []).append(group)
    measured, chosen_groups = {}, []
    for cell, candidates in by_cell.items():
        candidates.sort(
            key=lambda group: (group[0].protocol == group[0].paper_protocol, not group[0].variant.options, len(group))
        )
        chosen = candidates[-1]
        chosen_groups.append(chosen)
        measured[cell] = _measured(chosen, accuracy)
        notes += _group_notes(chosen, candidates[:-1])
    notes += options_notes(chosen_groups)
    devices = sorted(
        {(run.evaluation.get("speed") or {}).get("device") for group in chosen_groups for run in group
         if run.evaluation} - {None}
    )
    if devices:
        notes.append(f"Our speeds on {'; '.join(devices)} (eval.py); the paper's on the authors' Titan-XP machines.")
    return measured, notes


def _measured(group: list[Run], accuracy: str) -> Measured:
    """Every run's values, parameters and GFLOPs in the paper's units."""
    values: dict[str, list[float]] = {}
    for run in group:
        for key, value in run.measurement(accuracy).items():
            values.setdefault(key, []).append(value)
    if group[0].task == "detection":  # already in the paper's units (Run.measurement)
        return Measured({key: tuple(value) for key, value in values.items()}, group[0].protocol,
                        group[0].variant.options)
    if "params" in values:
        values["params"] = [count / paper.PARAM_UNIT for count in values["params"]]
    if "gflops" in values:
        # Recorded: conv and linear layers alone; the paper's counter adds BatchNorm and pooling.
        extra = count_macs(build_variant(group[0].variant), group[0].image_size)[1]
        values["gflops"] = [(gflops * 1e9 + extra) / paper.GFLOP_UNIT for gflops in values["gflops"]]
    return Measured({key: tuple(value) for key, value in values.items()}, group[0].protocol, group[0].variant.options)


def _group_notes(chosen: list[Run], set_aside: list[list[Run]]) -> list[str]:
    """What a reader of the cell should know: repeats and runs not shown (options_notes: options off the paper's)."""
    notes = []
    if len(chosen) > 1:
        seeds = ", ".join(str((run.config.get("trainer") or {}).get("seed")) for run in chosen)
        differing = _differing_keys([run.config for run in chosen]) - {"trainer.seed"}
        notes.append(f"{len(chosen)} runs of {chosen[0].describe()} (seeds {seeds}) averaged"
                     + (f"; their configs also differ in {', '.join(sorted(differing))}" if differing else "")
                     + f": {', '.join(str(run.path) for run in chosen)}")
    for group in set_aside:
        notes.append(
            f"not shown, {chosen[0].describe(options=False)} has runs closer to the paper's: {group[0].describe()} "
            f"on {group[0].dataset} at {group[0].image_size} px ({', '.join(str(run.path) for run in group)})"
        )
    return notes


def override(key: str, value: Any) -> str:
    """The command-line override that sets this attention option: 'attention.se_bias=false'."""
    return f"attention.{key}={_override_value(value)}"


def _override_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()  # Hydra reads true / false; Python's True would be a string there
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(item) for item in value) + "]"
    return str(value)


def presets_of(cell: Any) -> list[str]:
    """The experiment presets whose sweep trains this table cell with the paper's options (none for a
    detection cell: no preset trains detectors)."""
    return list(dict.fromkeys(spec.preset for spec in TABLES.values() if spec.preset and cell in spec.variants()))


def options_notes(groups: Iterable[list[Run]]) -> list[str]:
    """One note per set of attention options off the paper's that shown runs have: which runs, and the
    overrides (or presets) that train the paper's model instead. A sweep without a preset (the README's
    `train.py -m attention=emca_se,...`) trains Hu et al.'s SE with biases, for one."""
    by_options: dict[tuple, list[list[Run]]] = {}
    for group in groups:
        if group[0].variant.options:
            by_options.setdefault(group[0].variant.options, []).append(group)
    notes = []
    for options, chosen in by_options.items():
        ours = " ".join(override(key, value) for key, value in options)
        fix = " ".join(override(key, PAPER_OPTIONS[key]) for key, _ in options)
        runs = "; ".join(f"{group[0].describe(options=False)} ({', '.join(str(run.path) for run in group)})"
                         for group in chosen)
        presets = dict.fromkeys(preset for group in chosen for preset in presets_of(group[0].cell))
        sweep = f", or sweep with {' or '.join(f'+experiment={name}' for name in presets)}" if presets else ""
        notes.append(f"Not the paper's model (the cells show this one's figures), {ours} where the paper has {fix}: "
                     f"{runs}. To train the paper's, add {fix} to the command{sweep}.")
    return notes


def _differing_keys(configs: list[dict[str, Any]], prefix: str = "") -> set[str]:
    """The dotted keys whose values are not the same in every config."""
    keys = dict.fromkeys(key for config in configs for key in config)
    differing = set()
    for key in keys:
        values = [config.get(key) for config in configs]
        if all(isinstance(value, dict) for value in values):
            differing |= _differing_keys(values, f"{prefix}{key}.")
        elif any(value != values[0] for value in values):
            differing.add(prefix + key)
    return differing


def _finished_at(run: Run) -> float:
    times = [
        path.stat().st_mtime
        for path in (run.path / RESULTS, run.path / EVAL, run.path / CHECKPOINT_DIR / EVAL)
        if path.is_file()
    ]
    return max(times, default=0.0)
