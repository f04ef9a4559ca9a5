"""The training run: build everything from the config, resume, train and validate epoch by epoch,
checkpoint after every epoch, write results.json once the run is complete.

Checkpoints carry the position to continue from (epoch, step within it) and the random-number
state at the start of that epoch; the loaders derive each epoch's order and augmentation from
(seed, epoch) alone. So a resumed run replays exactly what the uninterrupted run would have done,
and with trainer.deterministic=true on CPU ends with bit-identical weights.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import itertools
import json
import logging
import math
import sys
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from emca.analysis.evaluation import evaluate
from emca.data import DatasetError, build_loaders
from emca.data.config import describe_augmentation
from emca.common.checkpoint_file import CheckpointError, architecture_fingerprint, load_checkpoint
from emca.engine.checkpoint import CheckpointStore, describe_history
from emca.engine.compatibility import check_resume_config
from emca.engine.distributed import (DistributedContext, is_collective_failure, setup_distributed, shared_run_dir,
                                     silence_non_main_logging)
from emca.engine.ema import build_weight_average
from emca.engine.initialisation import initialise_from
from emca.engine.metrics import Metrics, MetricSums, ScaleHistograms
from emca.engine.mixing import build_mixing
from emca.engine.optim import build_criterion, build_optimizer, describe_optimizer, scaled_lr
from emca.engine.precision import amp_dtype
from emca.engine.preemption import StoppedBeforeTraining, StopRequest
from emca.engine.progress import EpochProgress, RunClock, StepTimer, peak_memory_gib
from emca.engine.reproducibility import configure_determinism, rng_state, seed_everything, set_rng_state
from emca.engine.results import RESULTS, git_commit, library_versions, write_results
from emca.engine.run_folder import RunCompleted, RunFolder, RunFolderError
from emca.engine.schedule import build_scheduler, describe_milestones, describe_warmup
from emca.engine.step import OptimizerStep, build_clipping, check_accumulation
from emca.engine.trackers import TrackerError, Trackers, build_trackers, check_trackers, epoch_scalars, flatten_config
from emca.models import attention_modules, build_model, coverage_name
from emca.models.config import check_model_options, warn_ignored_model_options
from emca.models.summary import count_parameters, measure_gflops
from emca.options import shown

log = logging.getLogger(__name__)


class RunAborted(CompactHydraException):
    """A problem the user can fix (bad config, dataset, checkpoint, diverged loss), in one line.

    A CompactHydraException, so that a failed job of a multirun is reported by Hydra as this one
    line rather than as a traceback.
    """


class Preempted(Exception):
    """SIGTERM / SIGUSR1 / SIGINT arrived; last.pt holds the run's position."""

    def __init__(self, signal_name: str, exit_status: int):
        super().__init__(signal_name)
        self.exit_status = exit_status  # 0, or 130 after SIGINT


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint next to the model and optimizer states."""

    epoch: int = 0  # epochs completed
    # Steps of epoch `epoch` already trained (non-zero after a pre-emption; all of them when the
    # stop came during the epoch's validation, which then runs again on resume).
    step_in_epoch: int = 0
    # The epoch cut short by a pre-emption: its starting learning rate and its training-metric
    # totals so far (summed over ranks), so that its record reads as if it had run uninterrupted.
    interrupted_epoch: Optional[dict[str, Any]] = None
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: Optional[dict[str, Any]] = None
    wall_s: float = 0.0  # over all segments of the run (a resumed run adds to it)
    train_s: float = 0.0
    train_images: int = 0


def train(cfg: DictConfig, hydra_output_dir: str, records: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Run (or continue) one training run; returns what results.json holds.

    `records`: files for the run folder's .hydra/ (train.py passes Hydra's config, written once the
    run is accepted). Raises RunAborted for problems a user can fix, Preempted after saving on a
    stop signal. Continuing a run that has already completed changes nothing and returns its results.
    """
    silence_non_main_logging()
    try:
        ctx = setup_distributed(cfg.trainer.device, timeout_s=cfg.trainer.dist_timeout_s)
    except ValueError as error:
        raise RunAborted(str(error)) from error
    run_dir = Path(shared_run_dir(ctx, hydra_output_dir))
    with (RunFolder(run_dir, ctx.is_main) as folder, StopRequest() as stop, _collective_failures(ctx, cfg, run_dir),
          _named_limits(cfg, folder)):
        try:
            trainer = _start(cfg, ctx, folder, records)
        except RunCompleted as done:
            if ctx.is_main:
                log.info(f"{done}")
            return json.loads((run_dir / RESULTS).read_text())
        except StoppedBeforeTraining as stopped:
            log.warning(f"{stopped} received before training started: nothing to save; stopped")
            raise Preempted(str(stopped), stopped.exit_status) from None
        try:
            return trainer.fit(stop)
        except DatasetError as error:  # an image that became unreadable or undecodable mid-run
            raise RunAborted(f"{error}; {trainer.store.last} is kept, continue with hydra.run.dir={run_dir} "
                                 "trainer.resume=auto") from None


