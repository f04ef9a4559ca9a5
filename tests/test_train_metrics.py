"""Metric sums and attention-scale histograms (single process; the DDP reduction is in test_ddp)."""

import pytest
import torch
from torch import nn

from emca.engine.distributed import DistributedContext
from emca.engine.metrics import MetricSums, ScaleHistograms, correct_counts
from emca.engine.trackers import flatten_config

SINGLE = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def test_correct_counts_top1_top5():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    top1, top5 = correct_counts(logits, labels, (1, 5))  # k capped at the 3 classes
    assert (top1.item(), top5.item()) == (1, 3)
    top1, top2 = correct_counts(logits, labels, (1, 2))
    assert top2.item() == 1


def test_metric_sums_weight_by_batch_size():
    sums = MetricSums(torch.device("cpu"))
    sums.update(torch.tensor(1.0), torch.tensor([[1.0, 0.0]] * 3), torch.tensor([0, 0, 1]))
    sums.update(torch.tensor(4.0), torch.tensor([[0.0, 1.0]]), torch.tensor([1]))
    metrics = sums.reduce(SINGLE)
    assert metrics.count == 4
    assert metrics.loss == pytest.approx((1.0 * 3 + 4.0) / 4)
    assert metrics.top1 == pytest.approx(75.0) and metrics.top5 == pytest.approx(100.0)


def test_scale_histograms_cover_every_scale_of_every_module():
    modules = {name: nn.Module() for name in ("layer1.0.attn", "layer2.0.attn")}
    for module in modules.values():
        module.gate = nn.Sigmoid()
    histograms = ScaleHistograms(modules, torch.device("cpu"), bins=4)
    scales = modules["layer1.0.attn"].gate(torch.tensor([[-10.0, 0.0, 0.3, 10.0], [-0.5, 0.5, 1.5, 2.0]]))
    histograms.remove()
    modules["layer1.0.attn"].gate(torch.zeros(1, 4))  # after remove(): not recorded
    histograms.reduce(SINGLE)
    # Buckets (0, .25], (.25, .5], (.5, .75], (.75, 1]; sigmoid(0) = 0.5 falls in the second.
    assert histograms.counts[0].tolist() == [1, 2, 2, 3]
    assert histograms.counts[1].sum() == 0
    count, total, squares = histograms.moments[0].tolist()
    assert (
        count == 8
        and total == pytest.approx(scales.sum().item())
        and squares == pytest.approx((scales**2).sum().item())
    )
    assert histograms.minimum[0] == pytest.approx(scales.min().item()) and histograms.bucket_limits() == [
        0.25,
        0.5,
        0.75,
        1.0,
    ]


def test_flatten_config_for_hparams():
    flat = flatten_config(
        {"optimizer": {"lr": 0.1, "milestones": [0.3, 0.6]}, "trainer": {"resume": None, "amp": "off"}}
    )
    assert flat == {
        "optimizer.lr": 0.1,
        "optimizer.milestones": "[0.3, 0.6]",
        "trainer.resume": "None",
        "trainer.amp": "off",
    }
