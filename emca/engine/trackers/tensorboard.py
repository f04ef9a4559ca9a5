"""TensorBoard events in the run folder itself (rank 0 only).

Tags: train/{loss,top1,lr,images_per_s} per log_every steps; val/{loss,top1,top5} per epoch, and
ema_val/{loss,top1,top5} for the EMA weights (trainer.ema); scales/<attention module> histograms
per validation; hparams (the flattened config) with the metrics hparams/best_<trainer.best_metric>
and hparams/final_{val,ema_val}_{top1,top5} at the end of a completed run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from emca.engine.metrics import Metrics, ScaleHistograms


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys with the scalar types the HParams tab understands (lists and None as text)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


class TensorBoardLog:
    def __init__(self, run_dir: Path, purge_step: Optional[int] = None):
        # purge_step drops events a pre-empted run wrote after the checkpoint it resumes from.
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)

    def train_step(self, step: int, metrics: Metrics, lr: float, images_per_s: float) -> None:
        self.writer.add_scalar("train/loss", metrics.loss, step)
        self.writer.add_scalar("train/top1", metrics.top1, step)
        self.writer.add_scalar("train/lr", lr, step)
        self.writer.add_scalar("train/images_per_s", images_per_s, step)

    def validation(self, epoch: int, metrics: Metrics, tag: str = "val") -> None:
        """`tag`: val for the trained weights, ema_val for their average."""
        self.writer.add_scalar(f"{tag}/loss", metrics.loss, epoch)
        self.writer.add_scalar(f"{tag}/top1", metrics.top1, epoch)
        self.writer.add_scalar(f"{tag}/top5", metrics.top5, epoch)

    def scale_histograms(self, epoch: int, histograms: ScaleHistograms) -> None:
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

    def hparams(self, config: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """Written with this writer (SummaryWriter.add_hparams would open a timestamped subfolder)."""
        experiment, session_start, session_end = hparams(flatten_config(config), dict(metrics))
        for summary in (experiment, session_start, session_end):
            self.writer.file_writer.add_summary(summary)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value)

    def close(self) -> None:
        self.writer.close()
