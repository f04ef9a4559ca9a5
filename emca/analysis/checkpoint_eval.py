"""eval.py's work: rebuild a run's model from its checkpoint and measure everything the paper
reports about a trained model, into one eval.json.

The checkpoint carries the run's resolved configuration; the model is built from it and the
weights are loaded after emca.common.checkpoint_file.check_fingerprint, which refuses a checkpoint
whose architecture fingerprint differs from the rebuilt model. Data settings come from the same
configuration, with eval.yaml's non-null `dataset` fields and `loader` choice on top. A task=detection
run's checkpoint goes to emca.analysis.detection_eval (COCO AP), which shares this module's pieces.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from emca.analysis.eval_config import CLASSES, INDICES, LAYER, ROTATIONS, minimums
from emca.analysis.gradcam import (
    GradcamError,
    choose_layer,
    heat_maps,
    load_images,
    pick_images,
    save_gradcam,
    validation_images,
)
from emca.analysis.scales import LearnedScales, plot_scales
from emca.analysis.speed import (
    CLOCK,
    SINGLE_IMAGE_QUEUES,
    Throughput,
    batches_ahead,
    cudnn_as_trained,
    describe_device,
    describe_loading,
    time_model,
    time_pipeline,
)
from emca.common.checkpoint_file import CHECKPOINT_DIR, describe_architecture
from emca.common.files import atomic_write
from emca.data import build_loaders
from emca.data.folder import ImageList
from emca.engine.checkpoint import HISTORY
from emca.engine.distributed import DistributedContext
from emca.engine.precision import amp_dtype as parse_amp
from emca.engine.results import git_commit, library_versions
from emca.engine.tasks.classification import evaluate
from emca.models import attention_modules, coverage_name, loading
from emca.models.summary import count_parameters, measure_gflops
from emca.options import require, require_int

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"


class EvalError(ValueError):
    """A problem the user can fix (checkpoint, options, dataset mismatch), in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's contents, with the one-line errors eval.py reports for unusable files
    (emca.models.loading.read_checkpoint, shared with emca.load_model)."""
    return loading.read_checkpoint(path, EvalError, "eval.py")


def restore_model(path: Path, state: dict[str, Any], ema: bool = False) -> torch.nn.Module:
    """The run's model with the checkpoint's weights (on the CPU): the trained ones, or with `ema`
    their exponential moving average (a run trained with trainer.ema)."""
    return loading.restore_model(path, state, ema, EvalError, "drop ema=true")


def data_configs(train_cfg: dict[str, Any], cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(dataset, loader) settings: the run's, with eval.yaml's non-null dataset fields and loader."""
    dataset = dict(train_cfg["dataset"])
    dataset.update({key: value for key, value in OmegaConf.to_container(cfg.dataset).items() if value is not None})
    loader = OmegaConf.to_container(cfg.loader) if cfg.get("loader") is not None else dict(train_cfg["loader"])
    return dataset, loader


def _option(value: Any, trained: Any) -> Any:
    return trained if value is None else value


def check_options(cfg: DictConfig) -> None:
    """What eval.yaml's schema (emca/analysis/eval_config.py) cannot say, before any work: Hydra has
    checked the types, build_loaders checks the dataset options."""
    if not cfg.checkpoint:
        raise EvalError("give the checkpoint to evaluate: python eval.py checkpoint=PATH")
    require(all(degrees % 90 == 0 for degrees in cfg.rotations), "rotations", cfg.rotations, ROTATIONS, EvalError)
    for option, minimum, nullable in minimums():
        require_int(option, OmegaConf.select(cfg, option), minimum, EvalError, nullable)
    check_gradcam_options(cfg.gradcam)
    if cfg.accuracy_only and gradcam_requested(cfg.gradcam):
        raise EvalError(f"accuracy_only=true measures accuracy alone, without Grad-CAM maps: drop "
                        f"{gradcam_option(cfg.gradcam)} or accuracy_only=true")


