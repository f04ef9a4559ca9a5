"""EMCA-Train's SLURM launcher: `hydra/launcher=slurm` (configs/hydra/launcher/slurm.yaml).

Hydra loads launchers only from the hydra_plugins namespace package, so the class lives here; what
it adds to Hydra's submitit SlurmLauncher is explained in emca/engine/slurm.py.
"""

import sys
from typing import Any

import cloudpickle
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

from emca.engine import slurm


class EMCASlurmLauncher(SlurmLauncher):
    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        # The job unpickles this launcher on the compute nodes, where the repository root (this
        # file's home) need not be on sys.path (the installed package is `emca` alone): it travels
        # by value. (Registered here: Hydra's plugin scan enters the module in sys.modules only
        # after running it.)
        cloudpickle.register_pickle_by_value(sys.modules[type(self).__module__])
        extra = self.params.get("additional_parameters") or {}
        self.params["additional_parameters"] = {
            **slurm.warning_sbatch_parameters(self.params["signal_delay_s"]),
            **extra,
        }

    def __call__(self, sweep_overrides: list[str], *args: Any, **kwargs: Any):
        """Runs in every SLURM task of the job."""
        slurm.requeue_on_warning_signal()
        slurm.export_torch_distributed_env()
        return super().__call__(slurm.with_resume_auto(sweep_overrides, replace=False), *args, **kwargs)

    def checkpoint(self, sweep_overrides: list[str], *args: Any, **kwargs: Any):
        """Called by submitit on the warning signal (rank 0 only): the submission to requeue."""
        import submitit

        return submitit.helpers.DelayedSubmission(
            self, slurm.with_resume_auto(sweep_overrides, replace=True), *args, **kwargs
        )
