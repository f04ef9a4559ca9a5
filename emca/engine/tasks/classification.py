"""Image classification (ImageNet, Tiny-ImageNet, digits, any ImageFolder): the paper's task.

As torchvision's references/classification: `evaluate` is a plain function of a model and a loader,
run on the trained weights and on their average alike; the task object gives the run (emca/engine/
trainer.py) its data, its EMCA-ResNet, the step's loss (with mixup / CutMix and label smoothing), the
top-1 / top-5 sums and its lines for the log, checkpoints and results.json.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterable, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from emca.common.checkpoint_file import architecture_fingerprint
from emca.data import build_loaders
from emca.data.config import describe_augmentation
from emca.engine.distributed import DistributedContext
from emca.engine.metrics import Metrics, MetricSums, ScaleHistograms
from emca.engine.mixing import build_mixing
from emca.engine.optim import build_criterion
from emca.engine.precision import autocast
from emca.engine.task import Task, TaskStep
from emca.models import attention_modules, build_model, coverage_name
from emca.models.config import check_model_options, warn_ignored_model_options
from emca.models.initialisation import initialise_from
from emca.models.summary import count_parameters, measure_gflops


def rotate_clockwise(images: torch.Tensor, degrees: int) -> torch.Tensor:
    """Rotate a (B, C, H, W) batch by a multiple of 90 degrees clockwise (Table 9).

    torch.rot90 turns from the first of its dims towards the second for k > 0, i.e. counter-clockwise
    on an image whose rows run down and columns run right, so `degrees` clockwise is k = -degrees / 90.
    Validation images are centre crops, square, so every rotation keeps the input size.
    """
    if degrees % 90:
        raise ValueError(f"rotations must be multiples of 90 degrees, got {degrees}")
    return images if degrees % 360 == 0 else torch.rot90(images, k=-(degrees // 90), dims=(2, 3))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    ctx: DistributedContext,
    rotations: Iterable[int] = (0,),
    amp_dtype: Optional[torch.dtype] = None,
    while_unrotated: Callable[[], ContextManager] = contextlib.nullcontext,
    should_stop: Callable[[], bool] = lambda: False,
) -> Optional[dict[int, Metrics]]:
    """{degrees: top-1 / top-5 / loss over the whole validation set, summed over ranks}; None when
    `should_stop()` became true on any rank (a stop signal: the pass is abandoned rather than finished).

    Every batch is run once per rotation, so one pass over the data serves them all;
    `while_unrotated()` wraps the forward of the unrotated images (to record learned scales on
    the images as given only).
    """
    rotations = list(dict.fromkeys(rotations))
    model.eval()
    sums = {degrees: MetricSums(ctx.device) for degrees in rotations}
    for images, labels in loader:
        # Checked locally: ranks hold different numbers of validation batches, so they agree once, below.
        if should_stop():
            break
        for degrees in rotations:
            recording = while_unrotated() if degrees % 360 == 0 else contextlib.nullcontext()
            with recording, autocast(ctx.device.type, amp_dtype):
                logits = model(rotate_clockwise(images, degrees))
            sums[degrees].update(F.cross_entropy(logits.float(), labels), logits, labels)
    if ctx.any_rank(should_stop()):
        return None
    return {degrees: total.reduce(ctx) for degrees, total in sums.items()}


class ClassificationStep(TaskStep):
    """Labelled images: mixup / CutMix once per batch (seeded by the optimizer step), the criterion
    (cross-entropy or BCE, with label smoothing) on each micro-batch's logits."""

    def __init__(self, criterion: Callable, mixing: Optional[Callable] = None):
        self.criterion, self.mixing = criterion, mixing

    def prepare(self, images: torch.Tensor, labels: torch.Tensor, step: int):
        if self.mixing is None:
            return images, labels, labels
        images, targets = self.mixing(images, labels, step)
        # Under mixup an image counts as the class with the largest share of its target.
        return images, targets, targets.argmax(dim=1)

    def loss(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor):
        logits = model(images)
        return self.criterion(logits, targets), logits


