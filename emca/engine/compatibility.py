"""What a resumed run may change: nothing that plans its learning-rate schedule or its steps.

A checkpoint's scheduler state is an iteration count, and its rate follows from the options below:
continuing with another value would re-plan the rest of the run silently (a changed trainer.epochs
moves every step milestone and the cosine's end). `trainer.resume` therefore refuses any change to
them in one line. The one deliberate exception: a larger trainer.epochs for a run that completed
all its epochs, which extends it on the schedule planned for the new length, as the log states.
model.init_from (a new run from a checkpoint's weights) is not checked: it starts a new schedule.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from emca.options import shown

log = logging.getLogger(__name__)

# The options that plan the schedule and the steps: every optimizer option (the rate, its scaling,
# the schedule, the optimizer whose state the checkpoint holds), the global batch and its split.
SCHEDULE_OPTIONS = ("trainer.epochs", "optimizer", "dataset.batch_size", "trainer.accumulate",
                    "trainer.max_steps_per_epoch")
_ABSENT = object()


def _flatten(config: Any, prefix: str) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return {key: value for name, item in config.items()
                for key, value in _flatten(item, f"{prefix}.{name}").items()}
    return {prefix: config}


def _lookup(config: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(config, Mapping) or part not in config:
            return _ABSENT
        config = config[part]
    return config


def schedule_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """The schedule-defining options of a resolved config (plain containers), flattened to dotted keys."""
    found: dict[str, Any] = {}
    for option in SCHEDULE_OPTIONS:
        value = _lookup(config, option)
        if value is not _ABSENT:
            found.update(_flatten(value, option))
    return found


def check_resume_schedule(
    saved: Optional[Mapping[str, Any]], current: Any, path: Path, progress: Mapping[str, Any]
) -> None:
    """Refuse (ValueError, one line) resuming `path`, trained with config `saved` (its resolved
    config), under the config `current` (a DictConfig) whose schedule-defining options differ;
    options that one of the two lacks (a config of an older version) are not compared. `progress`:
    the checkpoint's (epochs completed, steps of the next)."""
    if not saved:
        return
    if isinstance(current, DictConfig):
        current = OmegaConf.to_container(current, resolve=True, enum_to_str=True)
    before, after = schedule_options(saved), schedule_options(current)
    changed = [key for key in after if key in before and before[key] != after[key]]
    if not changed:
        return
    old_epochs, new_epochs = before.get("trainer.epochs"), after.get("trainer.epochs")
    epochs_completed = progress.get("epoch", 0)
    completed = isinstance(old_epochs, int) and epochs_completed >= old_epochs and not progress.get("step_in_epoch")
    if changed == ["trainer.epochs"] and completed and new_epochs > epochs_completed:
        log.info(f"trainer.epochs={new_epochs}: extending the completed {old_epochs}-epoch run of {path} by "
                 f"{new_epochs - epochs_completed} epochs, on the schedule planned for {new_epochs} epochs")
        return
    differences = ", ".join(f"{key}={shown(after[key])} (the checkpoint's: {shown(before[key])})" for key in changed)
    raise ValueError(
        f"refusing to resume {path} with another schedule: {differences}; continue with the run's own "
        f"values (its .hydra/config.yaml), or start a new run from its weights with model.init_from={path}"
    )
