"""The command line's overrides, checked before Hydra composes them, and a run's own overrides on resume.

Hydra refuses a misspelt key with a hint that makes it worse (`trainer.epoch=2`: "To append to your
config use +trainer.epoch=2", which then runs 15 epochs with an `epoch: 2` beside them) and an unknown
choice with a 22-line block. Like argparse in timm's and torchvision's trainers, an entry point here
refuses both in one line naming the closest key or choice, `+` or not, before anything runs. A value of
the wrong type gets Hydra's multi-line ValidationError; here it is one line naming the option, the value
and what the schema's field accepts (its `accepted` or `minimum` metadata, else its type), and a number
given for a boolean is refused rather than read as true (OmegaConf reads `learned_scales=3` as true).

A run continued with `hydra.run.dir=<run folder> trainer.resume=...` continues *that* run: the overrides
recorded in <run folder>/.hydra/overrides.yaml apply unless the command line sets the same key, as timm
reloads its saved args.yaml; the trainer then refuses what would change the run's results so far.

Only hydra, omegaconf and emca.options are imported here: `eval.py --help` stays free of torch.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import sys
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ValidationError

from emca.options import override_key, shown

log = logging.getLogger(__name__)

# Flags after which the overrides are not ours to check: another config, or Hydra's own help and info.
_HANDS_OFF = ("-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir", "-h", "--help",
              "--hydra-help", "--info", "-i", "--version", "--shell-completion", "-sc", "--experimental-rerun")
# Where a run records its overrides (train.py's hydra_records).
OVERRIDES_RECORD = Path(".hydra") / "overrides.yaml"


class OverrideError(ValueError):
    """A command-line override that names no option or no choice, or gives a value of the wrong
    type: one line with the fix."""


def _overrides(argv: list[str]) -> list[str]:
    """The overrides among Hydra's command-line arguments (the rest are flags and their values)."""
    return [arg for arg in argv if not arg.startswith("-") and ("=" in arg or arg.startswith("~"))]


def _option_paths(node: Any, prefix: str = "") -> Iterator[str]:
    """The dotted names of a config's options (its leaves: values and lists)."""
    for name, item in node.items():
        if isinstance(item, dict):
            yield from _option_paths(item, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def _has_key(config: dict, key: str) -> bool:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict):
            return True  # an index into a list or a value: Hydra's own check says the rest
        if part not in node:
            return False
        node = node[part]
    return True


def _closest_keys(config: dict, key: str) -> list[str]:
    """Options spelt like `key`, or with its last part in another group (trainer.lr -> optimizer.lr)."""
    paths = list(_option_paths(config))
    last = key.rsplit(".", 1)[-1]
    same_name = [path for path in paths if path.rsplit(".", 1)[-1] == last]
    close = set(same_name + difflib.get_close_matches(key, paths, n=3, cutoff=0.75))
    # The same option in another group first (trainer.lr -> optimizer.lr), then by likeness.
    likeness = {path: difflib.SequenceMatcher(None, key, path).ratio() for path in close}
    return sorted(close, key=lambda path: (path not in same_name, -likeness[path]))[:3]


def _check_key(override: Any, config: dict, script: str) -> None:
    key, text = override.key_or_group, override.input_line
    exists = _has_key(config, key)
    if exists and override.is_add():
        raise OverrideError(f"{text}: {key} is an option already; set it without '+': {text.lstrip('+')}")
    if exists:
        return
    close = _closest_keys(config, key)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise OverrideError(f"{text}: {key} is not an option{hint}; `python {script} --cfg job` lists them all")


def _field(config: DictConfig, key: str) -> Optional[tuple[Any, dict]]:
    """(type, metadata) of the schema field `key` names in a composed config; None for a key that is
    no dataclass field (an untyped node, a list index)."""
    parent, _, name = key.rpartition(".")
    node = OmegaConf.select(config, parent) if parent else config
    schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
    if schema is None or not dataclasses.is_dataclass(schema):
        return None
    fields = {item.name: item for item in dataclasses.fields(schema)}
    if name not in fields:
        return None
    try:
        return typing.get_type_hints(schema)[name], dict(fields[name].metadata)
    except (NameError, TypeError):  # an annotation that does not resolve: Hydra's own check says the rest
        return None


def accepted(hint: Any, metadata: dict) -> str:
    """What a schema field accepts, as "must be ..." says it: its `accepted` metadata, or from
    `minimum` (an integer >= it) or its type; "or null" where the field is Optional."""
    if "accepted" in metadata:
        return metadata["accepted"]
    args = typing.get_args(hint)
    nullable = typing.get_origin(hint) is typing.Union and type(None) in args
    inner = next(arg for arg in args if arg is not type(None)) if nullable else hint
    if inner is bool:
        return "true, false or null" if nullable else "true or false"
    if "minimum" in metadata:
        text = f"an integer >= {metadata['minimum']}"
    elif typing.get_origin(inner) is list:
        item = (typing.get_args(inner) or (Any,))[0]
        text = "a list" + (f", each {_kind(item)}" if item is not Any else "")
    else:
        text = _kind(inner)
    return f"{text} or null" if nullable else text


