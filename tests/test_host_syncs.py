"""No host synchronisation in a training or validation step except where a value is read: the step
lines (every trainer.log_every steps, and after the process's first step), the epoch's end (issue 26).

On a CUDA device an op that needs a value from the device makes the host wait until the device has
done all the work queued before it, so the host can no longer run ahead and keep the device busy. On
CPU the same ops run, so a dispatch mode that records them shows where a CUDA run would wait. What is
recorded (`synchronises`): `aten._local_scalar_dense` (.item(), float(t), int(t), bool(t), a tensor in
an `if`), `aten.lift_fresh` (torch.tensor(...) from host data: on a CUDA device a blocking copy from
pageable memory), ops whose output size depends on the values (nonzero, bincount, histc, unique,
masked_select, boolean-mask indexing), and the host reading values (.tolist(), .cpu(), .numpy(): a
function mode, as these dispatch nothing on CPU). Where a GPU exists, the CUDA-marked test lets torch
itself say so (torch.cuda.set_sync_debug_mode("error")).
"""

import collections
import itertools
import types

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from test_detection_task import boxes, small_run  # noqa: F401  (boxes: a fixture)
from timm.data import Mixup
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import emca.engine.mixing as mixing
import emca.engine.tasks.classification as classification
import emca.engine.trainer as trainer_module
from emca.engine.mixing import HostFactorMixup
from emca.engine.step import OptimizerStep
from emca.engine.trainer import Trainer, train

from conftest import SYNTHETIC_RUN

SYNCING = {"_local_scalar_dense", "lift_fresh", "nonzero", "bincount", "histc", "_unique", "_unique2", "unique_dim",
           "unique_consecutive", "masked_select"}
MASKED = {"index", "index_put", "index_put_"}  # synchronising with a boolean mask (a nonzero inside)
READS = {"tolist", "cpu", "numpy"}

STEPS, LOG_EVERY = 6, 4  # per epoch, 2 epochs: lines after steps 0 (the first), 3, 5 and 9, 11
# A short classification run on synthetic batches; no line but log_every's and the first step's.
RUN = (*SYNTHETIC_RUN, f"trainer.max_steps_per_epoch={STEPS}", f"loader.steps_per_epoch={STEPS}",
       f"trainer.log_every={LOG_EVERY}", "loader.val_steps=2", "trainer.log_every_s=1000000.0")
MIXING = ("trainer.mixup.mixup_alpha=0.2", "trainer.mixup.cutmix_alpha=1.0")
# tests/test_train.py's RECIPE on synthetic data: an EMA (validated too), mixup and cutmix, micro-batches, clipping.
RECIPE = ("trainer.ema.decay=0.6", "trainer.ema.every=2", "trainer.ema.copy_epochs=1", *MIXING, "trainer.accumulate=2",
          "trainer.clip_grad=2.0", "trainer.best_metric=ema_val_top1")


def synchronises(func, args) -> bool:
    name = func.overloadpacket.__name__
    if name in MASKED:
        return any(index is not None and index.dtype in (torch.bool, torch.uint8) for index in args[1])
    return name in SYNCING


class SyncRecorder(TorchDispatchMode):
    """The synchronising ops of the code it is entered around, by where the run stands (`where`)."""

    def __init__(self):
        super().__init__()
        self.where = ("start",)
        self.places = [self.where]  # every `where` in order
        self.ignoring = 0  # > 0 inside code whose synchronisations are not ours (a torchvision detector)
        self.seen = collections.defaultdict(list)

    def enter(self, where: tuple) -> None:
        self.where = where
        self.places.append(where)

    def record(self, name: str) -> None:
        if not self.ignoring:
            self.seen[self.where].append(name)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if synchronises(func, args):
            self.record(str(func))
        return func(*args, **(kwargs or {}))


