"""Learning-rate schedules, the linear scaling rule and the weight-decay exemptions."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from emca.config import OptimizerConfig
from emca.engine.optim import build_optimizer, no_decay_parameter_names, scaled_lr
from emca.engine.schedule import (
    build_scheduler,
    describe_milestones,
    describe_warmup,
    distinct_from,
    lr_factor,
    milestone_epochs,
    warmup_epochs_used,
)
from emca.models import build_model


def test_paper_milestones_are_epochs_30_60_90_of_100():
    assert milestone_epochs([0.3, 0.6, 0.9], 100) == [30, 60, 90]
    assert milestone_epochs([0.3, 0.6, 0.9], 90) == [27, 54, 81]
    assert milestone_epochs([0.3, 0.9], 15) == [5, 14]  # halves round up
    assert milestone_epochs([0.3, 0.6, 0.9], 1) == [1]  # never before the first epoch, merged there
    with pytest.raises(ValueError, match="fractions"):
        milestone_epochs([30, 60], 100)


def test_step_schedule_decays_exactly_at_epoch_boundaries():
    steps = 7
    factor = lr_factor("step", epochs=100, steps_per_epoch=steps, milestones=[0.3, 0.6, 0.9], gamma=0.1)
    assert factor(0) == 1.0
    assert factor(30 * steps - 1) == 1.0 and factor(30 * steps) == pytest.approx(0.1)
    assert factor(60 * steps - 1) == pytest.approx(0.1) and factor(60 * steps) == pytest.approx(0.01)
    assert factor(90 * steps) == pytest.approx(0.001) and factor(100 * steps - 1) == pytest.approx(0.001)


def test_warmup_then_cosine():
    steps, epochs, warmup = 10, 20, 5
    factor = lr_factor("cosine", epochs=epochs, steps_per_epoch=steps, warmup_epochs=warmup)
    ramp = [factor(i) for i in range(warmup * steps)]
    assert ramp[0] == pytest.approx(1 / 50) and ramp[-1] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(ramp, ramp[1:], strict=False))
    assert factor(warmup * steps) == pytest.approx(1.0)
    middle = warmup * steps + (epochs - warmup) * steps // 2
    assert factor(middle) == pytest.approx(0.5)
    assert factor(epochs * steps - 1) == pytest.approx(0.5 * (1 + math.cos(math.pi * (149 / 150))))


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_a_run_too_short_for_its_warmup_warms_up_over_all_but_its_last_epoch(schedule):
    # recipe=rsb_a3 trainer.epochs=2 (5 warm-up epochs) was refused; it trains 1 warm-up epoch, then the schedule.
    assert [warmup_epochs_used(5, epochs) for epochs in (1, 2, 5, 6, 100)] == [0, 1, 4, 5, 5]
    steps = 4
    capped = lr_factor(schedule, epochs=2, steps_per_epoch=steps, warmup_epochs=5, milestones=[0.9])
    chosen = lr_factor(schedule, epochs=2, steps_per_epoch=steps, warmup_epochs=1, milestones=[0.9])
    # The rates follow from the config alone, so a resumed run replans them identically.
    assert [capped(i) for i in range(2 * steps)] == [chosen(i) for i in range(2 * steps)]
    assert [capped(i) for i in range(steps)] == [0.25, 0.5, 0.75, 1.0]
    unchanged = lr_factor(schedule, epochs=6, steps_per_epoch=steps, warmup_epochs=5, milestones=[0.9])
    assert unchanged(5 * steps - 1) == 1.0 and unchanged(5 * steps - 2) < 1.0  # a warm-up that fits is kept


def test_the_start_up_line_names_the_override_of_a_capped_warmup():
    assert describe_warmup(5, 100) == "warm-up 5 epochs"
    assert describe_warmup(1, 3) == "warm-up 1 epoch"
    assert describe_warmup(5, 2) == (
        "warm-up 1 epoch (optimizer.warmup_epochs=5 does not fit trainer.epochs=2: capped to leave 1 epoch for the "
        "schedule; set optimizer.warmup_epochs=N < 2 to choose)"
    )
    assert describe_warmup(3, 1).startswith("warm-up 0 epochs (optimizer.warmup_epochs=3 does not fit")


def test_linear_scaling_rule():
    assert scaled_lr(0.1, 1024, None) == 0.1
    assert scaled_lr(0.1, 1024, 256) == pytest.approx(0.4)
    assert scaled_lr(0.1, 64, 256) == pytest.approx(0.025)


def test_scheduler_state_resumes_the_same_rates():
    cfg = OmegaConf.structured(OptimizerConfig(warmup_epochs=1))

    def fresh():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        return optimizer, build_scheduler(optimizer, cfg, epochs=10, steps_per_epoch=4)

    optimizer, scheduler = fresh()
    rates = []
    for _ in range(40):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    optimizer, scheduler = fresh()
    for _ in range(13):
        optimizer.step()
        scheduler.step()
    # As a checkpoint does: the optimizer's state holds the current rate, the scheduler's the step.
    states = optimizer.state_dict(), scheduler.state_dict()
    optimizer, scheduler = fresh()
    optimizer.load_state_dict(states[0])
    scheduler.load_state_dict(states[1])
    resumed = []
    for _ in range(27):
        resumed.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert resumed == rates[13:]


def _srm_resnet18():
    return build_model(
        {"name": "resnet18"},
        {"name": "emca_srm", "integration": "first"},
        {"stages": 1, "blocks": "all"},
        num_classes=10,
    )


def test_no_weight_decay_kinds():
    model = _srm_resnet18()
    params = dict(model.named_parameters())
    bn = no_decay_parameter_names(model, ["bn"])
    assert "bn1.weight" in bn and "bn1.bias" in bn and "fc.bias" not in bn
    assert all(params[name].ndim == 1 for name in bn)
    bias = no_decay_parameter_names(model, ["bias"])
    assert "fc.bias" in bias and "bn1.bias" in bias and "bn1.weight" not in bias
    srm = no_decay_parameter_names(model, ["srm"])
    assert srm and all(".attn." in name for name in srm)
    # Attention parameters belong to SRM only for SRM-based attention.
    eca = build_model({"name": "resnet18"}, {"name": "emca_eca", "integration": "first"},
                      {"stages": 1, "blocks": "all"}, num_classes=10)
    assert no_decay_parameter_names(eca, ["srm"]) == set()
    assert not any(name.startswith("conv1") or ".conv" in name.split(".attn.")[0] for name in bn | bias | srm)


def test_optimizer_groups_and_scaled_lr():
    model = _srm_resnet18()
    cfg = OmegaConf.structured(OptimizerConfig(lr=0.1, lr_scale_batch=256, no_weight_decay=["bn", "bias", "srm"]))
    optimizer = build_optimizer(model, cfg, global_batch=512)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert decay["lr"] == pytest.approx(0.2) and decay["momentum"] == 0.9
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert all(p.ndim > 1 for p in decay["params"])
    # The paper's recipe: one group, weight decay on everything, lr 0.1 per 256 images.
    plain = build_optimizer(model, OmegaConf.structured(OptimizerConfig()), global_batch=64)
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["lr"] == pytest.approx(0.025)
    unscaled = build_optimizer(
        model, OmegaConf.structured(OptimizerConfig(lr_scale_batch=None)), global_batch=64
    )
    assert unscaled.param_groups[0]["lr"] == 0.1


def test_impossible_schedules_name_the_option_at_fault():
    with pytest.raises(ValueError, match=r"^optimizer\.milestones=\[0\.6, 0\.3\] must be increasing fractions"):
        milestone_epochs([0.6, 0.3], 100)
    # A run of no epochs is trainer.epochs' fault, not the warm-up's.
    with pytest.raises(ValueError, match=r"^trainer\.epochs=0 must be an integer >= 1$"):
        lr_factor("cosine", epochs=0, steps_per_epoch=1)
    with pytest.raises(ValueError, match=r"^optimizer\.gamma=-0\.1 must be > 0$"):
        lr_factor("step", epochs=10, steps_per_epoch=1, milestones=[0.5], gamma=-0.1)


@pytest.mark.parametrize("epochs", [3, 4, 5, 7, 10, 15, 30, 90, 100, 101, 300])
def test_distinct_milestones_are_the_old_rule_exactly(epochs):
    fractions = [0.3, 0.6, 0.9]
    old = [max(1, math.floor(fraction * epochs + 0.5)) for fraction in fractions]  # the rule before merging
    assert milestone_epochs(fractions, epochs) == old
    assert describe_milestones(fractions, epochs, 0.1) == f"x0.1 at epochs {old}"
    factor = lr_factor("step", epochs=epochs, steps_per_epoch=3, milestones=fractions, gamma=0.1)
    assert [factor(step) for step in range(epochs * 3)] == [
        0.1 ** sum(step >= epoch * 3 for epoch in old) for step in range(epochs * 3)
    ]


def test_a_short_run_merges_milestones_that_round_to_one_epoch():
    # The 2-epoch quick run: 0.3 and 0.6 both round to epoch 1, one x0.1 there (not x0.01), 0.9 to the end.
    assert milestone_epochs([0.3, 0.6, 0.9], 2) == [1, 2]
    factor = lr_factor("step", epochs=2, steps_per_epoch=4, milestones=[0.3, 0.6, 0.9], gamma=0.1)
    assert [factor(step) for step in range(8)] == [1.0] * 4 + [pytest.approx(0.1)] * 4
    assert distinct_from([0.3, 0.6, 0.9], 2) == 3 and distinct_from([0.3, 0.6, 0.9], 1) == 3
    assert distinct_from([0.3, 0.9], 15) == 15 and distinct_from([0.5, 0.51], 1) == 50
    line = describe_milestones([0.3, 0.6, 0.9], 2, 0.1)
    assert line == ("x0.1 at epochs [1, 2] (trainer.epochs=2 is too short for optimizer.milestones=[0.3, 0.6, 0.9]: "
                    "[0.3, 0.6] -> epoch 1, merged into one x0.1; trainer.epochs>=3 gives each its own epoch)")
    assert "[0.3, 0.6, 0.9] -> epoch 1" in describe_milestones([0.3, 0.6, 0.9], 1, 0.1)
