"""SGD, AdamW and LAMB as build_optimizer makes them (timm's factory) against the classes built by hand,
the weight-decay groups, the linear scaling rule, the losses against hand formulas, and their option errors."""

import io
import math

import pytest
import torch
from omegaconf import OmegaConf
from timm.optim import Lamb
from torch import nn

from emca.config import LossName, OptimizerConfig, OptimizerName
from emca.engine.optim import build_criterion, build_optimizer, describe_optimizer

NAMES = ["sgd", "adamw", "lamb"]
# The linear layers' biases and the BatchNorm's weight and bias are exempt from decay.
NO_DECAY = {"0.bias", "1.weight", "1.bias", "3.bias"}


def toy_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def config(name: str = "sgd", **options):
    options.setdefault("no_weight_decay", ["bn", "bias"])
    return OmegaConf.structured(OptimizerConfig(name=OptimizerName(name), **options))


def mirrored_groups(optimizer: torch.optim.Optimizer, model: nn.Module, twin: nn.Module) -> list[dict]:
    """optimizer's groups (their parameters and decays) over twin's parameters of the same names."""
    names = {id(p): name for name, p in model.named_parameters()}
    twins = dict(twin.named_parameters())
    return [{"params": [twins[names[id(p)]] for p in group["params"]], "weight_decay": group["weight_decay"]}
            for group in optimizer.param_groups]


def reference(name: str, groups: list[dict], cfg, lr: float) -> torch.optim.Optimizer:
    """The optimizer built by hand: today's SGD call, torch's AdamW, timm's Lamb without its own clipping."""
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    betas = tuple(cfg.betas)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=cfg.eps)
    return Lamb(groups, lr=lr, betas=betas, eps=cfg.eps, max_grad_norm=None)


def step_both(pairs: list[tuple[nn.Module, torch.optim.Optimizer]], steps: int, seed: int = 1) -> None:
    """The same random gradients, scaled up so that a global-norm clip at 1 would show, then a step of each."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=generator) * 3 for p in pairs[0][0].parameters()]
        for model, optimizer in pairs:
            for parameter, grad in zip(model.parameters(), grads, strict=True):
                parameter.grad = grad.clone()
            optimizer.step()


def assert_same(a: tuple[nn.Module, torch.optim.Optimizer], b: tuple[nn.Module, torch.optim.Optimizer]) -> None:
    for (name, p), q in zip(a[0].named_parameters(), b[0].parameters(), strict=True):
        assert torch.equal(p, q), name
    state_a, state_b = a[1].state_dict(), b[1].state_dict()
    assert state_a["param_groups"] == state_b["param_groups"]
    assert state_a["state"].keys() == state_b["state"].keys()
    for index, values in state_a["state"].items():
        assert values.keys() == state_b["state"][index].keys()
        for key, value in values.items():
            assert torch.equal(value, state_b["state"][index][key]), (index, key)


@pytest.mark.parametrize("name, options", [
    ("sgd", {}), ("sgd", {"nesterov": True}), ("adamw", {"betas": [0.8, 0.99], "eps": 1e-8}), ("lamb", {}),
])
def test_each_optimizer_steps_bit_identical_to_the_class_built_by_hand(name, options):
    cfg = config(name, lr=0.05, weight_decay=0.02, **options)
    model, twin = toy_model(), toy_model()
    ours = build_optimizer(model, cfg, global_batch=256)
    decay, no_decay = ours.param_groups
    named = dict(model.named_parameters())
    assert {n for n, p in named.items() if any(p is q for q in no_decay["params"])} == NO_DECAY
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    hand = reference(name, mirrored_groups(ours, model, twin), cfg, lr=0.05)
    assert type(ours) is type(hand)
    step_both([(model, ours), (twin, hand)], steps=4)
    assert_same((model, ours), (twin, hand))


def test_lamb_leaves_clipping_to_the_trainer():
    """timm's Lamb clips the global gradient norm to 1.0 unless told not to; the step test's gradients
    (norm ~ 25) would differ from a clipped Lamb's."""
    model, clipped_model = toy_model(), toy_model()
    ours = build_optimizer(model, config("lamb"), global_batch=256)
    assert ours.defaults["max_grad_norm"] is None
    clipped = Lamb(mirrored_groups(ours, model, clipped_model), lr=0.1)
    step_both([(model, ours), (clipped_model, clipped)], steps=2)
    assert not torch.equal(model[0].weight, clipped_model[0].weight)