class ReadRecorder(TorchFunctionMode):
    """The host reading a tensor's values (.tolist(), .cpu(), .numpy()), into a SyncRecorder."""

    def __init__(self, recorder: SyncRecorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in READS:
            self.recorder.record(f"Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


def label_steps(monkeypatch, recorder: SyncRecorder) -> None:
    """("step", n) inside optimizer step n; ("after step", n) from its end to the next step or validation
    batch (the metric sums, the stop check, the step line)."""
    call = OptimizerStep.__call__

    def labelled(self, inputs, targets, step):
        recorder.enter(("step", step))
        try:
            return call(self, inputs, targets, step)
        finally:
            recorder.enter(("after step", step))

    monkeypatch.setattr(OptimizerStep, "__call__", labelled)


def label_validation(monkeypatch, recorder: SyncRecorder) -> None:
    """("val", pass, batch) from a validation batch's arrival to the next one's; ("val end", pass) after the last."""
    evaluate, passes = classification.evaluate, itertools.count()

    def labelled(model, loader, ctx, **options):
        number = next(passes)

        def batches():
            for index, batch in enumerate(loader):
                recorder.enter(("val", number, index))
                yield batch
            recorder.enter(("val end", number))

        return evaluate(model, batches(), ctx, **options)

    monkeypatch.setattr(classification, "evaluate", labelled)


def line_steps(epochs: int, steps: int, log_every: int) -> set[int]:
    """The optimizer steps after which the run writes a step line (and may read values)."""
    return {0} | {epoch * steps + step for epoch in range(epochs) for step in range(steps)
                  if (step + 1) % log_every == 0 or step + 1 == steps}


def unrecorded(function, recorder: SyncRecorder):
    """`function` with nothing recorded while it runs."""
    def call(*args, **kwargs):
        recorder.ignoring += 1
        try:
            return function(*args, **kwargs)
        finally:
            recorder.ignoring -= 1

    return call


def recorded_run(cfg, run_dir, monkeypatch) -> SyncRecorder:
    recorder = SyncRecorder()
    label_steps(monkeypatch, recorder)
    label_validation(monkeypatch, recorder)
    # Per-image mixing's factors reach the device through pinned memory and an asynchronous copy, which the
    # CPU cannot tell from a blocking copy (both start from a tensor of host data): the CUDA test checks it.
    monkeypatch.setattr(mixing, "to_device_of", unrecorded(mixing.to_device_of, recorder))
    with recorder, ReadRecorder(recorder):
        train(cfg, str(run_dir))
    return recorder


def assert_no_syncs_between_lines(recorder: SyncRecorder, steps: int, lines: set[int]) -> None:
    assert {where for where in recorder.places if where[0] == "step"} == {("step", step) for step in range(steps)}
    within = {("step", step): recorder.seen[("step", step)] for step in range(steps)}
    between = {("after step", step): recorder.seen[("after step", step)] for step in range(steps) if step not in lines}
    assert not any(within.values()) and not any(between.values()), {
        where: ops for where, ops in {**within, **between}.items() if ops}
    # The recorder sees the reads where a line is written: it would see them anywhere else.
    assert all(recorder.seen[("after step", step)] for step in lines)


PER_IMAGE = (*MIXING, "trainer.mixup.mode=elem", "trainer.clip_mode=agc", "trainer.clip_grad=0.5")


@pytest.mark.parametrize("options", [(), RECIPE, PER_IMAGE, (*MIXING, "trainer.mixup.mode=pair")],
                         ids=["plain", "recipe", "per-image-mixing-agc", "per-pair-mixing"])
def test_no_synchronisation_between_step_lines(options, compose_train, one_torch_thread, tmp_path, monkeypatch):
    cfg = compose_train(*RUN, *options)
    recorder = recorded_run(cfg, tmp_path, monkeypatch)
    epochs = cfg.trainer.epochs
    assert_no_syncs_between_lines(recorder, epochs * STEPS, line_steps(epochs, STEPS, LOG_EVERY))
    # Every validation batch of every pass (the trained weights' with its attention histograms, the EMA's).
    batches = {where: recorder.seen[where] for where in recorder.places if where[0] == "val"}
    passes = epochs * (2 if cfg.trainer.ema.decay else 1)
    assert len(batches) == passes * cfg.loader.val_steps and not any(batches.values()), batches


def test_a_detection_step_adds_no_synchronisation_to_the_detectors(boxes, compose_train, one_torch_thread,  # noqa: F811
                                                                    tmp_path, monkeypatch):
    """torchvision's detectors synchronise inside (NMS, the samplers' nonzero): their business. Around
    them (the batch's move, the seeded sampling, micro-batches, the loss sums, the stop check) nothing may."""
    steps = 4
    cfg = compose_train(*small_run(boxes), "trainer.epochs=1", f"trainer.max_steps_per_epoch={steps}",
                        f"trainer.log_every={steps}", "trainer.accumulate=2", "trainer.log_every_s=1000000.0")
    recorder = SyncRecorder()
    ignore_the_detector(monkeypatch, recorder)
    label_steps(monkeypatch, recorder)
    with recorder, ReadRecorder(recorder):
        train(cfg, str(tmp_path))
    assert_no_syncs_between_lines(recorder, steps, line_steps(1, steps, steps))


class Loading:
    """A training loader whose batches are read with nothing recorded: decoding and augmenting are the
    loader's (its worker processes' in a real run), in this process here (dataset.workers=0)."""

    def __init__(self, loader, recorder: SyncRecorder):
        self.loader, self.next = loader, unrecorded(next, recorder)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self):
        batches = iter(self.loader)
        while (batch := self.next(batches, None)) is not None:
            yield batch


def ignore_the_detector(monkeypatch, recorder: SyncRecorder) -> None:
    """Nothing recorded inside a detector's forward (module hooks on the model the step runs) or backward,
    nor while the loader reads a batch."""
    build, build_task = OptimizerStep.__init__, trainer_module.build_task

    def task_loading_unrecorded(cfg, ctx):
        task = build_task(cfg, ctx)
        task.train_loader = Loading(task.train_loader, recorder)
        return task

    def enter(*_):
        recorder.ignoring += 1

    def leave(*_):
        recorder.ignoring -= 1

    def hooked(self, model, train_model, *args, **kwargs):
        build(self, model, train_model, *args, **kwargs)
        train_model.register_forward_pre_hook(enter)
        train_model.register_forward_hook(leave)

    monkeypatch.setattr(trainer_module, "build_task", task_loading_unrecorded)
    monkeypatch.setattr(OptimizerStep, "__init__", hooked)
    monkeypatch.setattr(torch.Tensor, "backward", unrecorded(torch.Tensor.backward, recorder))


def test_the_recorder_sees_what_would_synchronise():
    """What the tests above rely on: each way of waiting for a device is recorded, plain work is not."""
    recorder = SyncRecorder()
    values = torch.arange(6.0)
    waits = [lambda: values.sum().item(), lambda: bool(values.max() > 2), lambda: float(values[0]),
             lambda: torch.tensor(6, dtype=torch.float64, device=values.device), lambda: values.tolist(),
             lambda: torch.bincount(values.long(), minlength=8), lambda: values[values > 2], lambda: values.nonzero()]
    for index, wait in enumerate(waits):
        recorder.enter(("wait", index))
        with recorder, ReadRecorder(recorder):
            wait()
    recorder.enter(("work",))
    with recorder, ReadRecorder(recorder):
        (values * 2).sum().double().add_(values.numel())
        torch.zeros(8, dtype=torch.float64).index_add_(0, values.long(), torch.ones(6, dtype=torch.float64))
    assert all(recorder.seen[("wait", index)] for index in range(len(waits))) and not recorder.seen[("work",)]


class Ranks:
    """A DistributedContext's stop agreement, recorded: the flag this rank gives, true on another rank."""

    def __init__(self, world_size: int):
        self.is_distributed, self.agreed = world_size > 1, []

    def any_rank(self, flag: bool) -> bool:
        self.agreed.append(flag)
        return True


@pytest.mark.parametrize("world_size", [1, 2])
def test_ranks_agree_on_a_stop_at_step_lines_and_every_stop_check_every_steps(world_size):
    trainer = types.SimpleNamespace(ctx=Ranks(world_size),
                                    cfg=OmegaConf.create({"trainer": {"stop_check_every": 4}}))
    stop = types.SimpleNamespace(requested=False)
    log_every = 6
    agreed = [step for step in range(12)
              if Trainer._stop_agreed(trainer, stop, step, logged=(step + 1) % log_every == 0)]
    # One process reads its own flag after every step (no collective); ranks agree after steps 4, 6, 8 and 12.
    assert agreed == (list(range(12)) if world_size == 1 else [3, 5, 7, 11])
    assert trainer.ctx.agreed == [False] * len(agreed)


@pytest.mark.parametrize("mode", ["elem", "pair"])
def test_host_factor_mixup_mixes_as_timm(mode):
    """The per-image and per-pair factors move to the device without a wait, and nothing else changes."""
    options = dict(mixup_alpha=0.4, cutmix_alpha=1.0, prob=0.8, switch_prob=0.5, mode=mode, label_smoothing=0.1,
                   num_classes=5)
    images, labels = torch.randn(8, 3, 12, 12), torch.randint(0, 5, (8,))
    np.random.seed(3)
    expected = Mixup(**options)(images.clone(), labels)
    np.random.seed(3)
    mixed = HostFactorMixup(**options)(images.clone(), labels)
    assert torch.equal(mixed[0], expected[0]) and torch.equal(mixed[1], expected[1])


@pytest.mark.cuda
@pytest.mark.parametrize("options", [(), ("trainer.amp=bf16", "trainer.channels_last=true", *RECIPE,
                                          "trainer.mixup.mode=elem")], ids=["plain", "bf16-recipe-per-image"])
def test_cuda_steps_between_step_lines_do_not_synchronise(options, compose_train, tmp_path, monkeypatch):
    """torch's own check where a GPU exists: steps 2 and 3 (between the first step's line and step 4's)
    and every validation batch run under torch.cuda.set_sync_debug_mode("error")."""
    cfg = compose_train(*SYNTHETIC_RUN, "trainer.device=cuda", "trainer.epochs=1", "trainer.max_steps_per_epoch=4",
                        "loader.steps_per_epoch=4", "trainer.log_every=4", "loader.val_steps=2",
                        "trainer.log_every_s=1000000.0", *options)
    lines, call, evaluate = line_steps(1, 4, 4), OptimizerStep.__call__, classification.evaluate

    def checked(self, inputs, targets, step):
        # From the step's start to the next one's: the step, the metric sums, the stop check.
        torch.cuda.set_sync_debug_mode("error" if step not in lines else "default")
        return call(self, inputs, targets, step)

    def checked_evaluate(model, loader, ctx, **options):
        def batches():
            for batch in loader:
                torch.cuda.set_sync_debug_mode("error")
                yield batch
            torch.cuda.set_sync_debug_mode("default")

        return evaluate(model, batches(), ctx, **options)

    monkeypatch.setattr(OptimizerStep, "__call__", checked)
    monkeypatch.setattr(classification, "evaluate", checked_evaluate)
    try:
        results = train(cfg, str(tmp_path))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert results["epoch_reached"] == 1
