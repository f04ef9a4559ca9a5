"""The training run's life, the same for every task: the run folder, ranks, stop signals, resume,
the optimizer and its schedule, mixed precision, the step (accumulation, clipping, the weight
average), validation of the trained and averaged weights, checkpoints after every epoch, step lines,
trackers and results.json. What is particular to a task (its data, model, loss and metrics) comes
from the task (emca/engine/task.py; classification: emca/engine/tasks/classification.py).

Checkpoints carry the position to continue from (epoch, step within it) and the random-number
state at the start of that epoch; the loaders derive each epoch's order and augmentation from
(seed, epoch) alone. So a resumed run replays exactly what the uninterrupted run would have done,
and with trainer.deterministic=true on CPU ends with bit-identical weights.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from emca.common.checkpoint_file import CheckpointError, load_checkpoint
from emca.data import DatasetError
from emca.engine.checkpoint import CheckpointStore, describe_history
from emca.engine.compatibility import check_resume_config
from emca.engine.device_errors import out_of_memory
from emca.engine.distributed import (
    DistributedContext,
    is_collective_failure,
    setup_distributed,
    shared_run_dir,
    silence_non_main_logging,
)
from emca.engine.ema import build_weight_average
from emca.engine.errors import Preempted, RunAborted, continue_command
from emca.engine.limits import named_limits
from emca.engine.optim import build_optimizer, describe_optimizer, scaled_lr
from emca.engine.precision import amp_dtype
from emca.engine.preemption import StoppedBeforeTraining, StopRequest
from emca.engine.progress import EpochProgress, RunClock, StepTimer, peak_memory_gib
from emca.engine.reproducibility import (
    checkpoint_rng,
    configure_determinism,
    rng_state,
    seed_everything,
    set_rng_state,
)
from emca.engine.results import RESULTS, git_commit, library_versions, write_results
from emca.engine.run_folder import RunCompleted, RunFolder, RunFolderError
from emca.engine.schedule import build_scheduler, describe_milestones, describe_warmup
from emca.engine.step import OptimizerStep, build_clipping, check_accumulation
from emca.engine.task import MetricAccumulator, Task, TaskMetrics
from emca.engine.tasks import build_task
from emca.engine.trackers import TrackerError, Trackers, build_trackers, check_trackers, epoch_scalars, flatten_config
from emca.options import shown

__all__ = ["Preempted", "Progress", "RunAborted", "Trainer", "train"]

log = logging.getLogger(__name__)


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
          named_limits(cfg, folder)):
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
        except DatasetError as error:  # an input that became unreadable or undecodable mid-run
            raise RunAborted(f"{error}; {trainer.store.last} is kept, continue with "
                             f"{continue_command(run_dir)}") from None
        except torch.OutOfMemoryError as error:  # CUDA's, or DALI's device pool: one line, never the data's
            raise RunAborted(out_of_memory(error, trainer)) from None


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
            f"trainer.dist_timeout_s={cfg.trainer.dist_timeout_s}); continue with "
            f"{continue_command(run_dir)}"
        ) from None


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
            self.model, self.train_model, self.optimizer, self.scheduler, self.scaler, self.task, self.amp_dtype,
            accumulate=trainer_cfg.accumulate, clipping=self.clipping, average=self.average,
        )

    def _build(self, cfg: DictConfig, ctx: DistributedContext) -> None:
        trainer_cfg = cfg.trainer
        for option in ("eval_every", "log_every", "max_steps_per_epoch", "stop_check_every"):
            if trainer_cfg[option] is not None and trainer_cfg[option] < 1:  # only max_steps_per_epoch may be null
                raise ValueError(f"trainer.{option}={trainer_cfg[option]} must be at least 1")
        if trainer_cfg.compile and trainer_cfg.sync_bn:  # reported to fail under DDP: pytorch/pytorch#107372 (open)
            raise ValueError("trainer.compile=true does not work with trainer.sync_bn=true (torch.compile fails on "
                             "SyncBatchNorm under DDP, pytorch/pytorch#107372); set one of them to false")
        self.task: Task = build_task(cfg, ctx)
        model = self.task.model
        if trainer_cfg.sync_bn and ctx.is_distributed:
            if ctx.device.type != "cuda":
                raise ValueError(
                    "trainer.sync_bn=true needs CUDA devices: PyTorch's SyncBatchNorm has no CPU implementation"
                )
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        memory_format = torch.channels_last if trainer_cfg.channels_last else torch.preserve_format
        self.model = model.to(ctx.device, memory_format=memory_format)

        self.steps_per_epoch = len(self.task.train_loader)
        if trainer_cfg.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, trainer_cfg.max_steps_per_epoch)
        self.optimizer = build_optimizer(self.model, cfg.optimizer, cfg.dataset.batch_size)
        self.scheduler = build_scheduler(self.optimizer, cfg.optimizer, self.epochs, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=self.amp_dtype is torch.float16)
        check_accumulation(trainer_cfg.accumulate, cfg.dataset.batch_size, ctx.world_size)
        self.clipping = build_clipping(trainer_cfg)
        self.average = build_weight_average(self.model, trainer_cfg.ema, self.steps_per_epoch)
        self.best_metric = trainer_cfg.best_metric.value
        if self.best_metric not in (f"val_{self.task.best}", f"ema_val_{self.task.best}"):
            raise ValueError(f"trainer.best_metric={self.best_metric} is not a figure of task={self.task.name}; "
                             f"use trainer.best_metric=val_{self.task.best} (or ema_val_{self.task.best})")
        if self.best_metric.startswith("ema_") and self.average is None:
            raise ValueError(f"trainer.best_metric={self.best_metric} needs an EMA: set trainer.ema.decay "
                             "(e.g. 0.9998)")
        if ctx.is_main:
            self._log_setup(cfg)

    def _log_setup(self, cfg: DictConfig) -> None:
        trainer_cfg, optimizer_cfg = cfg.trainer, cfg.optimizer
        log.info(f"run folder {self.run_dir}")
        for line in self.task.describe(self.steps_per_epoch):
            log.info(line)
        schedule = (
            describe_milestones(optimizer_cfg.milestones, self.epochs, optimizer_cfg.gamma)
            if optimizer_cfg.schedule.value == "step" else "cosine"
        )
        log.info(f"{describe_optimizer(optimizer_cfg, self.optimizer)}, {optimizer_cfg.loss.value} loss, "
                 f"{self.epochs} epochs, {schedule}, "
                 f"{describe_warmup(optimizer_cfg.warmup_epochs, self.epochs, optimizer_cfg.warmup_steps)}, "
                 f"amp {trainer_cfg.amp.value}")
        extras = [
            *self.task.recipe(),
            f"{trainer_cfg.accumulate} micro-batches per step" if trainer_cfg.accumulate > 1 else None,
            f"gradient clipping ({trainer_cfg.clip_mode.value}) at {trainer_cfg.clip_grad}" if self.clipping else None,
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
        state = load_checkpoint(path, self.task.fingerprint, option="trainer.resume" if given else None)
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
        # This rank's own generators; a changed number of processes is stated (emca.engine.reproducibility).
        changed = set_rng_state(state["rng"], self.ctx, self.cfg.trainer.seed, state["progress"]["global_step"])
        if changed and self.ctx.is_main:
            log.warning(changed)
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
        params.update(self.task.params())
        return params

    def _finish(self, results: dict[str, Any], trackers: Trackers) -> None:
        """results.json, the trackers' final metrics and the closing line (rank 0)."""
        try:
            write_results(self.run_dir, results)
        except OSError as error:
            raise RunAborted(f"cannot write {self.run_dir / RESULTS} ({error.strerror}); the checkpoints are intact: "
                             f"fix the folder, then rerun with {continue_command(self.run_dir)}") from None
        final, best, metric, main = results["final"], results["best"], self.best_metric, f"val_{self.task.best}"
        # A figure without a value (COCO's AP of an object size no validation image has) is left out.
        finals = {f"hparams/final_{key}": value for key, value in final.items() if key != "epoch"
                  and not key.endswith("_loss") and value is not None}
        trackers.finish(self.run_params(), {f"hparams/best_{metric}": best[metric], **finals})
        ema = f", EMA {final[f'ema_{main}']:.2f}%" if f"ema_{main}" in final else ""
        log.info(f"done: final val {self.task.best_label} {final[main]:.2f}%{ema}, best {metric} "
                 f"{best[metric]:.2f}% (epoch {best['epoch']}); {self.run_dir / RESULTS}")

    def _run_epoch(self, epoch: int, stop: StopRequest, trackers: Optional[Trackers]) -> None:
        """Train, validate and checkpoint one epoch; on a stop signal save where it stands and stop."""
        progress = self.progress
        # The random state this epoch starts from (after a resume: the restored one), which a
        # checkpoint taken during the epoch stores.
        epoch_rng = rng_state(self.ctx.device)
        interrupted = progress.interrupted_epoch
        epoch_lr = interrupted["lr"] if interrupted else self.optimizer.param_groups[0]["lr"]
        # Totals carried over from before a pre-emption count once: on rank 0.
        carried = interrupted["totals"] if interrupted and self.ctx.is_main else None
        epoch_sums = self.task.sums(self.ctx.device, start=carried)
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
            **{f"train_{name}": value for name, value in train_metrics.scalars().items()},
            "lr": epoch_lr,
        }
        record.update(val or {})
        metric = self.best_metric
        improved = val is not None and (progress.best is None or val[metric] > progress.best[metric])
        if improved:
            progress.best = {"epoch": epoch + 1, **val}
        progress.history.append(record)
        self._log_epoch(record, progress, time.perf_counter() - epoch_started)
        self._save(progress, rng_state(self.ctx.device), best=improved)
        # Checkpoint first: the trackers only observe (and queue their calls: emca.engine.trackers.channel).
        if trackers is not None:
            trackers.log_epoch(epoch + 1, epoch_scalars(record))
        if self.ctx.any_rank(stop.requested):
            self._stop_for(stop)

    def train_one_epoch(self, epoch: int, stop: StopRequest, trackers: Optional[Trackers],
                        epoch_sums: MetricAccumulator) -> Optional[TaskMetrics]:
        """One epoch from progress.step_in_epoch on, its metrics added to epoch_sums; the epoch's
        metrics, or None when a stop signal cut it short."""
        progress, ctx, log_every = self.progress, self.ctx, self.cfg.trainer.log_every
        first_step = progress.step_in_epoch
        if first_step >= self.steps_per_epoch:  # stopped during this epoch's validation: nothing left to train
            return self._checked(epoch_sums.reduce(ctx), epoch, self.steps_per_epoch - 1)
        self.train_model.train()
        loader = self.task.train_loader
        loader.set_epoch(epoch)
        window = self.task.sums(ctx.device)
        # After a pre-emption the epoch resumes at first_step: a loader with start_at skips the batches
        # trained before without loading them; islice fast-forwards over those it still gives (loaded, not trained).
        skipped = loader.start_at(first_step) if hasattr(loader, "start_at") else 0
        batches = itertools.islice(loader, first_step - skipped, self.steps_per_epoch - skipped)
        # A line right after the process's first step and then at least every log_every_s, whatever log_every says.
        with EpochProgress(epoch + 1, self.epochs, self.steps_per_epoch, first_step, enabled=ctx.is_main,
                           every_s=self.cfg.trainer.log_every_s, first_line=self.clock.steps == 0) as bar:
            timer = StepTimer()
            for step, (inputs, targets) in enumerate(batches, start=first_step):
                timer.fetched()
                lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
                result = self.step(inputs, targets, progress.global_step)
                window.update(result.loss, result.outputs, result.targets)
                epoch_sums.update(result.loss, result.outputs, result.targets)
                progress.global_step += 1
                progress.step_in_epoch = step + 1
                progress.train_images += len(targets) * ctx.world_size
                bar.advance()
                timer.stepped()

                logged = (step + 1) % log_every == 0 or step + 1 == self.steps_per_epoch
                if logged:
                    self._report(self._checked(window.reduce(ctx), epoch, step), lr, timer, bar, trackers)
                    window = self.task.sums(ctx.device)
                elif bar.line_due():  # rank 0 alone: reads its window, leaves it open
                    bar.interim(window.local(), lr, timer, self.clock, self._work_left(), ctx.world_size, ctx.device)
                if self._stop_agreed(stop, step, logged):
                    # The steps since the last report must be finite before they are saved.
                    self._checked(window.reduce(ctx), epoch, step)
                    return None
        return self._checked(epoch_sums.reduce(ctx), epoch, self.steps_per_epoch - 1)

    def _stop_agreed(self, stop: StopRequest, step: int, logged: bool) -> bool:
        """Whether the run stops after `step` (0-based in its epoch) for a stop signal: a single process
        reads its own flag after every step; DDP ranks agree on theirs (a collective over the host group)
        only after a step line (`logged`) and every trainer.stop_check_every steps, so that no other step
        waits for the slowest rank's host."""
        every = self.cfg.trainer.stop_check_every
        if self.ctx.is_distributed and not logged and (step + 1) % every:
            return False
        return self.ctx.any_rank(stop.requested)

    def _report(self, metrics: TaskMetrics, lr: float, timer: StepTimer, bar: EpochProgress,
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
                **metrics.scalars(), "lr": lr, "images_per_s": images_per_s,
                "step_time_s": times.step_s, "data_time_s": times.data_s, "peak_memory_gib": memory_gib,
            })

    def _work_left(self) -> tuple[int, int]:
        """(training steps, validations) left in the run."""
        progress, eval_every = self.progress, self.cfg.trainer.eval_every
        steps = (self.epochs - progress.epoch) * self.steps_per_epoch - progress.step_in_epoch
        epochs_left = range(progress.epoch + 1, self.epochs + 1)
        validations = sum(1 for epoch in epochs_left if epoch % eval_every == 0 or epoch == self.epochs)
        return steps, validations

    def _checked(self, metrics: TaskMetrics, epoch: int, step: int) -> TaskMetrics:
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
            record.update({f"{tag}_{name}": value for name, value in metrics.items()})
        self.clock.add_validation(time.perf_counter() - started)
        return record

    def evaluate(self, model: nn.Module, epoch: int, trackers: Optional[Trackers], stop: StopRequest,
                 tag: str = "val") -> Optional[dict[str, float]]:
        """The task's validation figures of `model` over the whole validation set, summed over ranks;
        None when a stop signal cut the pass short. (The epoch's record takes them to the trackers.)

        Runs the plain model (not DDP: ranks hold different numbers of validation batches) with
        rank 0's BatchNorm statistics, and leaves it in the mode it was in.
        """
        self.ctx.broadcast_buffers(model)
        was_training = model.training
        try:
            return self.task.evaluate(model, self.ctx, epoch, amp_dtype=self.amp_dtype,
                                      should_stop=lambda: stop.requested, trackers=trackers, trained=tag == "val")
        finally:
            model.train(was_training)

    # ----------------------------------------------------------------------------- persistence
    def _save(self, progress: Progress, rng: dict[str, Any], best: bool) -> None:
        """last.pt (best.pt, the history) from rank 0, with rank 0's BatchNorm statistics and every
        rank's own random state (`rng`: this rank's rng_state)."""
        # A finite last loss does not prove the update it drove was finite; never save such weights.
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise RunAborted(f"parameters became non-finite by training step {progress.global_step}: stopped; "
                             f"{self.store.last} is kept (lower optimizer.lr or add optimizer.warmup_epochs)")
        self.ctx.broadcast_buffers(self.model)
        rng = checkpoint_rng(self.ctx, rng)
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
            "fingerprint": self.task.fingerprint,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.average.state_dict() if self.average is not None else None,
            "rng": rng,
            "progress": asdict(progress),
            "config": OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True),
            **self.task.checkpoint_entries(),
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
                f"continue with {continue_command(self.run_dir)}"
            )
        stop.hand_over()
        raise Preempted(stop.name, stop.exit_status)

    def _log_epoch(self, record: dict[str, Any], progress: Progress, seconds: float) -> None:
        if not self.ctx.is_main:
            return
        text = f"epoch {record['epoch']}/{self.epochs}: {self.task.epoch_line(record)}"
        if f"val_{self.task.best}" in record:
            best, metric = progress.best, self.best_metric
            text += f" (best {metric} {best[metric]:.2f}% at epoch {best['epoch']})"
        log.info(f"{text}; {seconds:.1f} s")

    def _results(self, progress: Progress) -> dict[str, Any]:
        progress.wall_s += time.perf_counter() - self.started
        self.started = time.perf_counter()
        main = f"val_{self.task.best}"
        evaluated = [record for record in progress.history if main in record]
        final = evaluated[-1]
        return {
            "status": "completed",
            "run_id": self.run_id,
            "run_dir": str(self.run_dir),
            "task": self.task.name,
            **self.task.results(progress.history),
            # The last validated epoch: val_* of the trained weights, ema_val_* of their average (with an EMA).
            "final": {key: value for key, value in final.items() if key == "epoch" or "val_" in key},
            "best": progress.best,
            "best_metric": self.best_metric,
            "epoch_reached": progress.epoch,
            "epochs": self.epochs,
            "images_per_s": progress.train_images / progress.train_s if progress.train_s else None,
            "wall_time_s": progress.wall_s,
            "world_size": self.ctx.world_size,
            "device": str(self.ctx.device),
            "git": git_commit(),
            "versions": library_versions(),
            "history": progress.history,
            "config": OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True),
        }
