"""The training engine: trainer loop (trainer.py) and its parts, one concern per module.

distributed: process group, rank 0's run folder, collective timeouts;  reproducibility: seeds,
determinism, RNG state;  run_folder: the folder's lock, ownership, refusals that touch nothing;
checkpoint: last.pt and best.pt replaced together, architecture check;  optim / schedule: SGD and
its learning-rate schedule;  metrics: loss / accuracy sums over ranks, attention-scale histograms;
progress: step lines and the terminal bar;  trackers: TensorBoard, MLflow, W&B;  preemption: SIGTERM /
SIGUSR1 / SIGINT;  results: results.json.
"""