def _start(cfg: DictConfig, ctx: DistributedContext, folder: RunFolder, records: Optional[dict[str, str]]) -> "Trainer":
    """Claim the run folder (rank 0), build the trainer on every rank, then take the folder."""
    source = _decided_on_main(ctx, lambda: folder.claim(cfg.trainer.resume, cfg.trainer.epochs))
    failure = None
    try:
        trainer = Trainer(cfg, ctx, folder.store, source)
    except RunAborted as error:
        failure = error
    # Every rank has built its trainer (and read the checkpoint) before rank 0 writes the folder.
    if ctx.any_rank(failure is not None):
        raise failure or RunAborted(f"rank {ctx.rank}: another rank could not start (its error is above); "
                                    "nothing was written")
    # A tracker that cannot start is refused while nothing of the run is written yet.
    _decided_on_main(ctx, lambda: check_trackers(cfg.logger))
    _decided_on_main(ctx, lambda: folder.adopt(records))
    return trainer


@contextlib.contextmanager
def _collective_failures(ctx: DistributedContext, cfg: DictConfig, run_dir: Path) -> Iterator[None]:
    """A rank that died, hung or was stopped: every other rank fails in one line after the timeout."""
    try:
        yield
    except RuntimeError as error:
        if not (ctx.is_distributed and is_collective_failure(error)):
            raise
        reason = " ".join(str(error).split())[:200]
        raise RunAborted(
            f"rank {ctx.rank}: a collective failed ({reason}); another rank stopped, hung or died (waited up to "
            f"trainer.dist_timeout_s={cfg.trainer.dist_timeout_s}); continue with hydra.run.dir={run_dir} "
            "trainer.resume=auto"
        ) from None


@contextlib.contextmanager
def _named_limits(cfg: DictConfig, folder: RunFolder) -> Iterator[None]:
    """An OS or resource limit met while building or training (memory, the process limit, open
    files, shared memory, a full or read-only disk), in one line naming the resource and the
    setting, instead of a C++ assertion's text; saved checkpoints are never touched on the way out."""
    try:
        yield
    except (MemoryError, RuntimeError, OSError) as error:
        line = limit_reached(error, cfg)
        if line is None:
            raise
        _release_quietly(error)
        store = folder.store
        if store.last.is_file():
            kept = f"{store.last} is kept: continue with hydra.run.dir={store.run_dir} trainer.resume=auto"
        elif folder.adopted:  # train.log and .hydra/ are written: only trainer.resume=auto may use the folder
            kept = f"no checkpoint had been written: start again with hydra.run.dir={store.run_dir} trainer.resume=auto"
        else:
            kept = "nothing was written"
        raise RunAborted(f"{line}; {kept}") from None


def _release_quietly(error: BaseException) -> None:
    """Free what the error's frames hold now, without the noise of their finalizers: a DataLoader
    iterator that failed to start its workers has no _workers_status, and its __del__ would print an
    AttributeError traceback after our one line (a PyTorch shortcoming)."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda _unraisable: None
    try:
        traceback.clear_frames(error.__traceback__)
        error.__traceback__ = None
        gc.collect()
    finally:
        sys.unraisablehook = hook


def limit_reached(error: BaseException, cfg: DictConfig) -> Optional[str]:
    """The resource an error says ran out, and the settings that decide how much of it is used;
    None for any other error. (DataLoader workers' errors arrive as a RuntimeError with their text.)"""
    text, dataset = str(error), cfg.dataset
    number = getattr(error, "errno", None)
    workers = f"dataset.workers={shown(dataset.workers)}"
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)) or any(
            words in text for words in ("can't allocate memory", "out of memory", "Cannot allocate memory")):
        return (f"out of memory on {cfg.trainer.device} with dataset.image_size={dataset.image_size}, "
                f"dataset.batch_size={dataset.batch_size} and {workers}: lower them (a new run), or free memory")
    if "is killed by signal" in text:
        return (f"a loader worker process was killed ({text.split('is killed by signal:')[-1].strip()}), most likely "
                f"by the out-of-memory killer: lower {workers}, dataset.batch_size or dataset.image_size")
    if number == errno.EAGAIN or "can't start new thread" in text:
        return (f"cannot start another process or thread: the process limit (ulimit -u, or the container's pids "
                f"limit) is reached with {workers}; lower dataset.workers or raise the limit")
    if number == errno.EMFILE or "Too many open files" in text:
        return (f"the open-file limit (ulimit -n) is reached with {workers}; raise ulimit -n or lower "
                "dataset.workers")
    if "shm" in text and ("No space left" in text or "bus error" in text.lower()):
        return (f"shared memory (/dev/shm) is full with {workers}: raise the container's shared memory "
                "(docker --shm-size) or lower dataset.workers")
    path = getattr(error, "filename", None) or "a file"
    if number in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left for {path} ({error.strerror}): free disk space there"
    if number in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{path}: {error.strerror}: make it writable (a read-only mount, or its permissions)"
    return None