@pytest.mark.parametrize("name", NAMES)
def test_a_zero_gradient_step_decays_only_the_decay_group(name):
    lr, weight_decay = 0.1, 0.05
    model = toy_model()
    optimizer = build_optimizer(model, config(name, lr=lr, lr_scale_batch=None, weight_decay=weight_decay),
                                global_batch=64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    # SGD: p - lr * wd * p (the first momentum buffer is the gradient); AdamW: p * (1 - lr * wd), the Adam
    # term being 0; LAMB: the update is wd * p, rescaled by the trust ratio |p| / |wd * p| to p itself.
    shrink = 1 - lr if name == "lamb" else 1 - lr * weight_decay
    for n, p in model.named_parameters():
        if n in NO_DECAY:
            assert torch.equal(p, before[n]), n
        else:
            torch.testing.assert_close(p, before[n] * shrink, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_the_linear_scaling_rule_applies_to_every_optimizer(name):
    model = toy_model()
    scaled = build_optimizer(model, config(name, lr=0.1, lr_scale_batch=256), global_batch=512)
    assert [group["lr"] for group in scaled.param_groups] == [pytest.approx(0.2)] * 2
    given = build_optimizer(model, config(name, lr=0.1, lr_scale_batch=None), global_batch=512)
    assert [group["lr"] for group in given.param_groups] == [0.1, 0.1]


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_the_state_resumes_through_a_weights_only_checkpoint(name):
    cfg = config(name, lr=0.05)
    model = toy_model()
    optimizer = build_optimizer(model, cfg, global_batch=256)
    step_both([(model, optimizer)], steps=2)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = toy_model(seed=1)
    resumed_model.load_state_dict(saved["model"])
    resumed = build_optimizer(resumed_model, cfg, global_batch=256)
    resumed.load_state_dict(saved["optimizer"])
    step_both([(model, optimizer), (resumed_model, resumed)], steps=2, seed=2)
    assert_same((model, optimizer), (resumed_model, resumed))


@pytest.mark.parametrize("name, lr", [("adamw", 0.01), ("lamb", 0.02)])
def test_adaptive_optimizers_reduce_a_toy_loss_in_20_steps(name, lr):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(128, 6, generator=generator)
    labels = (images @ torch.randn(6, 3, generator=generator)).argmax(1)
    model = toy_model()
    optimizer = build_optimizer(model, config(name, lr=lr, lr_scale_batch=None, weight_decay=0.01),
                                global_batch=128)
    criterion = build_criterion(config(name))
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_the_start_up_line_describes_each_optimizer():
    model = toy_model()
    sgd = config("sgd", lr=0.1, no_weight_decay=[])
    assert describe_optimizer(sgd, build_optimizer(model, sgd, 64)) == (
        "SGD lr 0.025 momentum 0.9 weight decay 0.0001")
    lamb = config("lamb", lr=0.008, lr_scale_batch=None, weight_decay=0.02)
    optimizer = build_optimizer(model, lamb, 2048)
    assert describe_optimizer(lamb, optimizer) == (
        "LAMB lr 0.008 betas (0.9, 0.999) eps 1e-06 weight decay 0.02 (none on bn, bias)")
    # A warm-up scheduler lowers lr at once; the line gives the rate it warms up to.
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.01)
    assert describe_optimizer(lamb, optimizer).startswith("LAMB lr 0.008 ")


def test_an_untyped_config_gives_the_same_optimizer():
    """A plain DictConfig (strings, not the schema's enums), as an older run's saved config."""
    fields = OmegaConf.to_container(config("lamb", lr=0.05), enum_to_str=True)
    assert fields["name"] == "lamb" and fields["no_weight_decay"] == ["bn", "bias"]
    model, twin = toy_model(), toy_model()
    typed = build_optimizer(model, config("lamb", lr=0.05), 256)
    untyped = build_optimizer(twin, OmegaConf.create(fields), 256)
    step_both([(model, typed), (twin, untyped)], steps=2)
    assert_same((model, typed), (twin, untyped))


# --------------------------------------------------------------------------- losses
LOGITS = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
INDICES = torch.tensor([0, 2])
SOFT = torch.tensor([[0.7, 0.3, 0.0], [0.1, 0.15, 0.75]])


def loss_config(loss: str = "ce", **options):
    return OmegaConf.structured(OptimizerConfig(loss=LossName(loss), **options))


def hand_bce(targets: list[list[float]]) -> float:
    """mean over samples and classes of -[t log s(x) + (1 - t) log(1 - s(x))], s the logistic function."""
    terms = []
    for row, target_row in zip(LOGITS.tolist(), targets, strict=True):
        for x, t in zip(row, target_row, strict=True):
            s = 1 / (1 + math.exp(-x))
            terms.append(-(t * math.log(s) + (1 - t) * math.log(1 - s)))
    return sum(terms) / len(terms)


def test_ce_without_soft_targets_is_torchs_smoothed_cross_entropy():
    criterion = build_criterion(loss_config(label_smoothing=0.1))
    assert type(criterion) is nn.CrossEntropyLoss and criterion.label_smoothing == 0.1
    assert criterion.reduction == "mean" and criterion.weight is None


def test_ce_with_soft_targets_is_the_mean_of_minus_t_log_softmax():
    # The smoothing is already in mixup's targets: not applied again.
    criterion = build_criterion(loss_config(label_smoothing=0.1), soft_targets=True)
    expected = 0.0
    for row, target_row in zip(LOGITS.tolist(), SOFT.tolist(), strict=True):
        log_norm = math.log(sum(math.exp(x) for x in row))
        expected -= sum(t * (x - log_norm) for x, t in zip(row, target_row, strict=True))
    assert criterion(LOGITS, SOFT).item() == pytest.approx(expected / 2, rel=1e-6)


def test_bce_against_the_hand_formula():
    one_hot = [[1, 0, 0], [0, 0, 1]]
    assert build_criterion(loss_config("bce"))(LOGITS, INDICES).item() == pytest.approx(hand_bce(one_hot), rel=1e-6)
    # Smoothing 0.3 over 3 classes: off 0.3 / 3 = 0.1, on 1 - 0.3 + 0.1 = 0.8.
    smoothed = build_criterion(loss_config("bce", label_smoothing=0.3))(LOGITS, INDICES).item()
    assert smoothed == pytest.approx(hand_bce([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8]]), rel=1e-6)
    # Soft targets as given (no second smoothing), or binarised with t > threshold.
    soft = build_criterion(loss_config("bce", label_smoothing=0.3), soft_targets=True)
    assert soft(LOGITS, SOFT).item() == pytest.approx(hand_bce(SOFT.tolist()), rel=1e-6)
    thresholded = build_criterion(loss_config("bce", bce_target_threshold=0.2), soft_targets=True)
    assert thresholded(LOGITS, SOFT).item() == pytest.approx(hand_bce([[1, 1, 0], [0, 0, 1]]), rel=1e-6)


