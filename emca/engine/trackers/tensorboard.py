"""TensorBoard events in the run folder itself (rank 0 only).

Tags: train_step/* every trainer.log_every optimizer steps (x: the optimizer step); per epoch
(x: the epoch) loss/{train,val,ema_val}, top1/{train,val,ema_val}, top5/{val,ema_val} and lr/epoch
(task=detection: loss/train and its parts, bbox_ap/val, segm_ap/val, ...: <figure>/<split> of any record),
which the Custom Scalars tab overlays (train against val against EMA); scales/<attention module>
histograms per validation; HParams (the run's parameters) with hparams/best_<trainer.best_metric>
and hparams/final_* at the end of a completed run.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from emca.engine.metrics import ScaleHistograms

# The Custom Scalars tab: one chart per metric with every series of it, on the epoch axis.
OVERLAYS = {
    "train vs val (per epoch)": {
        "loss": ["Multiline", ["loss/train", "loss/val", "loss/ema_val"]],
        "top-1": ["Multiline", ["top1/train", "top1/val", "top1/ema_val"]],
        "top-5": ["Multiline", ["top5/val", "top5/ema_val"]],
        # task=detection's COCO AP (its other figures, bbox_ap50/val and so on, are plain scalars).
        "box AP": ["Multiline", ["bbox_ap/val", "bbox_ap/ema_val"]],
        "mask AP": ["Multiline", ["segm_ap/val", "segm_ap/ema_val"]],
    }
}


def _missing(run_dir: Path, epochs: Sequence[tuple[int, Mapping[str, float]]]) -> list[tuple[int, dict]]:
    """The epoch scalars that no event file in run_dir holds (read as TensorBoard reads them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    present = {tag: {event.step for event in events.Scalars(tag)} for tag in tags}
    missing = []
    for epoch, scalars in epochs:
        lacking = {tag: value for tag, value in scalars.items() if epoch not in present.get(tag, ())}
        if lacking:
            missing.append((epoch, lacking))
    return missing


def _quiet_writer_failures(previous=threading.excepthook):
    """TensorBoard's writer thread re-raises a failed write (a full disk), which Python prints as a
    traceback; the writer raises it again at its next call, which the tracker's channel reports in
    one line. Other threads' exceptions go to the previous hook."""

    def hook(args: threading.ExceptHookArgs) -> None:
        if not (isinstance(args.thread, _AsyncWriterThread) and isinstance(args.exc_value, OSError)):
            previous(args)

    return hook


threading.excepthook = _quiet_writer_failures()


class TensorBoardTracker:
    def __init__(self, run_dir: Path, purge_step: Optional[int] = None,
                 epochs: Sequence[tuple[int, Mapping[str, float]]] = ()):
        """`epochs`: the (epoch, scalars) trained so far (a resumed run): those the run folder's event
        files lack (TensorBoard was off, or failed, meanwhile) are written again."""
        missing = _missing(run_dir, epochs) if epochs else []
        # purge_step drops step events a pre-empted run wrote after the checkpoint it resumes from.
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)
        self.writer.add_custom_scalars(OVERLAYS)
        for epoch, scalars in missing:
            self.log_epoch(epoch, scalars)

    def log_step(self, step: int, scalars: Mapping[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def log_epoch(self, epoch: int, scalars: Mapping[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, epoch)

    def log_histograms(self, epoch: int, histograms: ScaleHistograms) -> None:
        limits = histograms.bucket_limits()
        for index, name in enumerate(histograms.names):
            count, total, squares = histograms.moments[index].tolist()
            if count == 0:
                continue
            self.writer.add_histogram_raw(
                f"scales/{name}",
                min=histograms.minimum[index].item(),
                max=histograms.maximum[index].item(),
                num=int(count),
                sum=total,
                sum_squares=squares,
                bucket_limits=limits,
                bucket_counts=histograms.counts[index].tolist(),
                global_step=epoch,
            )

    def finish(self, params: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """Written with this writer (SummaryWriter.add_hparams would open a timestamped subfolder)."""
        experiment, session_start, session_end = hparams(dict(params), dict(metrics))
        for summary in (experiment, session_start, session_end):
            self.writer.file_writer.add_summary(summary)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value)

    def close(self) -> None:
        self.writer.close()