def _decided_on_main(ctx: DistributedContext, decide):
    """decide() on rank 0 and its outcome on every rank: its value, or its refusal raised everywhere."""
    outcome = None
    if ctx.is_main:
        try:
            outcome = ("value", decide())
        except (RunFolderError, CheckpointError, TrackerError, OSError) as error:
            outcome = ("refused", str(error))
        except RunCompleted as done:
            outcome = ("completed", str(done))
        except BaseException as error:  # a bug, or a stop signal: the other ranks must not wait for rank 0
            ctx.broadcast_from_main(("refused", f"rank 0 stopped ({type(error).__name__}: {error})"))
            raise
    kind, value = ctx.broadcast_from_main(outcome)
    if kind == "refused":
        raise RunAborted(value)
    if kind == "completed":
        raise RunCompleted(value)
    return value


def _describe_workers(cfg: DictConfig, workers: int) -> str:
    """The data line's loader workers per process, and where dataset.workers=null chose them."""
    if cfg.loader.name == "synthetic":
        return ""
    kind = "DALI threads" if cfg.loader.name == "dali" else "loader workers"
    chosen = " (one per CPU core, dataset.workers=null)" if cfg.dataset.workers is None else ""
    return f", {workers} {kind}{chosen}"


def _every(steps: int) -> str:
    return "every optimizer step" if steps == 1 else f"every {steps} optimizer steps"