class ClassificationTask(ClassificationStep, Task):
    name = "classification"
    best = "top1"
    best_label = "top-1"

    def __init__(self, cfg: DictConfig, ctx: DistributedContext):
        self.cfg, self.ctx = cfg, ctx
        if cfg.get("detector") is not None:  # a detector chosen without its task would be silently ignored
            raise ValueError(f"detector={cfg.detector.name.value} trains with task=detection; add task=detection, "
                             "or drop the detector for classification")
        trainer_cfg = cfg.trainer
        self.data = build_loaders(
            cfg.dataset, cfg.loader, rank=ctx.rank, world_size=ctx.world_size, device=ctx.device,
            channels_last=trainer_cfg.channels_last, seed=trainer_cfg.seed,
        )
        self.train_loader, self.val_loader = self.data.train, self.data.val
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
        self.model = model
        mixing = build_mixing(trainer_cfg.mixup, self.data.num_classes, cfg.optimizer.label_smoothing,
                              trainer_cfg.seed, ctx.rank, cfg.dataset.batch_size, ctx.world_size)
        super().__init__(build_criterion(cfg.optimizer, soft_targets=mixing is not None), mixing)

    # ----------------------------------------------------------------------------- metrics
    def sums(self, device: torch.device, start: Optional[list[float]] = None) -> MetricSums:
        return MetricSums(device, start=start)

    def evaluate(self, model: nn.Module, ctx: DistributedContext, epoch: int, *, amp_dtype, should_stop, trackers,
                 trained: bool) -> Optional[dict[str, float]]:
        """Top-1 / top-5 / loss with the model's BatchNorm statistics; for the trained weights it also
        histograms every attention module's scales (to the trackers)."""
        modules = attention_modules(model) if trained else {}
        histograms = ScaleHistograms(modules, ctx.device) if modules else None
        self.val_loader.set_epoch(epoch)
        try:
            metrics = evaluate(model, self.val_loader, ctx, amp_dtype=amp_dtype, should_stop=should_stop)
        finally:
            if histograms is not None:
                histograms.remove()
        if metrics is None:
            return None
        if histograms is not None:
            histograms.reduce(ctx)
            if trackers is not None:
                trackers.log_histograms(epoch + 1, histograms)
        return {"loss": metrics[0].loss, "top1": metrics[0].top1, "top5": metrics[0].top5}

    # ----------------------------------------------------------------------------- what the run says
    def describe(self, steps_per_epoch: int) -> list[str]:
        cfg, ctx, data = self.cfg, self.ctx, self.data
        lines = [self.initialisation.summary()] if self.initialisation is not None else []
        warn_ignored_model_options(cfg.attention, cfg.coverage)
        coverage = f" coverage={self.coverage_name}" if self.coverage_name else ""
        # #P in make_tables' (the paper's) unit, M = 2^20, named: a bare 10^6 figure read as the table's did not match.
        lines.append(
            f"model {self.fingerprint['architecture']['backbone']} attention={cfg.attention.name}{coverage}: "
            f"{self.parameters:,} parameters ({self.parameters / 2**20:.3f} M, M = 2^20 as in make_tables), "
            f"{self.gflops:.3f} GFLOPs (10^9 multiply-adds) at {cfg.dataset.image_size} px")
        lines.append(
            f"data {cfg.dataset.name} via {cfg.loader.name}: {data.num_train} train / {data.num_val} val images, "
            f"{data.num_classes} classes, global batch {cfg.dataset.batch_size} over {ctx.world_size} process(es), "
            f"{steps_per_epoch} steps/epoch on {ctx.device}{self._describe_workers()}")
        return lines

    def _describe_workers(self) -> str:
        """The data line's loader workers per process, and where dataset.workers=null chose them."""
        cfg = self.cfg
        if cfg.loader.name == "synthetic":
            return ""
        kind = "DALI threads" if cfg.loader.name == "dali" else "loader workers"
        chosen = " (one per CPU core, dataset.workers=null)" if cfg.dataset.workers is None else ""
        return f", {self.data.workers} {kind}{chosen}"

    def recipe(self) -> list[str]:
        cfg = self.cfg
        mixup = cfg.trainer.mixup
        return [
            *describe_augmentation(cfg.dataset),
            f"label smoothing {cfg.optimizer.label_smoothing}" if cfg.optimizer.label_smoothing else None,
            f"mixup {mixup.mixup_alpha} / cutmix {mixup.cutmix_alpha}" if self.mixing else None,
        ]

    def epoch_line(self, record: dict[str, Any]) -> str:
        text = f"train loss {record['train_loss']:.4f} top-1 {record['train_top1']:.2f}%"
        if "val_top1" in record:
            text += (f"; val loss {record['val_loss']:.4f} top-1 {record['val_top1']:.2f}% "
                     f"top-5 {record['val_top5']:.2f}%")
            if "ema_val_top1" in record:
                text += f"; EMA top-1 {record['ema_val_top1']:.2f}% top-5 {record['ema_val_top5']:.2f}%"
        return text

    def checkpoint_entries(self) -> dict[str, Any]:
        # The label of every output, so that eval.py can read a validation folder alone.
        return {"classes": list(self.data.classes)}

    def results(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "model": {"backbone": cfg.backbone.name, "attention": cfg.attention.name, "coverage": self.coverage_name},
            "dataset": cfg.dataset.name,
            "loader": cfg.loader.name,
            # The images each split really had (after skipping corrupt ones).
            "num_train": self.data.num_train,
            "num_val": self.data.num_val,
            # model.init_from: the file and how many tensors came from it (null: initialised as built).
            "init_from": self.initialisation.record() if self.initialisation is not None else None,
            "params": self.parameters,
            "gflops": self.gflops,
            "image_size": cfg.dataset.image_size,
            # Indexed by epoch - 1; null where the epoch was not validated (trainer.eval_every > 1).
            "val_top1_per_epoch": [record.get("val_top1") for record in history],
        }

    def params(self) -> dict[str, Any]:
        # coverage.name is derived from the fields already; without EMCA the model has no coverage.
        return {"model.coverage": self.coverage_name or "none (not an EMCA model)"}