def _kind(hint: Any) -> str:
    if isinstance(hint, type) and issubclass(hint, Enum):
        return "one of " + ", ".join(member.name for member in hint)
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _check_type(override: Any, config: DictConfig) -> None:
    """Refuse the value of `override` in one line where the schema's field does not take it."""
    if override.is_delete() or override.is_sweep_override():
        return  # a sweep's values are checked as each job composes
    key, value = override.key_or_group, override.value()
    found = _field(config, key)
    if found is None:
        return
    hint, metadata = found
    try:
        interpolation = isinstance(value, str) and value.startswith("${")
        if hint in (bool, Optional[bool]) and not isinstance(value, (bool, type(None))) and not interpolation:
            raise ValidationError("a number or a string is no boolean")
        OmegaConf.update(copy.deepcopy(config), key, value, merge=True)  # as Hydra will merge it
    except ValidationError:
        raise OverrideError(f"{key}={shown(value)} must be {accepted(hint, metadata)}") from None


def _choices(override: Any) -> list[str]:
    from hydra.core.override_parser.types import ValueType

    value = override.value()
    if override.value_type == ValueType.GLOB_CHOICE_SWEEP:
        return []  # attention=glob(emca_*): Hydra lists what it matches
    if hasattr(value, "list"):  # a choice sweep: attention=se,eca
        return [str(item) for item in value.list]
    return [] if value is None else [str(value)]


def _check_choice(override: Any, loader: Any, chosen: dict[str, Any]) -> None:
    group, text = override.key_or_group, override.input_line
    if override.is_add() and group in chosen:
        raise OverrideError(f"{text}: {group} is chosen already ({chosen[group]}); swap it without '+': "
                            f"{text.lstrip('+')}")
    if not override.is_add() and not override.is_force_add() and not override.is_delete() and group not in chosen:
        raise OverrideError(f"{text}: {group} is not chosen by default; add it with +{text}")
    for choice in _choices(override):
        subgroup, _, name = f"{group}/{choice}".rpartition("/")
        options = loader.get_group_options(subgroup)
        if name in options:
            continue
        close = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise OverrideError(f"{group}={choice} is not a choice of {subgroup}{hint}; the choices: {', '.join(options)}")


def _composition_overrides(parsed: list[Any], groups: set[str]) -> list[str]:
    """The group choices alone (a sweep's first value), for the composition the keys are checked in."""
    lines = []
    for override in parsed:
        choices = _choices(override) if override.key_or_group in groups else []
        if choices and not override.is_delete():
            lines.append(f"{override.get_key_element()}={choices[0]}")
    return lines


def check_command_line(config_dir: Path, config_name: str, argv: Optional[list[str]] = None) -> None:
    """Exit 1 with one line when an override of the command line names no option or no choice of
    `config_name` (in `config_dir`); overrides Hydra cannot parse are left to Hydra's own message."""
    argv = sys.argv[1:] if argv is None else argv
    if any(arg.split("=", 1)[0] in _HANDS_OFF for arg in argv):
        return
    try:
        check_overrides(config_dir, config_name, _overrides(argv), sys.argv[0])
    except OverrideError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


def check_overrides(config_dir: Path, config_name: str, overrides: list[str], script: str) -> None:
    """Raise OverrideError for the first override that names no option (any group, `+` or not), no
    choice of a config group, or a value its schema field does not take."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return  # Hydra's parser error says where the syntax is wrong
    parsed = [override for override in parsed if not override.is_hydra_override()]
    with initialize_config_dir(version_base="1.3", config_dir=str(Path(config_dir).resolve()), job_name=script):
        loader = GlobalHydra.instance().config_loader()
        groups = set(loader.list_groups(""))
        defaults = compose(config_name, return_hydra_config=True).hydra.runtime.choices
        chosen = {group: choice for group, choice in defaults.items() if not group.startswith("hydra/")}
        for override in parsed:
            if override.key_or_group in groups:
                _check_choice(override, loader, chosen)
        try:
            composed = compose(config_name, overrides=_composition_overrides(parsed, groups))
        except HydraException:
            return  # a composition error of a preset: Hydra reports it as it runs
    config = OmegaConf.to_container(composed, resolve=False, throw_on_missing=False)
    for override in parsed:
        if override.key_or_group not in groups:
            _check_key(override, config, script)
            _check_type(override, composed)


def continued_overrides(run_dir: Path, given: list[str]) -> Optional[list[str]]:
    """The overrides a resumed run composes: those <run_dir> recorded, less any key the command line
    sets, then the command line's; None when the folder recorded none or they add nothing."""
    path = Path(run_dir) / OVERRIDES_RECORD
    if not path.is_file():
        return None
    from emca.common.renamed_options import upgrade_override  # v0.2 runs recorded options since renamed

    recorded = [upgrade_override(str(line)) for line in OmegaConf.load(path)]
    keys = {override_key(line) for line in given}
    kept = [line for line in recorded if override_key(line) not in keys]
    return [*kept, *given] if kept else None