def check_gradcam_options(options: DictConfig) -> None:
    """gradcam.*: no empty list or name, no negative position, and one way of choosing the images."""
    indices, classes = options.indices, options.classes
    require(indices is None or (len(indices) > 0 and min(indices) >= 0), "gradcam.indices", indices, INDICES,
            EvalError)
    require(classes is None or len(classes) > 0, "gradcam.classes", classes, CLASSES, EvalError)
    require(options.layer != "", "gradcam.layer", options.layer, LAYER, EvalError)
    given = [
        option
        for option, value in (("images", options.images > 0), ("classes", classes), ("indices", indices))
        if value
    ]
    if len(given) > 1:
        raise EvalError(f"gradcam.{given[0]} and gradcam.{given[1]} both choose the Grad-CAM images; give one of them")


def output_path(output: Optional[str], checkpoint: Path, ema: bool = False) -> Path:
    """Where eval.json goes (refused before any work when that is a folder): by default beside the
    checkpoint, or in the run folder for a run's checkpoints/ and checkpoints/history/ (the trainer
    replaces their generations as it saves: a file put there would not survive the next save).
    best.pt's report is eval.json (what make_tables reads), any other checkpoint's eval_<stem>.json
    (last.pt: eval_last.json, history/epoch-0003.pt: eval_epoch-0003.json), so that evaluating two
    checkpoints of a run keeps both; the EMA weights' report adds _ema (eval_ema.json,
    eval_last_ema.json), so that it does not replace the trained weights' one."""
    if not output:
        folder = checkpoint.parent
        if folder.name == HISTORY and folder.parent.name == CHECKPOINT_DIR:
            folder = folder.parent  # checkpoints/history/epoch-0003.pt: eval_epoch-0003.json in the run folder
        stem = EVAL_FILE.removesuffix(".json") + ("" if checkpoint.stem == "best" else f"_{checkpoint.stem}")
        name = f"{stem}_ema.json" if ema else f"{stem}.json"
        return (folder.parent if folder.name == CHECKPOINT_DIR else folder) / name
    path = Path(output).expanduser().resolve()
    require(
        not path.is_dir(), "output", Path(output), f"a file path, not a folder (e.g. {path / EVAL_FILE})", EvalError
    )
    return path


def speed_workers(workers: Optional[int]) -> int:
    """speed.workers; null: one loader worker per CPU this process may run on, at most 8."""
    if workers is not None:
        return workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, cpus)


def measured(cfg: DictConfig) -> tuple[list[int], bool, bool]:
    """(rotations, learned scales?, speeds?) that this evaluation measures: accuracy_only=true
    keeps the plain pass alone, the one measurement whose time no option can bound."""
    if cfg.accuracy_only:
        return [0], False, False
    return [0] + [degrees for degrees in cfg.rotations if degrees % 360], cfg.learned_scales, cfg.speed.enabled


def precision(cfg: DictConfig, trainer_cfg: dict[str, Any]) -> tuple[str, Optional[torch.dtype], bool]:
    """(amp, its autocast dtype, channels_last): eval.yaml's, or null: as the run trained."""
    amp = str(_option(cfg.amp, trainer_cfg.get("amp", "off")))
    try:
        amp_dtype = parse_amp(amp)
    except ValueError as error:
        raise EvalError(str(error)) from None
    return amp, amp_dtype, bool(_option(cfg.channels_last, trainer_cfg.get("channels_last", False)))


