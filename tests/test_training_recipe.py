"""The training step's recipe options against references: the EMA against a hand-computed average,
K micro-batches against one batch, one all-reduce per optimizer step under DDP, clipping after
AMP's unscale, mixup/cutmix seeded by the step."""

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from emca.engine.ema import WeightAverage, build_weight_average
from emca.engine.mixing import build_mixing
from emca.engine.step import Clipping, OptimizerStep, build_clipping, check_accumulation
from emca.engine.tasks.classification import ClassificationStep

MIXUP = OmegaConf.create({"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5,
                          "mode": OmegaConf.create({"value": "batch"})})


def mixup_cfg(**changes):
    from emca.config import MixupConfig

    return OmegaConf.merge(OmegaConf.structured(MixupConfig), changes)


def toy_model(seed: int = 0) -> nn.Module:
    """No batch statistics: K micro-batches and one batch see the same function."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))


def toy_batch(size: int = 8, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 6, 6, generator=generator), torch.randint(0, 5, (size,), generator=generator)


def step_for(model, train_model=None, lr=0.1, momentum=0.9, **options) -> OptimizerStep:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = options.pop("scaler", torch.amp.GradScaler("cpu", enabled=False))
    # The classification task's side of the step: the criterion and mixup as the trainer builds them.
    task = ClassificationStep(options.pop("criterion", nn.CrossEntropyLoss()), options.pop("mixing", None))
    return OptimizerStep(model, train_model or model, optimizer, scheduler, scaler, task, None, **options)


# --------------------------------------------------------------------------- EMA
def test_the_ema_is_the_hand_computed_average():
    model = nn.Linear(2, 1)
    average = WeightAverage(model, decay=0.75)
    expected, trajectory = None, []
    for step in range(1, 5):
        with torch.no_grad():
            model.weight.add_(float(step))
            model.bias.mul_(-2.0)
        trajectory.append({name: value.clone() for name, value in model.state_dict().items()})
        average.after_step(model, step)
        # timm's first update copies the weights (decay 0); then ema = 0.75 ema + 0.25 w.
        current = trajectory[-1]
        expected = dict(current) if expected is None else {k: 0.75 * expected[k] + 0.25 * current[k] for k in current}
        for name, value in average.module.state_dict().items():
            torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6)
    # Written out for the last step: w_1 -> ((w_1 * .75 + w_2 * .25) * .75 + w_3 * .25) * .75 + w_4 * .25
    w = [t["weight"] for t in trajectory]
    by_hand = ((w[0] * 0.75 + w[1] * 0.25) * 0.75 + w[2] * 0.25) * 0.75 + w[3] * 0.25
    torch.testing.assert_close(average.module.weight, by_hand, rtol=0, atol=1e-6)


def test_the_ema_updates_every_n_steps_copies_first_and_warms_up():
    model = nn.Linear(1, 1, bias=False)
    average = WeightAverage(model, decay=0.9, every=2, copy_steps=4)
    values = []
    for step in range(1, 9):
        with torch.no_grad():
            model.weight.fill_(float(step))
        average.after_step(model, step)
        values.append(average.module.weight.item())
    # Updates after steps 2, 4 (copies: 4 copy steps = 2 updates), 6 and 8 (decay 0.9); none between.
    assert values[1] == 2.0 and values[3] == 4.0 and values[2] == values[1]
    assert values[5] == pytest.approx(0.9 * 4.0 + 0.1 * 6.0) and values[4] == values[3]
    assert values[7] == pytest.approx(0.9 * values[5] + 0.1 * 8.0)
    warm = WeightAverage(model, decay=0.9999, warmup=True, warmup_power=0.75)
    # timm's warm-up: 1 - (1 + n)^-power at update n + 1 (the first update copies).
    assert warm.decay_at(1) == 0.0
    assert warm.decay_at(5) == pytest.approx(1 - (1 + 4) ** -0.75)


def test_ema_options_are_checked_in_one_line():
    from emca.config import EmaConfig

    def cfg(**changes):
        return OmegaConf.merge(OmegaConf.structured(EmaConfig), changes)

    assert build_weight_average(nn.Linear(1, 1), cfg(), 10) is None
    for changes, line in [({"decay": 1.0}, "trainer.ema.decay=1.0 must be in (0, 1)"),
                          ({"decay": 0.9, "every": 0}, "trainer.ema.every=0 must be an integer >= 1"),
                          ({"decay": 0.9, "copy_epochs": -1}, "trainer.ema.copy_epochs=-1 must be")]:
        with pytest.raises(ValueError, match=line.replace("(", r"\(").replace(")", r"\)")):
            build_weight_average(nn.Linear(1, 1), cfg(**changes), 10)


# --------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("mixing", [False, True], ids=["plain", "mixup"])
def test_k_micro_batches_make_the_update_of_one_batch(mixing):
    images, labels = toy_batch(8)
    results = {}
    for accumulate in (1, 4):
        model = toy_model()
        mix = build_mixing(mixup_cfg(mixup_alpha=0.4, cutmix_alpha=1.0), 5, 0.1, seed=0, rank=0, global_batch=8,
                           world_size=1) if mixing else None
        step = step_for(model, accumulate=accumulate, mixing=mix)
        for index in range(3):
            result = step(images.clone(), labels, index)
        results[accumulate] = (model.state_dict(), result.loss, result.outputs)
    one, four = results[1], results[4]
    for name in one[0]:
        torch.testing.assert_close(four[0][name], one[0][name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(four[1], one[1], rtol=1e-5, atol=1e-6)
    assert four[2].shape == (8, 5)


def test_accumulation_must_divide_the_batch_in_one_line():
    check_accumulation(4, 64, 2)
    with pytest.raises(ValueError, match=r"trainer.accumulate=3 must be a divisor of the per-process batch 32"):
        check_accumulation(3, 64, 2)
    with pytest.raises(ValueError, match=r"trainer.accumulate=0 must be an integer >= 1"):
        check_accumulation(0, 64, 2)


def test_ddp_all_reduces_once_per_optimizer_step():
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = toy_model()
        ddp = DistributedDataParallel(model, bucket_cap_mb=1e-5)  # a tiny cap: several buckets
        forwards, reduced_in = [], []
        model.register_forward_pre_hook(lambda module, inputs: forwards.append(len(forwards) + 1))

        def counting(state, bucket):
            reduced_in.append(len(forwards))  # the micro-batch whose backward all-reduces
            return default_hooks.allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting)
        step = step_for(model, train_model=ddp, accumulate=3)
        images, labels = toy_batch(6)
        for index in range(2):
            step(images, labels, index)
        assert len(forwards) == 6
        # Only the last micro-batch of each optimizer step all-reduces (each of its buckets once).
        assert sorted(set(reduced_in)) == [3, 6] and len(reduced_in) > 2
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- clipping
def test_clipping_acts_on_the_unscaled_gradients():
    model = toy_model()
    before = {name: value.clone() for name, value in model.named_parameters()}
    # fp16 loss scaling on CPU: an unscale-less clip would cut the 2^16-scaled gradients instead.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    criterion = nn.CrossEntropyLoss()
    step = step_for(model, lr=1.0, momentum=0.0, scaler=scaler, criterion=lambda out, y: 100 * criterion(out, y),
                    clipping=Clipping(0.5, "norm"))
    step(*toy_batch(8), 0)
    delta = torch.cat([(value - before[name]).flatten() for name, value in model.named_parameters()])
    # SGD with lr 1: the update is the clipped gradient, whose norm is the threshold.
    assert delta.norm().item() == pytest.approx(0.5, rel=1e-4)


def test_clip_by_value_and_its_options():
    model = nn.Linear(3, 1, bias=False)
    model.weight.grad = torch.tensor([[5.0, -0.1, -7.0]])
    Clipping(1.0, "value")(model.parameters())
    assert torch.equal(model.weight.grad, torch.tensor([[1.0, -0.1, -1.0]]))
    cfg = OmegaConf.create({"clip_grad": None, "clip_mode": OmegaConf.create({"value": "norm"})})
    assert build_clipping(cfg) is None
    cfg.clip_grad = -1.0
    with pytest.raises(ValueError, match=r"trainer.clip_grad=-1.0 must be > 0"):
        build_clipping(cfg)


# --------------------------------------------------------------------------- mixup / cutmix
def test_mixing_depends_on_the_step_alone_and_leaves_numpy_alone():
    mixing = build_mixing(mixup_cfg(mixup_alpha=0.4, cutmix_alpha=1.0), 5, 0.1, seed=3, rank=0, global_batch=8,
                          world_size=1)
    images, labels = toy_batch(8)
    np.random.seed(123)
    numpy_state = np.random.get_state()[1].copy()
    first = mixing(images.clone(), labels, 7)
    np.random.rand(5)  # whatever else the process draws in between
    again = mixing(images.clone(), labels, 7)
    other = mixing(images.clone(), labels, 8)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    np.random.seed(123)
    assert np.array_equal(np.random.get_state()[1], numpy_state)
    targets = first[1]
    # Soft targets: rows sum to one, label smoothing folded in (no target is exactly 0 or 1).
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    assert targets.min() > 0 and targets.max() < 1


def test_train_top1_under_mixup_counts_the_largest_share():
    model = toy_model()
    mixing = build_mixing(mixup_cfg(mixup_alpha=1.0), 5, 0.0, seed=0, rank=0, global_batch=8, world_size=1)
    images, labels = toy_batch(8)
    mixed, targets = mixing(images.clone(), labels, 0)
    result = step_for(copy.deepcopy(model), mixing=mixing)(images.clone(), labels, 0)
    assert torch.equal(result.targets, targets.argmax(1))
    plain = step_for(model)(images, labels, 0)
    assert plain.targets is labels


def test_mixup_options_are_checked_in_one_line():
    assert build_mixing(mixup_cfg(), 5, 0.0, 0, 0, 8, 1) is None
    with pytest.raises(ValueError, match=r"trainer.mixup.prob=1.5 must be in \[0, 1\]"):
        build_mixing(mixup_cfg(mixup_alpha=0.2, prob=1.5), 5, 0.0, 0, 0, 8, 1)
    with pytest.raises(ValueError, match=r"trainer.mixup.cutmix_alpha=-1.0 must be >= 0"):
        build_mixing(mixup_cfg(cutmix_alpha=-1.0), 5, 0.0, 0, 0, 8, 1)
    with pytest.raises(ValueError, match=r"dataset.batch_size=6 must be even per process \(2 of them\)"):
        build_mixing(mixup_cfg(mixup_alpha=0.2), 5, 0.0, 0, 0, 6, 2)


# --------------------------------------------------------------------------- a run with an EMA, end to end
@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, compose_train):
    import logging

    from emca.engine.trainer import train

    from conftest import SYNTHETIC_RUN

    run_dir = tmp_path_factory.mktemp("ema-run")
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("emca.engine.trainer")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        results = train(compose_train(*SYNTHETIC_RUN, "trainer.ema.decay=0.5", "trainer.best_metric=ema_val_top1"),
                        str(run_dir))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return run_dir, results, lines


def test_the_ema_is_validated_beside_the_trained_weights(ema_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, results, lines = ema_run
    assert any(line.startswith("epoch 2/2") and "; EMA top-1 " in line for line in lines)
    assert any("EMA decay 0.5 updated every optimizer step" in line for line in lines)
    history = results["history"]
    assert all({"val_top1", "ema_val_top1", "ema_val_top5", "ema_val_loss"} <= record.keys() for record in history)
    assert results["best_metric"] == "ema_val_top1"
    best = max(history, key=lambda record: record["ema_val_top1"])  # the first of equals: best only improves
    assert results["best"]["epoch"] == best["epoch"] and results["best"]["ema_val_top1"] == best["ema_val_top1"]
    assert results["final"]["ema_val_top1"] == history[-1]["ema_val_top1"]
    checkpoint = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert checkpoint["progress"]["epoch"] == best["epoch"] and checkpoint["ema"].keys() == checkpoint["model"].keys()
    events = EventAccumulator(str(run_dir)).Reload()
    assert {"top1/val", "top1/ema_val", "loss/ema_val", "hparams/best_ema_val_top1"} <= set(events.Tags()["scalars"])


def test_eval_py_evaluates_the_ema_weights_on_request(ema_run):
    from hydra import compose, initialize_config_dir

    from emca.analysis.checkpoint_eval import EvalError, evaluate_checkpoint
    from emca.engine.distributed import setup_distributed

    from conftest import REPO_ROOT

    run_dir, results, _ = ema_run
    ctx = setup_distributed("cpu")
    reports = {}
    for ema in (False, True):
        with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
            cfg = compose("eval", overrides=[f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}", f"ema={ema}",
                                             "speed.enabled=false", "rotations=[0]", "learned_scales=false"])
        reports[ema] = evaluate_checkpoint(cfg, ctx)
    assert reports[True]["weights"] == "ema" and reports[False]["weights"] == "trained"
    assert reports[True]["val"]["top1"] == results["final"]["ema_val_top1"]
    assert reports[False]["val"]["top1"] == results["final"]["val_top1"]
    assert (run_dir / "eval_last.json").is_file() and (run_dir / "eval_last_ema.json").is_file()
    plain = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    plain["ema"] = None
    torch.save(plain, run_dir / "no_ema.pt")
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        cfg = compose("eval", overrides=[f"checkpoint={run_dir / 'no_ema.pt'}", "ema=true", "speed.enabled=false"])
    with pytest.raises(EvalError, match="holds no EMA weights .* drop ema=true"):
        evaluate_checkpoint(cfg, ctx)


def test_resuming_with_other_ema_settings_is_refused_in_one_line(ema_run, compose_train, tmp_path):
    from emca.engine.trainer import RunAborted, train

    from conftest import SYNTHETIC_RUN

    run_dir = ema_run[0]
    resume = f"trainer.resume={run_dir / 'checkpoints' / 'last.pt'}"
    with pytest.raises(RunAborted, match=r"was trained with an EMA of the weights but trainer.ema.decay=null"):
        train(compose_train(*SYNTHETIC_RUN, "trainer.epochs=3", resume), str(tmp_path / "continued"))
    with pytest.raises(RunAborted, match="trainer.best_metric=ema_val_top1 needs an EMA"):
        train(compose_train(*SYNTHETIC_RUN, "trainer.best_metric=ema_val_top1"), str(tmp_path / "other"))
