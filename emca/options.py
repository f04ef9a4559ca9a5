"""The one-line form of every option check: "optimizer.lr=-1.0 must be > 0".

Each module checks the options it reads, where it reads them, and raises its own one-line error
type (ValueError for the trainer, which turns it into RunAborted; DatasetError for the data layer;
EvalError for eval.py), so that every entry point prints the line and exits 1 without a traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Any


def shown(value: Any) -> str:
    """A value as it is written on the command line (null, true, [0.3, 0.6]); strings quoted."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, Sequence):  # also OmegaConf's ListConfig
        return "[" + ", ".join(shown(item) for item in value) + "]"
    return str(value)


def require(ok: bool, option: str, value: Any, accepted: str, error: type[Exception] = ValueError) -> None:
    """Raise error("option=value must be accepted") unless ok."""
    if not ok:
        raise error(f"{option}={shown(value)} must be {accepted}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def require_int(
    option: str, value: Any, minimum: int, error: type[Exception] = ValueError, nullable: bool = False
) -> None:
    """An integer >= minimum (or null when nullable); also for untyped options such as eval.yaml's."""
    if nullable and value is None:
        return
    accepted = f"an integer >= {minimum}" + (" or null" if nullable else "")
    require(is_int(value) and value >= minimum, option, value, accepted, error)


def override_key(line: str) -> str:
    """The key or group a command-line override sets, as Hydra reads it: `+experiment=x` -> experiment,
    `++a.b=1` and `~a.b` -> a.b, `group@package=x` -> group."""
    return line.split("=", 1)[0].lstrip("+~").split("@", 1)[0]


def option_value(value: Any) -> Any:
    """An enum option's value as written in YAML: the schema gives enums, an untyped DictConfig strings."""
    return value.value if isinstance(value, Enum) else value