def evaluate_checkpoint(cfg: DictConfig, ctx: DistributedContext) -> Optional[dict[str, Any]]:
    """Measure, write eval.json (and the figures) and return its content; None on ranks other than 0.
    A task=detection run's checkpoint is measured by emca.analysis.detection_eval (COCO AP)."""
    check_options(cfg)
    given = Path(cfg.checkpoint).expanduser()  # as given in the errors, not through the checkpoints/ symlink
    checkpoint = given.resolve()
    # Named from the path as given (run/checkpoints/...), not from the generation folder it leads to.
    output = output_path(cfg.output, Path(os.path.abspath(given)), cfg.ema)
    state = read_checkpoint(given)
    if state["config"].get("task") == "detection":
        # Imported here: detection_eval builds on this module's pieces (EvalError, data_configs, write_report).
        from emca.analysis.detection_eval import evaluate_detection

        return evaluate_detection(cfg, ctx, state, checkpoint, output)
    trainer_cfg = state["config"].get("trainer", {})
    amp, amp_dtype, channels_last = precision(cfg, trainer_cfg)
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    model = restore_model(checkpoint, state, cfg.ema).to(ctx.device, memory_format=memory_format).eval()

    dataset_cfg, loader_cfg = data_configs(state["config"], cfg)
    seed = trainer_cfg.get("seed", 0)
    data = validation_data(state, dataset_cfg, loader_cfg, ctx, channels_last, seed)
    gradcam_plan = (
        plan_gradcam(model, dataset_cfg, data.classes, cfg.gradcam) if gradcam_requested(cfg.gradcam) else None
    )
    rotations, learned_scales, speeds = measured(cfg)
    scales = LearnedScales(model, ctx.device) if learned_scales and attention_modules(model) else None
    if ctx.is_main:
        log.info(f"evaluating {checkpoint} on {data.num_val} {dataset_cfg['name']} validation images "
                 f"(rotations {rotations}) with {ctx.world_size} process(es) on {ctx.device}")
    metrics = evaluate(model, data.val, ctx, rotations, amp_dtype,
                       while_unrotated=scales.recording if scales else contextlib.nullcontext)
    if scales is not None:
        scales.reduce(ctx)
        scales.remove()
    if not ctx.is_main:
        return None

    report = base_report(checkpoint, state, dataset_cfg, loader_cfg, data, ctx, metrics, cfg.ema)
    report.update(accuracy_only=cfg.accuracy_only, amp=amp, channels_last=channels_last,
                  params=count_parameters(model), gflops=measure_gflops(model, evaluated_size(dataset_cfg)),
                  learned_scales=scales.statistics() if scales else None)
    if scales is not None:
        title = f"Learned scales, {describe_architecture(state['fingerprint'])}, {data.num_val} val images"
        report["learned_scales_plot"] = str(
            plot_scales(report["learned_scales"], output.with_name(f"{output.stem}_scales.png"), title)
        )
    if speeds:
        report["speed"] = measure_speeds(
            model, cfg.speed, dataset_cfg, loader_cfg, ctx.device, channels_last=channels_last, amp_dtype=amp_dtype,
            seed=seed, classes=data.classes, num_val=data.num_val,
            deterministic=bool(trainer_cfg.get("deterministic", False)),
        )
    if gradcam_plan is not None:
        report["gradcam"] = gradcam_maps(
            model, gradcam_plan, dataset_cfg, ctx.device, channels_last, output.with_name(f"{output.stem}_gradcam")
        )
    return write_report(report, output)


def write_report(report: dict[str, Any], output: Path) -> dict[str, Any]:
    """Stamp the report (when, which code, which libraries), write it atomically and return it with
    its path."""
    report.update(
        created=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        git=git_commit(),
        versions=library_versions(),
    )
    if output.exists():
        log.info(f"replacing {output}")
    atomic_write(output, lambda file: file.write((json.dumps(report, indent=2) + "\n").encode()))
    report["output"] = str(output)
    return report


def validation_data(state: dict[str, Any], dataset_cfg: dict[str, Any], loader_cfg: dict[str, Any],
                    ctx: DistributedContext, channels_last: bool, seed: int):
    """The validation loader of this rank. Only val/ is read; labels index the run's class names
    (kept in its checkpoints), and a checkpoint without them falls back to val/'s class folders,
    which the class-count check guards."""
    data = build_loaders(dataset_cfg, loader_cfg, rank=ctx.rank, world_size=ctx.world_size, device=ctx.device,
                         channels_last=channels_last, seed=seed, train=False, classes=state.get("classes"))
    predicted = state["fingerprint"]["architecture"]["num_classes"]
    if data.num_classes != predicted:
        raise EvalError(
            f"dataset {dataset_cfg['name']} at {dataset_cfg['root']} has {data.num_classes} classes but the "
            f"checkpoint's model predicts {predicted} ({describe_architecture(state['fingerprint'])})"
        )
    return data


