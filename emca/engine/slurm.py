"""SLURM through Hydra's submitit launcher: `python train.py -m hydra/launcher=slurm ...`.

configs/hydra/launcher/slurm.yaml selects hydra_plugins/emca_slurm_launcher.py (Hydra only accepts
launchers from the hydra_plugins package), Hydra's submitit SlurmLauncher plus what a multi-node,
pre-emptible training run needs, built from the pieces below:

1. One SLURM task per GPU, each joining torch.distributed. The trainer reads torchrun's variables,
   so every task exports its SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and the job's first node as
   RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR (MASTER_PORT derived from the job id), as
   submitit's TorchDistributedEnvironment computes them.
2. SLURM warns the job `signal_delay_s` before its time limit with SIGUSR1 (sbatch --signal): the
   trainer's signal for "save last.pt and stop". submitit's own requeue handler is attached to
   SIGUSR1 too (submitit listens to SIGUSR2 by default), underneath the trainer's: the trainer
   finishes its step, saves, and hands the signal on; submitit then calls the launcher's
   `checkpoint` and requeues the job (`scontrol requeue`).
3. The job runs with trainer.resume=auto unless the command line sets trainer.resume, and a
   requeued job with trainer.resume=auto whatever was set: the rerun continues from last.pt. That
   also covers pre-emption by SIGTERM on clusters that requeue pre-empted jobs (PreemptMode=REQUEUE,
   with the job submitted --requeue).
"""

from __future__ import annotations

import os
import signal
from typing import Any, Sequence

from emca.options import override_key

# The trainer saves last.pt and stops on it (emca.engine.preemption).
WARNING_SIGNAL = signal.SIGUSR1
RESUME_KEY = "trainer.resume"


def with_resume_auto(overrides: Sequence[str], replace: bool) -> list[str]:
    """The overrides plus trainer.resume=auto; an existing trainer.resume is kept unless `replace`."""
    others = [o for o in overrides if override_key(o) != RESUME_KEY]
    if len(others) < len(overrides) and not replace:
        return list(overrides)
    return others + [f"{RESUME_KEY}=auto"]


def export_torch_distributed_env() -> None:
    """RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT of this SLURM task, when the job
    has several tasks and nothing (torchrun) set them already."""
    import submitit

    if submitit.JobEnvironment().num_tasks > 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        # The trainer picks cuda:LOCAL_RANK itself, so every task keeps seeing all of the node's GPUs.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def requeue_on_warning_signal() -> None:
    """Attach submitit's requeue handler (installed for its own signal when the job started) to
    WARNING_SIGNAL; the trainer later installs its handler on top and hands the signal on to it."""
    import submitit

    submitit_signal = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
    handler = signal.getsignal(submitit_signal)
    if submitit_signal != WARNING_SIGNAL and callable(handler):
        signal.signal(WARNING_SIGNAL, handler)


def warning_sbatch_parameters(signal_delay_s: int) -> dict[str, Any]:
    """sbatch flags: warn with WARNING_SIGNAL `signal_delay_s` before the time limit; requeueable."""
    return {"signal": f"{WARNING_SIGNAL.name.removeprefix('SIG')}@{signal_delay_s}", "requeue": True}
