"""The config schemas: train's (every Hydra group typed by a dataclass), model_summary's, export's
and (from emca/analysis/eval_config.py) eval's, registered in Hydra's ConfigStore, so that a misspelt
key or a wrong type fails at start-up (in one line from the entry points: emca/cli.py). A well-typed
but impossible value (optimizer.lr=-1, dataset.workers=-1) is refused where the option is read, in one
line naming the option, the value and what is accepted (emca/options.py).

configs/train.yaml names `train_schema` first in its defaults list; the group YAML files
(configs/<group>/*.yaml) are then merged into the typed nodes below and validated field by field.
The `attention` group has no YAML files: its choices are registered here from the attention table.
Importing this module registers the schemas and the resolvers configs/train.yaml uses.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from emca.analysis import eval_config
from emca.analysis.tables import TABLES
from emca.data.config import DatasetConfig, LoaderConfig
from emca.engine.distributed import env_rank, scratch_run_dir
from emca.engine.optim import LossName, NoWeightDecay, OptimizerName  # noqa: F401  (where optim.py reads them)
from emca.engine.tasks import TASKS
from emca.engine.trackers.config import LoggerConfig
from emca.layers.create_attn import ATTENTIONS
from emca.models import coverage_name
from emca.models.config import AttentionConfig, BackboneConfig, CoverageConfig, DetectorConfig, attention_choices


class AmpMode(Enum):
    off = "off"  # float32 throughout (write it quoted in YAML: a bare `off` is the boolean false)
    bf16 = "bf16"  # autocast to bfloat16, no loss scaling needed
    fp16 = "fp16"  # autocast to float16 with a GradScaler


class LrSchedule(Enum):
    step = "step"  # multiply by gamma at each milestone (the paper: x0.1 at epochs 30, 60, 90)
    cosine = "cosine"  # cosine decay from lr to 0 over the epochs after warm-up


class ClipMode(Enum):
    norm = "norm"  # scale all gradients so that their global L2 norm is at most trainer.clip_grad
    value = "value"  # clamp every gradient element to [-clip_grad, clip_grad]
    agc = "agc"  # timm's adaptive gradient clipping (unit-wise, relative to the weight norm)


class BestMetric(Enum):
    val_top1 = "val_top1"  # the trained weights' validation top-1
    ema_val_top1 = "ema_val_top1"  # the EMA weights' (needs trainer.ema.decay)
    val_bbox_ap = "val_bbox_ap"  # task=detection: the trained weights' COCO box AP
    ema_val_bbox_ap = "ema_val_bbox_ap"  # task=detection: the EMA weights'


class MixupMode(Enum):
    batch = "batch"  # one mixing factor and one choice of mixup / cutmix per batch (timm's default)
    pair = "pair"  # per pair of images (element i with element B-1-i)
    elem = "elem"  # per image


@dataclass
class OptimizerConfig:
    """The optimisation recipe: the optimizer, its learning-rate schedule and the loss."""

    name: OptimizerName = OptimizerName.sgd
    # Learning rate for a global batch of lr_scale_batch images.
    lr: float = 0.1
    # Linear scaling rule: the rate used is lr * dataset.batch_size / lr_scale_batch; null: lr as given.
    lr_scale_batch: Optional[int] = 256
    # SGD only.
    momentum: float = 0.9
    nesterov: bool = False
    # AdamW and LAMB only.
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    # 1e-6: timm's LAMB default (torch's AdamW default is 1e-8).
    eps: float = 1e-6
    weight_decay: float = 1e-4
    # Parameter kinds trained without weight decay: any of bn, bias, srm.
    no_weight_decay: List[NoWeightDecay] = field(default_factory=list)
    schedule: LrSchedule = LrSchedule.step
    # Step schedule: where lr is multiplied by gamma, as fractions of trainer.epochs, each rounded
    # to a whole epoch (0.3, 0.6, 0.9 of 100 epochs = epochs 30, 60, 90).
    milestones: List[float] = field(default_factory=lambda: [0.3, 0.6, 0.9])
    gamma: float = 0.1
    # Linear warm-up from ~0 to lr over this many epochs (counted per iteration), then the schedule.
    warmup_epochs: int = 0
    # Or over this many iterations (MMDetection's warmup_iters, e.g. 500); 0: warmup_epochs decides.
    warmup_steps: int = 0
    label_smoothing: float = 0.0
    loss: LossName = LossName.ce
    # bce only: targets above this value become 1, the others 0 (timm's target_threshold; RSB: 0.2); null: kept.
    bce_target_threshold: Optional[float] = None


@dataclass
class EmaConfig:
    """An exponential moving average of the weights (and BatchNorm statistics), timm's ModelEmaV3,
    validated beside the trained weights every epoch and saved in every checkpoint."""

    # Weight of the old average at each update, e.g. 0.9998; null: no EMA.
    decay: Optional[float] = None
    # Update after every N optimizer steps.
    every: int = 1
    # timm's decay warm-up: min(decay, 1 - (1 + n)^-warmup_power) at update n, so early averages
    # forget the random initialisation quickly.
    warmup: bool = False
    warmup_power: float = 0.75
    # The average copies the weights during the first N epochs (torchvision's recipe: its lr warm-up).
    copy_epochs: int = 0


@dataclass
class MixupConfig:
    """Mixup / CutMix on each training batch (timm's Mixup); optimizer.label_smoothing is folded into
    the mixed targets. Train top-1 counts a prediction correct when it is the mixed target's largest class."""

    # Beta(alpha, alpha) mixing factor; 0: off.
    mixup_alpha: float = 0.0
    # Beta(alpha, alpha) box area for CutMix; 0: off.
    cutmix_alpha: float = 0.0
    # Probability that a batch is mixed at all.
    prob: float = 1.0
    # With both on: probability of CutMix instead of mixup.
    switch_prob: float = 0.5
    mode: MixupMode = MixupMode.batch


@dataclass
class TrainerConfig:
    # Defaults to the dataset's schedule length (ImageNet 100).
    epochs: int = "${dataset.epochs}"  # type: ignore[assignment]
    # auto: cuda:LOCAL_RANK when CUDA is available, else cpu.
    device: str = "auto"
    amp: AmpMode = AmpMode.off
    channels_last: bool = False
    # torch.compile the training model (evaluation runs the eager model).
    compile: bool = False
    seed: int = 0
    # Deterministic algorithms only: with it, a resumed run ends bit-identical to an uninterrupted one.
    deterministic: bool = False
    # Convert BatchNorm to SyncBatchNorm under DDP.
    sync_bn: bool = False
    # null: start fresh (refused when the run folder already holds a run);
    # auto: continue from the run folder's checkpoints/last.pt if there is one; PATH: from that file.
    resume: Optional[str] = None
    # Seconds a collective waits for the other DDP ranks before every rank fails with one line (a
    # stopped, hung or dead rank), on NCCL's process group and gloo's alike; PyTorch's own defaults are
    # 10 minutes for NCCL and 30 for gloo (torch/distributed/constants.py).
    dist_timeout_s: float = 1800.0
    # Validate every N epochs (and always after the last).
    eval_every: int = 1
    # Log training loss / top-1 / lr / images/s every N steps.
    log_every: int = 20
    # And a line after the first step and then at least every N seconds of wall time, whatever log_every
    # says, so that a pipe, a log file or a batch job is never silent for long (rank 0's figures alone).
    log_every_s: float = 30.0
    # Under DDP the ranks agree on a stop signal (one small collective over the host group, which every
    # rank's host must reach) after every N-th step of an epoch and after every step line (log_every,
    # the epoch's last step): the stop takes effect, and last.pt is saved, at the first such step after
    # the signal. 10: at 0.1-0.3 s a step on a GPU the save starts within ~3 s, well inside a SLURM
    # --signal lead, Kubernetes' 30 s grace and emca.launch's --shutdown-timeout, while 9 steps in 10 run
    # without the rendezvous. A single process reads its own flag after every step (no collective).
    stop_check_every: int = 10
    # Cap on training steps per epoch, for quick runs and tests; null: the whole epoch.
    max_steps_per_epoch: Optional[int] = None
    # Gradient accumulation: each optimizer step's global batch (dataset.batch_size) runs as this
    # many micro-batches per rank, all-reduced once; the lr scaling and the schedule count optimizer steps.
    accumulate: int = 1
    # Gradient clipping threshold (after AMP's unscale); null: no clipping.
    clip_grad: Optional[float] = None
    clip_mode: ClipMode = ClipMode.norm
    ema: EmaConfig = field(default_factory=EmaConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    # Which validation top-1 picks checkpoints/best.pt.
    best_metric: BestMetric = BestMetric.val_top1
    # Keep the last N completed epochs' weights (model and EMA, no optimizer state) as
    # checkpoints/history/epoch-NNNN.pt, e.g. for weight averaging; 0: no history, only last.pt and best.pt.
    keep_last_n: int = 0


@dataclass
class ModelInitConfig:
    """Where a new run's initial weights come from (trainer.resume continues a run instead)."""

    # A train.py checkpoint or a state_dict file (e.g. a torchvision ResNet's): the tensors whose names
    # the model has are loaded (their shapes must agree), the others keep their initialisation.
    init_from: Optional[str] = None
    # Modules (name prefixes) not taken from init_from, e.g. [fc] to fine-tune on another number of classes.
    init_exclude: List[str] = field(default_factory=list)


# What a run trains (emca/engine/tasks): one choice per task of its table.
TaskName = Enum("TaskName", {name: name for name in TASKS})


@dataclass
class TrainConfig:
    backbone: BackboneConfig = MISSING
    attention: AttentionConfig = MISSING
    coverage: CoverageConfig = MISSING
    dataset: DatasetConfig = MISSING
    loader: LoaderConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    model: ModelInitConfig = field(default_factory=ModelInitConfig)
    task: TaskName = TaskName.classification
    # task=detection: the detector around the backbone (configs/detector); null for classification.
    detector: Optional[DetectorConfig] = None


@dataclass
class SummaryConfig:
    """scripts/model_summary.py (configs/summary.yaml): the model groups of TrainConfig and the input
    it is measured at."""

    backbone: BackboneConfig = MISSING
    attention: AttentionConfig = MISSING
    coverage: CoverageConfig = MISSING
    # ImageNet's 1,000-way head and 224 px: what the paper's parameter counts and GFLOPs are for.
    num_classes: int = 1000
    image_size: int = 224


class ExportFormat(Enum):
    onnx = "onnx"  # ONNX Runtime and the other ONNX consumers
    torchscript = "torchscript"  # torch.jit.load, C++ included
    exported_program = "exported_program"  # torch.export.load (.pt2)


MIN_OPSET = 18  # the dynamo-based exporter's lowest


@dataclass
class ExportConfig:
    """scripts/export.py (configs/export.yaml): the checkpoint, the format and how the artefact is checked."""

    # Required: path to a train.py checkpoint (checkpoints/best.pt or last.pt).
    checkpoint: Optional[str] = None
    format: ExportFormat = ExportFormat.onnx
    # null: beside the checkpoint (the run folder for <run>/checkpoints/*.pt).
    output: Optional[str] = None
    # true: the EMA weights of a run trained with trainer.ema.
    ema: bool = False
    # null: the run's validation crop (dataset.val_image_size, else dataset.image_size).
    image_size: Optional[int] = field(default=None, metadata={"minimum": 1})
    # format=onnx: the ONNX opset (18: the exporter's own, read by ONNX Runtime >= 1.14).
    opset: int = field(default=MIN_OPSET, metadata={"minimum": MIN_OPSET})
    # The artefact is reloaded (ONNX Runtime, torch.jit.load, torch.export.load) and run on a batch of
    # 2 and a batch of 3 random images beside the PyTorch model; it is written only if the largest
    # |artefact - PyTorch| is at most tolerance * max(1, largest |PyTorch logit|). Float32 kernels that
    # fuse or reorder operations (ONNX Runtime) differ by ~1e-6 of the logits; a wrong export (a gate
    # lost, a batch size baked in) by the logits' own order.
    tolerance: float = 1.0e-4


@dataclass
class PublishConfig:
    """scripts/publish.py (configs/publish.yaml): the run, the folder written, which weights, the model
    card's fields and the Hub repository."""

    # Required: a completed run's folder (train.py's, holding results.json and checkpoints/).
    run: Optional[str] = None
    # Required: the folder to write: new, empty, or one published before (its files are replaced).
    out: Optional[str] = None
    # The checkpoint of <run>/checkpoints/ to publish: best.pt, last.pt or history/epoch-0003.pt.
    checkpoint: str = "best.pt"
    # true: the EMA weights of a run trained with trainer.ema.
    ema: bool = False
    # The card's figures are eval.py's of these weights (its eval.json); false: publish weights eval.py
    # has not measured, with the trainer's validation top-1 / top-5 and no rotations or speeds.
    require_eval: bool = True
    # The card's licence, a Hugging Face Hub identifier (apache-2.0, mit, cc-by-nc-4.0, other, ...).
    license: str = "apache-2.0"
    # The card's datasets (Hub ids); null: the run's dataset (imagenet as the Hub's imagenet-1k).
    datasets: Optional[List[str]] = None
    # A Hub model repository (user/name) to upload the folder to, created if missing: needs a token
    # (HF_TOKEN or `hf auth login`) and the network.
    push: Optional[str] = None
    # With push: a repository created by it is private.
    private: bool = False


def _run_dir(default: str) -> str:
    return default if env_rank() == 0 else scratch_run_dir()


# A sweep job's folder name: at most this many characters (longer ones are cut, with a hash of the whole).
SWEEP_NAME_MAX = 80


def _swept_keys(sweep_dir: str, sweeper=None) -> Optional[set]:
    """The keys that take more than one value in the sweep: as recorded in <sweep_dir>/multirun.yaml
    (command-line sweeps and hydra.sweeper.params) by Hydra's basic sweeper; where that file is absent
    (Optuna's sweeper writes none), the sweeps of `sweeper`'s params (the job's hydra.sweeper: a search
    space given on the command line reaches the job as values alone); None when neither is there."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep

    def params(node) -> list[str]:
        return [f"{k}={v}" for k, v in (node.get("params") or {}).items()]

    recorded = Path(sweep_dir) / "multirun.yaml"
    try:
        if recorded.is_file():
            sweep = OmegaConf.load(recorded).hydra
            # The command line replaces a preset's sweeper params for the same key (Hydra's BasicSweeper).
            lines = [*params(sweep.sweeper), *sweep.overrides.task]
        else:
            lines = params(sweeper) if sweeper is not None else []
        overrides = {o.key_or_group: o for o in OverridesParser.create().parse_overrides(lines)}
    except Exception:  # a multirun.yaml or params it cannot parse
        return None
    if not overrides:
        return None
    # interval(...), tag(log, interval(...)), range(...): Optuna's distributions, one value per trial.
    return {key for key, o in overrides.items()
            if o.is_sweep_override() and not (isinstance(o.value(), ChoiceSweep) and len(o.value().list) < 2)}


def sweep_job_name(num, overrides, exclude_keys=(), swept_keys=None, kv_sep="-", item_sep="__",
                   max_len=SWEEP_NAME_MAX) -> str:
    """`<num>_<key-value__...>` from a sweep job's overrides: those of swept_keys when they are known
    (an empty set: `<num>` alone; None: every override), none of exclude_keys, '+'/'~' prefixes
    dropped, '/' as '.', any other character unsafe in a file name as '-'; cut to max_len with a
    short hash of the full name."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    items = []
    for override in OverridesParser.create().parse_overrides([str(line) for line in overrides]):
        group = override.key_or_group
        if group in exclude_keys or (swept_keys is not None and group not in swept_keys):
            continue
        key = override.get_key_element().lstrip("+~").replace("/", ".")
        items.append(f"{key}{kv_sep}{_value_text(override)}")
    # Only characters a Hydra override takes unquoted (eval.py checkpoint=<folder>/...): no '=' or ','.
    name = re.sub(r"[^\w.-]", "-", f"{num}_{item_sep.join(sorted(items))}" if items else str(num),
                  flags=re.ASCII)
    if len(name) > max_len:
        name = f"{name[:max_len - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


def _value_text(override) -> str:
    """An override's value as written, but a float of more than 4 significant digits (an Optuna trial's
    0.05111023492152638) in 4 (0.05111): the exact value is in the run's .hydra/overrides.yaml."""
    value = override.value()
    if isinstance(value, float) and math.isfinite(value) and float(f"{value:.4g}") != value:
        return f"{value:.4g}"
    return override.get_value_element_as_str()


def _sweep_subdir(num, *, _root_) -> str:
    hydra = _root_.hydra
    options = hydra.job.config.override_dirname
    return sweep_job_name(num, hydra.overrides.task, set(options.exclude_keys),
                          _swept_keys(hydra.sweep.dir, hydra.get("sweeper")), options.kv_sep, options.item_sep)


def _attentions(table: str = "") -> str:
    if not table:
        return ",".join(ATTENTIONS)
    if table not in TABLES:
        raise ValueError(f"${{emca.attentions:{table}}}: no such table; name one of {sorted(TABLES)} or none")
    return ",".join(dict.fromkeys(variant.attention for variant in TABLES[table].variants()))


def register() -> None:
    """Register the schemas (train's, summary's, export's, eval's) and the resolvers configs/train.yaml
    uses (idempotent)."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="summary_schema", node=SummaryConfig)
    store.store(name="export_schema", node=ExportConfig)
    store.store(name="publish_schema", node=PublishConfig)
    eval_config.register()  # eval.py registers it alone (without torch); here for every other composer
    # The `attention` group's choices come from the attention table, not from YAML files.
    for name, node in attention_choices().items():
        store.store(group="attention", name=name, node=node)
    # Non-zero torchrun ranks get a scratch job folder (see emca.engine.distributed).
    OmegaConf.register_new_resolver("emca.run_dir", _run_dir, replace=True)
    # A sweep list of attentions: every one of the table (${emca.attentions:}, configs/experiment/ca_all.yaml) or
    # a paper table's (${emca.attentions:table5}).
    OmegaConf.register_new_resolver("emca.attentions", _attentions, replace=True)
    # A sweep job's folder name from its swept overrides (configs/train.yaml's hydra.sweep.subdir).
    OmegaConf.register_new_resolver("emca.sweep_subdir", _sweep_subdir, replace=True)
    # coverage.name, derived from coverage.stages / coverage.blocks (emca/models/config.py).
    OmegaConf.register_new_resolver("emca.coverage_name", coverage_name, replace=True)


register()