def evaluated_size(dataset_cfg: dict[str, Any]) -> int:
    """The side of the validation images: dataset.val_image_size, or image_size when that is null
    (GFLOPs, the model-only speed and Grad-CAM's layer choice are at this size too)."""
    return dataset_cfg.get("val_image_size") or dataset_cfg["image_size"]


def base_report(checkpoint: Path, state: dict[str, Any], dataset_cfg: dict[str, Any], loader_cfg: dict[str, Any],
                data, ctx: DistributedContext, metrics: dict, ema: bool = False) -> dict[str, Any]:
    """eval.json's description of what was evaluated, and the accuracies (the rest is filled in after)."""
    image_size = evaluated_size(dataset_cfg)
    plain = metrics[0]
    return {
        "checkpoint": str(checkpoint),
        "checkpoint_epoch": (state.get("progress") or {}).get("epoch"),
        "weights": "ema" if ema else "trained",
        "accuracy_only": None,
        "model": state["fingerprint"]["architecture"],
        "dataset": {
            "name": dataset_cfg["name"],
            "root": str(dataset_cfg["root"]),
            "image_size": image_size,
            "val_resize": dataset_cfg.get("val_resize"),
            "num_val": data.num_val,
            "num_classes": data.num_classes,
        },
        "loader": loader_cfg["name"],
        "device": describe_device(ctx.device),
        "world_size": ctx.world_size,
        "amp": None,
        "channels_last": None,
        "val": {"top1": plain.top1, "top5": plain.top5, "loss": plain.loss, "images": plain.count},
        "rotation": {str(degrees): {"top1": m.top1, "top5": m.top5, "loss": m.loss} for degrees, m in metrics.items()},
        "params": None,
        "gflops": None,
        "image_size": image_size,
        "learned_scales": None,
        "learned_scales_plot": None,
        "speed": None,
        "gradcam": None,
    }


def measure_speeds(model, speed_cfg, dataset_cfg, loader_cfg, device, *, channels_last: bool,
                   amp_dtype: Optional[torch.dtype], seed: int, classes, num_val: int,
                   deterministic: bool) -> dict[str, Any]:
    """FPS, FPS-dagger and FPS-double-dagger on this process' device alone, under the cuDNN settings
    of the run's training (trainer.deterministic: `deterministic`), each with how it was timed."""
    val_loader = functools.partial(speed_loader, dataset_cfg, device, channels_last, seed, classes)
    warmup, batch, workers = speed_cfg.warmup, speed_cfg.batch, speed_workers(speed_cfg.workers)
    single_cfg = {**loader_cfg, **SINGLE_IMAGE_QUEUES}
    with cudnn_as_trained(deterministic) as cudnn:
        log.info("speed: cuDNN benchmark=%s deterministic=%s, as trained (trainer.deterministic=%s)",
                 cudnn["benchmark"], cudnn["deterministic"], deterministic)
        single = "the rest of the validation set" if speed_cfg.single_images is None else speed_cfg.single_images
        log.info("speed: FPS (batch 1, %s images after %d warm-up; %s)", single, warmup,
                 describe_loading(single_cfg, speed_cfg.single_workers))
        fps = time_pipeline(model, val_loader(single_cfg, 1, speed_cfg.single_workers), device, batch_size=1,
                            workers=speed_cfg.single_workers, warmup=warmup, max_images=speed_cfg.single_images,
                            amp_dtype=amp_dtype)
        log.info("speed: FPS-dagger (model only, %d batches of %d after %d warm-up)",
                 speed_cfg.model_iterations, batch, speed_cfg.model_warmup)
        fps_model = time_model(model, device, batch_size=batch, image_size=evaluated_size(dataset_cfg),
                               warmup=speed_cfg.model_warmup, iterations=speed_cfg.model_iterations,
                               channels_last=channels_last, amp_dtype=amp_dtype)
        log.info("speed: FPS-double-dagger (validation pass, batch %d; %s)", batch,
                 describe_loading(loader_cfg, workers))
        # Synthetic batches are all of speed.batch; a folder's last batch holds the rest of its images.
        last_batch = 0 if loader_cfg["name"] == "synthetic" else num_val % batch
        fps_pipeline = time_pipeline(model, val_loader(loader_cfg, batch, workers), device, batch_size=batch,
                                     workers=workers, warmup=warmup, amp_dtype=amp_dtype, last_batch=last_batch)
    return {
        "device": describe_device(device),
        "cudnn": {**cudnn, "as_trained": f"trainer.deterministic={str(deterministic).lower()}",
                  "used": device.type == "cuda" and torch.backends.cudnn.is_available()},
        "clock": CLOCK,
        "fps": timed(fps, single_cfg),
        "fps_model": {**fps_model.as_dict(), "ahead": None,
                      "timing": "the model alone on one random batch resident on the device: no loader"},
        "fps_pipeline": timed(fps_pipeline, loader_cfg),
    }


