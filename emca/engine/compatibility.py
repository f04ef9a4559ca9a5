"""What a resumed run may change: how it is run and watched, never what it computes.

A run's record (its .hydra/config.yaml, results.json and checkpoints) is the truth about the whole
run, so a continued run must be the same run: `trainer.resume` refuses, in one line naming each key,
any change of the data, its geometry, the seed, the model, the recipe or the schedule. What it
accepts are the options of RESUME_FREE below, which change neither the batches nor the arithmetic
(where the data lies, loader workers, the device, logging and trackers), and one deliberate
extension: a larger trainer.epochs for a run that completed all its epochs, which continues it on
the schedule planned for the new length, as the log states. The schedule options get their own
message: a checkpoint's scheduler state is an iteration count whose rate follows from them, so a
changed value would re-plan the rest of the run silently. model.init_from (a new run from a
checkpoint's weights) is free: a continued run takes its weights from the checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from emca.common.renamed_options import upgrade_config
from emca.engine.errors import continue_command
from emca.options import shown

log = logging.getLogger(__name__)

# The options that plan the schedule and the steps: every optimizer option (the rate, its scaling,
# the schedule, the optimizer whose state the checkpoint holds), the global batch and its split.
SCHEDULE_OPTIONS = ("trainer.epochs", "optimizer", "dataset.batch_size", "trainer.accumulate",
                    "trainer.max_steps_per_epoch")
# The options (and groups) a continued run may change: where the data lies (the checkpoint's fingerprint
# checks it is the same data), how fast it is read (the samplers, not the workers, decide every batch),
# the device and its process group, and what is logged or tracked. The rest is compared.
# dataset.epochs only acts through trainer.epochs, which is compared.
RESUME_FREE = ("trainer.resume", "trainer.device", "trainer.compile", "trainer.dist_timeout_s", "trainer.log_every",
               "trainer.log_every_s", "trainer.stop_check_every", "trainer.keep_last_n", "logger", "model",
               "dataset.root", "dataset.workers",
               "dataset.epochs",
               "dataset.on_bad_image", "loader.prefetch_queue_depth", "loader.dali_dont_use_mmap",
               "loader.dali_read_ahead", "loader.dali_reader_prefetch", "loader.prefetch_factor", "loader.pin_memory",
               "loader.persistent_workers")


def _flatten(config: Any, prefix: str) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return {key: value for name, item in config.items()
                for key, value in _flatten(item, f"{prefix}.{name}").items()}
    return {prefix: config}


def _within(key: str, options: tuple[str, ...]) -> bool:
    return any(key == option or key.startswith(f"{option}.") for option in options)


def run_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """The options of a resolved config that a continued run must keep, flattened to dotted keys."""
    return {key: value for name, item in config.items() for key, value in _flatten(item, name).items()
            if not _within(key, RESUME_FREE)}


def check_resume_config(
    saved: Optional[Mapping[str, Any]], current: Any, path: Path, progress: Mapping[str, Any], run_dir: Path
) -> None:
    """Refuse (ValueError, one line) resuming `path`, trained with config `saved` (its resolved
    config), in `run_dir` under the config `current` (a DictConfig) that changes what the run
    computes; options that one of the two lacks (a config of an older version) are not compared.
    `progress`: the checkpoint's (epochs completed, steps of the next)."""
    if not saved:
        return
    if isinstance(current, DictConfig):
        current = OmegaConf.to_container(current, resolve=True, enum_to_str=True)
    # A v0.2 run's config may name options since renamed (attention.gc_ratio): compared in today's names.
    before, after = run_options(upgrade_config(saved)), run_options(current)
    changed = [key for key in after if key in before and before[key] != after[key]]
    if not changed:
        return
    # What the advice says works as written: train.py applies a run's recorded overrides when it continues.
    fix = (f"drop them to continue with the run's own values ({continue_command(run_dir)} applies them), or start a "
           f"new run from its weights with model.init_from={path}")
    if all(_within(key, SCHEDULE_OPTIONS) for key in changed):
        _check_schedule(before, after, changed, path, progress, fix)
        return
    differences = ", ".join(f"{key}={shown(after[key])} (the run's: {shown(before[key])})" for key in changed)
    raise ValueError(f"refusing to resume {path} with options that change what the run computes: {differences}; "
                     f"{fix}")


def _check_schedule(before: dict[str, Any], after: dict[str, Any], changed: list[str], path: Path,
                    progress: Mapping[str, Any], fix: str) -> None:
    """Only schedule options differ: a completed run may be extended, anything else is refused."""
    old_epochs, new_epochs = before.get("trainer.epochs"), after.get("trainer.epochs")
    epochs_completed = progress.get("epoch", 0)
    completed = isinstance(old_epochs, int) and epochs_completed >= old_epochs and not progress.get("step_in_epoch")
    if changed == ["trainer.epochs"] and completed and new_epochs > epochs_completed:
        log.info(f"trainer.epochs={new_epochs}: extending the completed {old_epochs}-epoch run of {path} by "
                 f"{new_epochs - epochs_completed} epochs, on the schedule planned for {new_epochs} epochs")
        return
    differences = ", ".join(f"{key}={shown(after[key])} (the checkpoint's: {shown(before[key])})" for key in changed)
    raise ValueError(f"refusing to resume {path} with another schedule: {differences}; {fix}")