class Trainer:
    def __init__(self, cfg: DictConfig, ctx: DistributedContext, store: CheckpointStore, source: Optional[Path]):
        """`source`: the checkpoint to continue from (None: a fresh start), as the run folder decided."""
        self.cfg, self.ctx, self.store, self.run_dir = cfg, ctx, store, store.run_dir
        self.started = time.perf_counter()
        self.clock = RunClock()  # the run's ETA in the step lines
        trainer_cfg = cfg.trainer
        self.epochs = trainer_cfg.epochs
        self.amp_dtype = amp_dtype(trainer_cfg.amp.value)
        try:
            seed_everything(trainer_cfg.seed)
            configure_determinism(trainer_cfg.deterministic)
            self._build(cfg, ctx)
            self.progress = self._resume(source)
        except ValueError as error:  # DatasetError, invalid model / optimizer options, CheckpointError
            raise RunAborted(str(error)) from error
        # The training model: DDP (gradient all-reduce) and torch.compile wrap the same parameters.
        self.train_model: nn.Module = self.model
        if ctx.is_distributed:
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
            )
        if trainer_cfg.compile:
            self.train_model = torch.compile(self.train_model)
        self.step = OptimizerStep(
            self.model, self.train_model, self.optimizer, self.scheduler, self.scaler, self.criterion, self.amp_dtype,
            accumulate=trainer_cfg.accumulate, clipping=self.clipping, mixing=self.mixing, average=self.average,
        )

    def _build(self, cfg: DictConfig, ctx: DistributedContext) -> None:
        trainer_cfg = cfg.trainer
        for option in ("eval_every", "log_every", "max_steps_per_epoch"):
            if trainer_cfg[option] is not None and trainer_cfg[option] < 1:  # only max_steps_per_epoch may be null
                raise ValueError(f"trainer.{option}={trainer_cfg[option]} must be at least 1")
        self.data = build_loaders(
            cfg.dataset, cfg.loader, rank=ctx.rank, world_size=ctx.world_size, device=ctx.device,
            channels_last=trainer_cfg.channels_last, seed=trainer_cfg.seed,
        )
        check_model_options(cfg.backbone, cfg.attention)
        model = build_model(cfg.backbone, cfg.attention, cfg.coverage, num_classes=self.data.num_classes)
        self.initialisation = (
            initialise_from(model, cfg.model.init_from, cfg.model.init_exclude) if cfg.model.init_from else None
        )
        self.parameters = count_parameters(model)
        self.gflops = measure_gflops(model, cfg.dataset.image_size)
        self.fingerprint = architecture_fingerprint(model)
        coverage = self.fingerprint["architecture"]["coverage"]  # None without EMCA
        self.coverage_name = coverage_name(coverage["stages"], coverage["blocks"]) if coverage else None
        if trainer_cfg.sync_bn and ctx.is_distributed:
            if ctx.device.type != "cuda":
                raise ValueError(
                    "trainer.sync_bn=true needs CUDA devices: PyTorch's SyncBatchNorm has no CPU implementation"
                )
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        memory_format = torch.channels_last if trainer_cfg.channels_last else torch.preserve_format
        self.model = model.to(ctx.device, memory_format=memory_format)

        self.steps_per_epoch = len(self.data.train)
        if trainer_cfg.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, trainer_cfg.max_steps_per_epoch)
        self.optimizer = build_optimizer(self.model, cfg.optimizer, cfg.dataset.batch_size, cfg.attention.name)
        self.scheduler = build_scheduler(self.optimizer, cfg.optimizer, self.epochs, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=self.amp_dtype is torch.float16)
        self._build_recipe(cfg, ctx)

        if ctx.is_main:
            self._log_setup(cfg)

    def _build_recipe(self, cfg: DictConfig, ctx: DistributedContext) -> None:
        """What a step adds to forward-backward-update: mixup, the loss, clipping, accumulation, the EMA."""
        trainer_cfg = cfg.trainer
        check_accumulation(trainer_cfg.accumulate, cfg.dataset.batch_size, ctx.world_size)
        self.mixing = build_mixing(trainer_cfg.mixup, self.data.num_classes, cfg.optimizer.label_smoothing,
                                   trainer_cfg.seed, ctx.rank, cfg.dataset.batch_size, ctx.world_size)
        self.criterion = build_criterion(cfg.optimizer, soft_targets=self.mixing is not None)
        self.clipping = build_clipping(trainer_cfg)
        self.average = build_weight_average(self.model, trainer_cfg.ema, self.steps_per_epoch)
        self.best_metric = trainer_cfg.best_metric.value
        if self.best_metric == "ema_val_top1" and self.average is None:
            raise ValueError("trainer.best_metric=ema_val_top1 needs an EMA: set trainer.ema.decay (e.g. 0.9998)")

    def _log_setup(self, cfg: DictConfig) -> None:
        trainer_cfg, optimizer_cfg = cfg.trainer, cfg.optimizer
        arch = self.fingerprint["architecture"]
        coverage = f" coverage={self.coverage_name}" if self.coverage_name else ""
        log.info(f"run folder {self.run_dir}")
        if self.initialisation is not None:
            log.info(self.initialisation.summary())
        warn_ignored_model_options(cfg.attention, cfg.coverage)
        # #P in make_tables' (the paper's) unit, M = 2^20, named: a bare 10^6 figure read as the table's did not match.
        log.info(f"model {arch['backbone']} attention={cfg.attention.name}{coverage}: {self.parameters:,} parameters "
                 f"({self.parameters / 2**20:.3f} M, M = 2^20 as in make_tables), {self.gflops:.3f} GFLOPs (10^9 "
                 f"multiply-adds) at {cfg.dataset.image_size} px")
        log.info(f"data {cfg.dataset.name} via {cfg.loader.name}: {self.data.num_train} train / {self.data.num_val} "
                 f"val images, {self.data.num_classes} classes, global batch {cfg.dataset.batch_size} over "
                 f"{self.ctx.world_size} process(es), {self.steps_per_epoch} steps/epoch on {self.ctx.device}"
                 f"{_describe_workers(cfg, self.data.workers)}")
        schedule = (
            describe_milestones(optimizer_cfg.milestones, self.epochs, optimizer_cfg.gamma)
            if optimizer_cfg.schedule.value == "step" else "cosine"
        )
        log.info(f"{describe_optimizer(optimizer_cfg, self.optimizer)}, {optimizer_cfg.loss.value} loss, "
                 f"{self.epochs} epochs, {schedule}, {describe_warmup(optimizer_cfg.warmup_epochs, self.epochs)}, "
                 f"amp {trainer_cfg.amp.value}")
        extras = [
            *describe_augmentation(cfg.dataset),
            f"label smoothing {optimizer_cfg.label_smoothing}" if optimizer_cfg.label_smoothing else None,
            f"{trainer_cfg.accumulate} micro-batches per step" if trainer_cfg.accumulate > 1 else None,
            f"gradient clipping ({trainer_cfg.clip_mode.value}) at {trainer_cfg.clip_grad}" if self.clipping else None,
            f"mixup {trainer_cfg.mixup.mixup_alpha} / cutmix {trainer_cfg.mixup.cutmix_alpha}" if self.mixing else None,
            f"EMA decay {trainer_cfg.ema.decay} updated {_every(trainer_cfg.ema.every)}" if self.average else None,
            describe_history(trainer_cfg.keep_last_n),
        ]
        if any(extras):
            log.info("with " + ", ".join(extra for extra in extras if extra))

    # ----------------------------------------------------------------------------- resume
    def _resume(self, path: Optional[Path]) -> Progress:
        """Load the checkpoint to continue from (every rank reads it) and the run's identity."""
        # A run continued in its own folder keeps its identity; one started from another run's file is a new run.
        self.run_id = uuid.uuid4().hex
        if path is None:
            return Progress()
        given = self.cfg.trainer.resume not in (None, "auto")
        state = load_checkpoint(path, self.fingerprint, option="trainer.resume" if given else None)
        self._check_average(path, state.get("ema"))
        # Before any weights load: a changed model is named by its option, not by a state-dict mismatch.
        check_resume_config(state.get("config"), self.cfg, path, state["progress"], self.run_dir)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when saved with fp16 off
            self.scaler.load_state_dict(state["scaler"])
        if self.average is not None:
            self.average.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        if state.get("run_id") and Path(path).resolve().is_relative_to(self.run_dir.resolve()):
            self.run_id = state["run_id"]
        progress = Progress(**state["progress"])
        if self.ctx.is_main:
            log.info(
                f"resumed from {path}: epoch {progress.epoch} completed, step {progress.step_in_epoch} of the next"
            )
        return progress

    def _check_average(self, path: Path, averaged: Optional[dict[str, torch.Tensor]]) -> None:
        if (averaged is None) != (self.average is None):
            had, decay = "with" if averaged is not None else "without", shown(self.cfg.trainer.ema.decay)
            raise ValueError(
                f"{path} was trained {had} an EMA of the weights but trainer.ema.decay={decay}; "
                "continue with the run's own trainer.ema settings (its .hydra/config.yaml), or start a new run"
            )

    # ----------------------------------------------------------------------------- the run
    def fit(self, stop: StopRequest) -> dict[str, Any]:
        stop.arm()
        progress = self.progress
        trackers = None
        if self.ctx.is_main:
            trackers = build_trackers(self.cfg.logger, self.run_dir, self.run_id, self.run_params(),
                                      progress.global_step, progress.history)
        try:
            for epoch in range(progress.epoch, self.epochs):
                self._run_epoch(epoch, stop, trackers)
            results = self._results(progress)
            if self.ctx.is_main:
                self._finish(results, trackers)
            return results
        finally:
            if trackers is not None:
                trackers.close()

    def run_params(self) -> dict[str, Any]:
        """The parameters every tracker records: the flattened config, with the values the run used
        where the config states a rule (the learning rate after the linear scaling rule)."""
        cfg = self.cfg
        params = flatten_config(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
        params["optimizer.lr_configured"] = params["optimizer.lr"]
        params["optimizer.lr"] = scaled_lr(cfg.optimizer.lr, cfg.dataset.batch_size, cfg.optimizer.lr_scale_batch)
        # coverage.name is derived from the fields already; without EMCA the model has no coverage.
        params["model.coverage"] = self.coverage_name or "none (not an EMCA model)"
        return params

    def _finish(self, results: dict[str, Any], trackers: Trackers) -> None:
        """results.json, the trackers' final metrics and the closing line (rank 0)."""
        try:
            write_results(self.run_dir, results)
        except OSError as error:
            again = f"hydra.run.dir={self.run_dir} trainer.resume=auto"
            raise RunAborted(f"cannot write {self.run_dir / RESULTS} ({error.strerror}); the checkpoints are intact: "
                             f"fix the folder, then rerun with {again}") from None
        final, best = results["final"], results["best"]
        finals = {f"hparams/final_{key}": value for key, value in final.items() if key.endswith(("1", "5"))}
        trackers.finish(self.run_params(), {f"hparams/best_{self.best_metric}": best[self.best_metric], **finals})
        ema = f", EMA {final['ema_val_top1']:.2f}%" if "ema_val_top1" in final else ""
        log.info(f"done: final val top-1 {final['val_top1']:.2f}%{ema}, best {self.best_metric} "
                 f"{best[self.best_metric]:.2f}% (epoch {best['epoch']}); {self.run_dir / RESULTS}")

    def _run_epoch(self, epoch: int, stop: StopRequest, trackers: Optional[Trackers]) -> None:
        """Train, validate and checkpoint one epoch; on a stop signal save where it stands and stop."""
        progress = self.progress
        # The random state this epoch starts from (after a resume: the restored one), which a
        # checkpoint taken during the epoch stores.
        epoch_rng = rng_state()
        interrupted = progress.interrupted_epoch
        epoch_lr = interrupted["lr"] if interrupted else self.optimizer.param_groups[0]["lr"]
        # Totals carried over from before a pre-emption count once: on rank 0.
        carried = interrupted["totals"] if interrupted and self.ctx.is_main else None
        epoch_sums = MetricSums(self.ctx.device, start=carried)
        epoch_started = time.perf_counter()
        train_metrics = self.train_one_epoch(epoch, stop, trackers, epoch_sums)
        progress.train_s += time.perf_counter() - epoch_started
        validate = (epoch + 1) % self.cfg.trainer.eval_every == 0 or epoch + 1 == self.epochs
        val = self._validate(epoch, trackers, stop) if train_metrics is not None and validate else None
        if train_metrics is None or (validate and val is None):
            # Stopped mid-epoch, or during validation (all steps trained: only the validation is redone).
            progress.interrupted_epoch = {"lr": epoch_lr, "totals": epoch_sums.reduce_totals(self.ctx)}
            self._save(progress, epoch_rng, best=False)
            self._stop_for(stop)

        progress.epoch, progress.step_in_epoch, progress.interrupted_epoch = epoch + 1, 0, None
        record = {
            "epoch": epoch + 1,
            "train_loss": train_metrics.loss,
            "train_top1": train_metrics.top1,
            "lr": epoch_lr,
        }
        record.update(val or {})
        metric = self.best_metric
        improved = val is not None and (progress.best is None or val[metric] > progress.best[metric])
        if improved:
            progress.best = {"epoch": epoch + 1, **val}
        progress.history.append(record)
        self._log_epoch(record, progress, time.perf_counter() - epoch_started)
        self._save(progress, rng_state(), best=improved)
        # Checkpoint first: the trackers only observe (and queue their calls: emca.engine.trackers.channel).
        if trackers is not None:
            trackers.log_epoch(epoch + 1, epoch_scalars(record))
        if self.ctx.any_rank(stop.requested):
            self._stop_for(stop)

    def train_one_epoch(self, epoch: int, stop: StopRequest, trackers: Optional[Trackers],
                        epoch_sums: MetricSums) -> Optional[Metrics]:
        """One epoch from progress.step_in_epoch on, its metrics added to epoch_sums; the epoch's
        metrics, or None when a stop signal cut it short."""
        progress, ctx, log_every = self.progress, self.ctx, self.cfg.trainer.log_every
        first_step = progress.step_in_epoch
        if first_step >= self.steps_per_epoch:  # stopped during this epoch's validation: nothing left to train
            return self._checked(epoch_sums.reduce(ctx), epoch, self.steps_per_epoch - 1)
        self.train_model.train()
        self.data.train.set_epoch(epoch)
        window = MetricSums(ctx.device)
        # islice also fast-forwards over the batches trained before a pre-emption (loaded, not trained).
        batches = itertools.islice(self.data.train, first_step, self.steps_per_epoch)
        # A line right after the process's first step and then at least every log_every_s, whatever log_every says.
        every_s = self.cfg.trainer.log_every_s
        with EpochProgress(epoch + 1, self.epochs, self.steps_per_epoch, first_step, enabled=ctx.is_main,
                           every_s=every_s, first_line=self.clock.steps == 0) as bar:
            timer = StepTimer()
            for step, (images, labels) in enumerate(batches, start=first_step):
                timer.fetched()
                lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
                result = self.step(images, labels, progress.global_step)
                window.update(result.loss, result.logits, result.labels)
                epoch_sums.update(result.loss, result.logits, result.labels)
                progress.global_step += 1
                progress.step_in_epoch = step + 1
                progress.train_images += labels.shape[0] * ctx.world_size
                bar.advance()
                timer.stepped()

                if (step + 1) % log_every == 0 or step + 1 == self.steps_per_epoch:
                    self._report(self._checked(window.reduce(ctx), epoch, step), lr, timer, bar, trackers)
                    window = MetricSums(ctx.device)
                elif bar.line_due():  # rank 0 alone: reads its window, leaves it open
                    bar.interim(window, lr, timer, self.clock, self._work_left(), ctx.world_size)
                if ctx.any_rank(stop.requested):
                    # The steps since the last report must be finite before they are saved.
                    self._checked(window.reduce(ctx), epoch, step)
                    return None
        return self._checked(epoch_sums.reduce(ctx), epoch, self.steps_per_epoch - 1)

    def _report(self, metrics: Metrics, lr: float, timer: StepTimer, bar: EpochProgress,
                trackers: Optional[Trackers]) -> None:
        """The step line and the trackers' step series for the steps since the last report."""
        steps = timer.steps
        times = timer.take_window()
        self.clock.add_window(times, steps)
        images_per_s = metrics.count / times.seconds
        memory_gib = peak_memory_gib(self.ctx.device)
        bar.report(metrics, lr, images_per_s, times, memory_gib, self.clock.eta_s(*self._work_left()))
        if trackers is not None:
            trackers.log_step(self.progress.global_step, {
                "loss": metrics.loss, "top1": metrics.top1, "lr": lr, "images_per_s": images_per_s,
                "step_time_s": times.step_s, "data_time_s": times.data_s, "peak_memory_gib": memory_gib,
            })

    def _work_left(self) -> tuple[int, int]:
        """(training steps, validations) left in the run."""
        progress, eval_every = self.progress, self.cfg.trainer.eval_every
        steps = (self.epochs - progress.epoch) * self.steps_per_epoch - progress.step_in_epoch
        epochs_left = range(progress.epoch + 1, self.epochs + 1)
        validations = sum(1 for epoch in epochs_left if epoch % eval_every == 0 or epoch == self.epochs)
        return steps, validations

    def _checked(self, metrics: Metrics, epoch: int, step: int) -> Metrics:
        """Stop on a NaN / Inf loss before anything is saved: the last checkpoint stays the last good one."""
        if not math.isfinite(metrics.loss):
            kept = self.store.last
            kept_text = (
                f"the last good checkpoint {kept} is kept" if kept.exists() else "no checkpoint had been written yet"
            )
            raise RunAborted(
                f"non-finite training loss ({metrics.loss}) at epoch {epoch + 1} step {step + 1}: stopped; {kept_text} "
                f"(lower optimizer.lr, add optimizer.warmup_epochs or use trainer.amp=bf16 instead of fp16)"
            )
        return metrics

    def _validate(self, epoch: int, trackers: Optional[Trackers], stop: StopRequest) -> Optional[dict[str, float]]:
        """The epoch's validation record: val_* of the trained weights and, with an EMA, ema_val_* of
        the averaged ones (the same evaluation, another model); None when a stop signal cut it short."""
        models = {"val": self.model}
        if self.average is not None:
            models["ema_val"] = self.average.module
        record, started = {}, time.perf_counter()
        for tag, model in models.items():
            metrics = self.evaluate(model, epoch, trackers, stop, tag=tag)
            if metrics is None:
                return None
            record.update({f"{tag}_loss": metrics.loss, f"{tag}_top1": metrics.top1, f"{tag}_top5": metrics.top5})
        self.clock.add_validation(time.perf_counter() - started)
        return record

    def evaluate(self, model: nn.Module, epoch: int, trackers: Optional[Trackers], stop: StopRequest,
                 tag: str = "val") -> Optional[Metrics]:
        """Top-1 / top-5 / loss of `model` over the whole validation set, summed over ranks; None
        when a stop signal cut the pass short. (The epoch's record takes the figures to the trackers.)

        Runs the plain model (not DDP: ranks hold different numbers of validation batches) with
        rank 0's BatchNorm statistics; for the trained weights (tag val) it also histograms every
        attention module's scales.
        """
        ctx = self.ctx
        ctx.broadcast_buffers(model)
        modules = attention_modules(model) if tag == "val" else {}
        histograms = ScaleHistograms(modules, ctx.device) if modules else None
        self.data.val.set_epoch(epoch)
        was_training = model.training
        try:
            metrics = evaluate(model, self.data.val, ctx, amp_dtype=self.amp_dtype, should_stop=lambda: stop.requested)
        finally:
            if histograms is not None:
                histograms.remove()
            model.train(was_training)
        if metrics is None:
            return None
        if histograms is not None:
            histograms.reduce(ctx)
            if trackers is not None:
                trackers.log_histograms(epoch + 1, histograms)
        return metrics[0]

    # ----------------------------------------------------------------------------- persistence
    def _save(self, progress: Progress, rng: dict[str, Any], best: bool) -> None:
        """last.pt (best.pt, the history) from rank 0, with rank 0's BatchNorm statistics."""
        # A finite last loss does not prove the update it drove was finite; never save such weights.
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise RunAborted(f"parameters became non-finite by training step {progress.global_step}: stopped; "
                             f"{self.store.last} is kept (lower optimizer.lr or add optimizer.warmup_epochs)")
        self.ctx.broadcast_buffers(self.model)
        failure = None
        if self.ctx.is_main:
            try:
                # A save within an epoch (a stop) adds no history entry: only completed epochs are averaged.
                completed = progress.epoch if progress.interrupted_epoch is None else None
                self.store.save(self._state(progress, rng), improved=best, epoch=completed,
                                keep_last_n=self.cfg.trainer.keep_last_n)
            except CheckpointError as error:
                failure = str(error)
        failure = self.ctx.broadcast_from_main(failure)  # every rank stops together
        if failure:
            raise RunAborted(failure)

    def _state(self, progress: Progress, rng: dict[str, Any]) -> dict[str, Any]:
        """What last.pt holds (rank 0); best.pt and the history leave out checkpoint.RESUME_ONLY."""
        progress.wall_s += time.perf_counter() - self.started
        self.started = time.perf_counter()
        return {
            "format": 1,
            "run_id": self.run_id,
            "fingerprint": self.fingerprint,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.average.state_dict() if self.average is not None else None,
            "rng": rng,
            "progress": asdict(progress),
            "config": OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True),
            # The label of every output, so that eval.py can read a validation folder alone.
            "classes": list(self.data.classes),
        }

    def _stop_for(self, stop: StopRequest) -> None:
        if self.ctx.is_main:
            progress = self.progress
            if progress.step_in_epoch >= self.steps_per_epoch:
                position = f"after training epoch {progress.epoch + 1} (its validation, if due, runs on resume)"
            elif progress.step_in_epoch:
                position = f"in epoch {progress.epoch + 1} after step {progress.step_in_epoch}"
            else:
                position = f"after epoch {progress.epoch}"
            log.warning(
                f"{stop.name} received: saved {self.store.last} {position}; "
                f"continue with hydra.run.dir={self.run_dir} trainer.resume=auto"
            )
        stop.hand_over()
        raise Preempted(stop.name, stop.exit_status)

    def _log_epoch(self, record: dict[str, Any], progress: Progress, seconds: float) -> None:
        if not self.ctx.is_main:
            return
        text = (f"epoch {record['epoch']}/{self.epochs}: "
                f"train loss {record['train_loss']:.4f} top-1 {record['train_top1']:.2f}%")
        if "val_top1" in record:
            text += (f"; val loss {record['val_loss']:.4f} top-1 {record['val_top1']:.2f}% "
                     f"top-5 {record['val_top5']:.2f}%")
            if "ema_val_top1" in record:
                text += f"; EMA top-1 {record['ema_val_top1']:.2f}% top-5 {record['ema_val_top5']:.2f}%"
            best, metric = progress.best, self.best_metric
            text += f" (best {metric} {best[metric]:.2f}% at epoch {best['epoch']})"
        log.info(f"{text}; {seconds:.1f} s")

    def _results(self, progress: Progress) -> dict[str, Any]:
        progress.wall_s += time.perf_counter() - self.started
        self.started = time.perf_counter()
        evaluated = [record for record in progress.history if "val_top1" in record]
        final = evaluated[-1]
        cfg = self.cfg
        return {
            "status": "completed",
            "run_id": self.run_id,
            "run_dir": str(self.run_dir),
            "model": {"backbone": cfg.backbone.name, "attention": cfg.attention.name, "coverage": self.coverage_name},
            "dataset": cfg.dataset.name,
            "loader": cfg.loader.name,
            # The images each split really had (after skipping corrupt ones).
            "num_train": self.data.num_train,
            "num_val": self.data.num_val,
            # The last validated epoch: val_* of the trained weights, ema_val_* of their average (with an EMA).
            "final": {key: value for key, value in final.items() if key == "epoch" or "val_" in key},
            "best": progress.best,
            "best_metric": self.best_metric,
            # model.init_from: the file and how many tensors came from it (null: initialised as built).
            "init_from": self.initialisation.record() if self.initialisation is not None else None,
            "epoch_reached": progress.epoch,
            "epochs": self.epochs,
            "params": self.parameters,
            "gflops": self.gflops,
            "image_size": cfg.dataset.image_size,
            "images_per_s": progress.train_images / progress.train_s if progress.train_s else None,
            "wall_time_s": progress.wall_s,
            "world_size": self.ctx.world_size,
            "device": str(self.ctx.device),
            "git": git_commit(),
            "versions": library_versions(),
            # Indexed by epoch - 1; null where the epoch was not validated (trainer.eval_every > 1).
            "val_top1_per_epoch": [record.get("val_top1") for record in progress.history],
            "history": progress.history,
            "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        }
