"""The training engine: the run's life (trainer.py) and its parts, one concern per module.

distributed: process group, rank 0's run folder, collective timeouts;  reproducibility: seeds,
determinism, RNG state;  run_folder: the folder's lock, ownership, refusals that touch nothing;
checkpoint: the checkpoint generations (last.pt, best.pt, history; one file and its architecture
check are emca.common.checkpoint_file's);  compatibility: what a resumed run may change;  optim / schedule:
optimizers, losses and the learning-rate schedule;  step: one optimizer step (mixup, micro-batches,
autocast, clipping, EMA);  ema / mixing / precision: the weight average, mixup / CutMix, AMP dtypes;
metrics: loss / accuracy sums over ranks, attention-scale histograms;  progress: step lines, the bar,
the run's ETA;  trackers: TensorBoard, MLflow, W&B;  preemption: SIGTERM / SIGUSR1 / SIGINT;
slurm: the SLURM launcher's requeue;  results: results.json.
"""