def timed(speed: Throughput, loader_cfg: dict[str, Any]) -> dict[str, Any]:
    """A pipeline speed as eval.json holds it: with the batches its loader read and decoded ahead of the
    model (`ahead`) and how its batches reached the model (`timing`)."""
    return {**speed.as_dict(), "ahead": batches_ahead(loader_cfg, speed.workers),
            "timing": describe_loading(loader_cfg, speed.workers)}


def speed_loader(dataset_cfg, device, channels_last, seed, classes, loader_cfg, batch_size: int, workers: int):
    """A single-process validation loader of `batch_size` and `workers` for a speed measurement."""
    settings = {**dataset_cfg, "batch_size": batch_size, "workers": workers}
    return build_loaders(settings, loader_cfg, rank=0, world_size=1, device=device, channels_last=channels_last,
                         seed=seed, train=False, classes=classes).val


def gradcam_requested(options: DictConfig) -> bool:
    return options.images > 0 or bool(options.classes) or bool(options.indices)


def gradcam_option(options: DictConfig) -> str:
    """The option that asked for Grad-CAM maps, as given (e.g. gradcam.images=4), for the errors."""
    return next(f"gradcam.{key}={options[key]}" for key in ("images", "classes", "indices") if options[key])


def plan_gradcam(model, dataset_cfg, classes, options: DictConfig) -> tuple[ImageList, list[int], str]:
    """(validation images, chosen positions, layer name): chosen on every rank before the long
    passes, so that a class or index that is not there fails at once, and on all ranks together."""
    try:
        images = validation_images(dataset_cfg, classes)
        positions = pick_images(images, options.images, options.classes, options.indices)
        layer = choose_layer(model, evaluated_size(dataset_cfg), options.layer)[0]
    except GradcamError as error:
        raise EvalError(error.spelled("gradcam.", "=")) from None
    return images, positions, layer


def gradcam_maps(model, plan, dataset_cfg, device, channels_last, out_dir: Path) -> dict[str, Any]:
    """Heat maps of the planned images (of the whole validation set, whatever the rank), one PNG each."""
    images, positions, layer = plan
    chosen = load_images(images, positions, dataset_cfg, device, channels_last)
    maps = heat_maps(model, chosen, layer)
    paths = save_gradcam(chosen, maps, out_dir)
    names = chosen.class_names
    return {
        "target_layer": maps.layer,
        "layer_extent": list(maps.extent),
        "indices": chosen.positions,
        "labels": [names[int(label)] for label in chosen.labels],
        "predictions": [names[p] for p in maps.predictions],
        "sources": chosen.paths,
        "images": [str(path) for path in paths],
    }


SPEED_NAMES = {"fps": "FPS", "fps_model": "FPS†", "fps_pipeline": "FPS‡"}


def _batches(speed: dict[str, Any]) -> str:
    cut = (
        f" (warm-up cut from {speed['warmup_requested']})"
        if speed["warmup_batches"] < speed["warmup_requested"]
        else ""
    )
    return f"{speed['warmup_batches']} warm-up + {speed['timed_batches']} timed batches{cut}"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "es" if noun.endswith("ch") else "s")


