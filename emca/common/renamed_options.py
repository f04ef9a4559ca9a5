"""Options renamed since v0.2, and how a value saved under the old name reads under the new one.

v0.2's reduction options meant different things per method: se_ratio=16 divided the channels,
gc_ratio=0.0625 multiplied them. Every method's is now `<method>_reduction`, the divisor of the
channels (hidden width C // reduction). Checkpoints (state["config"]), run folders (.hydra/config.yaml,
.hydra/overrides.yaml, results.json) written by v0.2 hold the old names: upgrade_config maps a saved
config wherever one is read, upgrade_override a recorded override where a resumed run composes them.

Only the standard library and omegaconf here: emca.cli, which `eval.py --help` imports, stays free of torch.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

log = logging.getLogger(__name__)


def _divisor(ratio: Any) -> int:
    """gc_ratio (the bottleneck's width per channel, 1/16) as the divisor gc_reduction (16)."""
    divisor = 1 / float(ratio) if float(ratio) > 0 else 0.0
    if divisor < 1 or abs(divisor - round(divisor)) > 1e-6:
        raise ValueError(f"attention.gc_ratio={ratio} (v0.2) has no attention.gc_reduction: 1/{ratio} is not a whole "
                         "number >= 1; set attention.gc_reduction=N instead (hidden width channels // N)")
    return round(divisor)


# Old dotted name -> (new dotted name, the old value as the new option's value).
RENAMED: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "attention.se_ratio": ("attention.se_reduction", lambda value: value),  # the same divisor, renamed
    "attention.gc_ratio": ("attention.gc_reduction", _divisor),
}


def upgrade_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config (plain containers) with its v0.2 option names mapped to today's; a copy, the
    input untouched. A config that holds both names keeps the new one."""
    upgraded = dict(config)
    for old, (new, convert) in RENAMED.items():
        group, old_key = old.split(".")
        section = upgraded.get(group)
        if not isinstance(section, Mapping) or old_key not in section:
            continue
        section = dict(section)
        value = section.pop(old_key)
        section.setdefault(new.split(".")[1], convert(value))
        upgraded[group] = section
    return upgraded


def upgrade_override(line: str) -> str:
    """A recorded override in today's names (`attention.gc_ratio=0.125` -> `attention.gc_reduction=8`),
    with a log line saying so; any other override unchanged."""
    key, equals, value = line.partition("=")
    prefix = key[: len(key) - len(key.lstrip("+~"))]
    if not equals or key.lstrip("+~") not in RENAMED:
        return line
    new, convert = RENAMED[key.lstrip("+~")]
    from omegaconf import OmegaConf  # parses the value as Hydra would (0.125 -> float)

    parsed = OmegaConf.create({"v": value}).v if value else value
    upgraded = f"{prefix}{new}={convert(parsed)}"
    log.info(f"{line} is a v0.2 option: applied as {upgraded}")
    return upgraded
