"""Step lines when nobody watches a terminal: a pipe, a log file or a zero-width pseudo-terminal got
its first line after 53 s and then two an epoch. Whatever trainer.log_every says, rank 0 writes one
after the first step the process trains and then at least every log_every_s seconds of wall time."""

import itertools
import logging
import re

import torch

from emca.engine import progress as progress_module
from emca.engine.metrics import MetricSums
from emca.engine.progress import EpochProgress, RunClock, StepTimer
from emca.engine.trainer import train

from conftest import SYNTHETIC_RUN


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def a_window() -> MetricSums:
    window = MetricSums(torch.device("cpu"))
    window.update(torch.tensor(2.0), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    return window


def test_a_line_after_the_first_step_and_then_every_log_every_s(monkeypatch, caplog):
    clock = FakeClock()
    monkeypatch.setattr(progress_module, "_clock", clock)
    timer = StepTimer()
    with caplog.at_level(logging.INFO, logger=progress_module.__name__):
        with EpochProgress(1, 2, 100, 0, enabled=True, every_s=30.0, first_line=True) as shown:
            shown.advance()
            timer.stepped()
            assert shown.line_due()  # at once, however slow the start
            shown.interim(a_window().local(), 0.1, timer, RunClock(), (199, 2), world_size=1,
                          device=torch.device("cpu"))
            assert not shown.line_due()
            clock.now = 29.9
            assert not shown.line_due()
            clock.now = 30.0
            assert shown.line_due()
    assert len(caplog.messages) == 1
    line = r"epoch 1/2 step 1/100  loss 2.0000  top1 50.00%  lr 0.1  \d+ img/s .* eta \S+$"
    assert re.match(line, caplog.messages[0]), caplog.messages


def test_the_first_line_is_the_processs_not_every_epochs_and_other_ranks_write_none(monkeypatch):
    monkeypatch.setattr(progress_module, "_clock", FakeClock())
    assert not EpochProgress(2, 2, 100, 0, enabled=True, every_s=30.0, first_line=False).line_due()
    assert not EpochProgress(1, 2, 100, 0, enabled=False, every_s=30.0, first_line=True).line_due()


def test_an_interim_line_leaves_the_window_open_for_the_regular_line(monkeypatch, caplog):
    monkeypatch.setattr(progress_module, "_clock", FakeClock())
    timer, window = StepTimer(), a_window()
    timer.stepped()
    with caplog.at_level(logging.INFO, logger=progress_module.__name__):
        with EpochProgress(1, 1, 10, 0, enabled=True, every_s=30.0, first_line=True) as shown:
            shown.advance()
            shown.interim(window.local(), 0.1, timer, RunClock(), (9, 1), world_size=2, device=torch.device("cpu"))
    assert window.totals.tolist() == [4.0, 1.0, 2.0, 2.0] and timer.steps == 1
    assert caplog.messages[0].endswith("  (rank 0's batches)")


def test_a_non_terminal_run_logs_its_first_step_at_once_and_then_by_wall_time(compose_train, tmp_path, monkeypatch,
                                                                              caplog):
    caplog.set_level(logging.INFO)  # what train.py's logging config sets
    # 10 fake seconds pass at every clock read: a line is due every few steps, while log_every never comes.
    ticks = itertools.count(step=10.0)
    monkeypatch.setattr(progress_module, "_clock", lambda: next(ticks))
    train(compose_train(*SYNTHETIC_RUN, "trainer.max_steps_per_epoch=8", "trainer.log_every=1000"), str(tmp_path))
    lines = (tmp_path / "train.log").read_text().splitlines()
    steps = [int(m.group(1)) for line in lines if (m := re.search(r"epoch 1/2 step (\d+)/8 ", line))]
    assert steps[0] == 1 and steps[-1] == 8 and len(steps) >= 4, steps  # at once, by the clock, the epoch's end
    # Epoch 2 starts no new "first" line, but the clock keeps its lines coming.
    later = [int(m.group(1)) for line in lines if (m := re.search(r"epoch 2/2 step (\d+)/8 ", line))]
    assert later[0] > 1 and len(later) >= 2, later