def _ahead(speed: dict[str, Any], noun: str) -> str:
    """What its loader read and decoded while the model ran, as the speed line says it."""
    return f"{_count(speed['ahead'], noun)} decoded ahead" if speed["ahead"] else "none decoded ahead"


def _cudnn(cudnn: dict[str, Any]) -> str:
    """The cuDNN settings the speeds ran under, as the summary says them."""
    state = {True: "on", False: "off"}
    flags = (f"cuDNN benchmark {state[cudnn['benchmark']]}, deterministic {state[cudnn['deterministic']]} "
             f"as trained ({cudnn['as_trained']})")
    return flags if cudnn["used"] else f"{flags}, unused on this device"


def format_summary(report: dict[str, Any]) -> str:
    """What eval.py prints: one line per measurement."""
    if report.get("task") == "detection":
        from emca.analysis.detection_eval import format_detection_summary  # imported here as in evaluate_checkpoint

        return format_detection_summary(report)
    model, dataset = report["model"], report["dataset"]
    coverage = model.get("coverage")
    lines = [
        f"checkpoint  {report['checkpoint']} (epoch {report['checkpoint_epoch']})",
        f"model       {model['backbone']} attention={model['attention']}"
        + (f" coverage={coverage_name(coverage['stages'], coverage['blocks'])}" if coverage else "")
        + f", {model['num_classes']} classes",
        f"data        {dataset['name']} validation, {dataset['num_val']} images at {dataset['image_size']} px via "
        f"{report['loader']}; "
        f"{report['world_size']} process(es), amp {report['amp']}",
        f"accuracy    top-1 {report['val']['top1']:.2f}%  top-5 {report['val']['top5']:.2f}%  loss "
        f"{report['val']['loss']:.4f}",
        f"complexity  {report['params'] / 1e6:.3f} M parameters (sum of numel), {report['gflops']:.3f} GFLOPs at "
        f"{report['image_size']} px",
    ]
    if report.get("accuracy_only"):
        lines.append("skipped     rotations, learned scales, speeds (accuracy_only=true)")
    else:
        lines.insert(-1, "rotation    "
                     + "  ".join(f"{degrees}°: {m['top1']:.2f}%" for degrees, m in report["rotation"].items())
                     + "  (top-1, clockwise)")
    speed = report.get("speed")
    if speed:
        fps, fps_model, fps_pipeline = speed["fps"], speed["fps_model"], speed["fps_pipeline"]
        lines.append(
            f"speed       FPS {fps['images_per_second']:.1f} (batch 1, {_count(fps['workers'], 'worker')}, "
            f"{fps['images']} images after {fps['warmup_batches']} warm-up, {_ahead(fps, 'image')})  "
            f"FPS† {fps_model['images_per_second']:.1f} (model only, batch {fps_model['batch_size']})  "
            f"FPS‡ {fps_pipeline['images_per_second']:.1f} (validation pass, batch {fps_pipeline['batch_size']}, "
            f"{_count(fps_pipeline['workers'], 'worker')}, {_ahead(fps_pipeline, 'batch')})"
        )
        lines.append(f"            on {speed['device']}; {_cudnn(speed['cudnn'])}")
        lines += [f"            {name} from few batches, a rough figure: {_batches(speed[key])}"
                  for key, name in SPEED_NAMES.items() if speed[key]["few_batches"]]
    for row in report.get("learned_scales") or []:
        lines.append(
            f"scales      stage {row['stage']} {row['module']}: mean {row['mean']:.3f}  variance {row['variance']:.4f} "
            " "
            f"below 0.5 {100 * row['below_half']:.1f}%  zeros {100 * row['zeros']:.1f}%  ({row['channels']} channels)"
        )
    if report.get("gradcam"):
        gradcam = report["gradcam"]
        lines.append(f"grad-cam    {len(gradcam['images'])} map(s) at {gradcam['target_layer']} "
                     f"({'x'.join(map(str, gradcam['layer_extent']))}) in {Path(gradcam['images'][0]).parent}")
    lines.append(f"wrote       {report['output']}")
    return "\n".join(lines)