# --------------------------------------------------------------------------- option errors
@pytest.mark.parametrize("name, options, line", [
    ("adamw", {"betas": [0.9, 1.0]}, "optimizer.betas=[0.9, 1.0] must be two values in [0, 1), e.g. [0.9, 0.999]"),
    ("lamb", {"betas": [-0.1, 0.999]}, "optimizer.betas=[-0.1, 0.999] must be two values in [0, 1), e.g. [0.9, 0.999]"),
    ("lamb", {"betas": [0.9]}, "optimizer.betas=[0.9] must be two values in [0, 1), e.g. [0.9, 0.999]"),
    ("adamw", {"eps": 0.0}, "optimizer.eps=0.0 must be > 0"),
    ("lamb", {"eps": -1e-6}, "optimizer.eps=-1e-06 must be > 0"),
    ("adamw", {"lr": 0.0}, "optimizer.lr=0.0 must be > 0"),
    ("lamb", {"weight_decay": -0.1}, "optimizer.weight_decay=-0.1 must be >= 0"),
    ("sgd", {"momentum": 1.0}, "optimizer.momentum=1.0 must be in [0, 1)"),
])
def test_impossible_optimizer_options_are_one_line_naming_the_option(name, options, line):
    with pytest.raises(ValueError) as error:
        build_optimizer(toy_model(), config(name, **options), 256)
    assert str(error.value) == line


def test_options_of_another_optimizer_are_not_checked():
    # Only SGD reads momentum, only AdamW and LAMB read betas and eps.
    build_optimizer(toy_model(), config("adamw", momentum=1.0, nesterov=True), 256)
    build_optimizer(toy_model(), config("sgd", betas=[1.0, 2.0], eps=0.0), 256)


def test_unknown_names_in_an_untyped_config_are_one_line():
    fields = OmegaConf.to_container(config("sgd"), enum_to_str=True)
    with pytest.raises(ValueError) as error:
        build_optimizer(toy_model(), OmegaConf.create({**fields, "name": "adam"}), 256)
    assert str(error.value) == "optimizer.name='adam' must be one of sgd, adamw, lamb"
    with pytest.raises(ValueError) as error:
        build_criterion(OmegaConf.create({**fields, "loss": "focal"}))
    assert str(error.value) == "optimizer.loss='focal' must be one of ce, bce"


@pytest.mark.parametrize("threshold", [0.0, 1.0, 1.5, -0.2])
def test_impossible_bce_thresholds_are_one_line(threshold):
    with pytest.raises(ValueError) as error:
        build_criterion(loss_config("bce", bce_target_threshold=threshold))
    assert str(error.value) == f"optimizer.bce_target_threshold={threshold} must be in (0, 1) or null"
    # ce does not read it.
    build_criterion(loss_config("ce", bce_target_threshold=threshold))


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_label_smoothing_is_checked_for_both_losses(loss):
    with pytest.raises(ValueError) as error:
        build_criterion(loss_config(loss, label_smoothing=1.0))
    assert str(error.value) == "optimizer.label_smoothing=1.0 must be in [0, 1)"
