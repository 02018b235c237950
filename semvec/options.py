"""Command-line flags generated from a job's typed config, so the CLI, the pipelines and the YAML
files name the same settings with the same help and defaults and cannot drift apart.

Every dataclass field becomes ``--field-name VALUE`` (underscores as dashes): booleans as
``--name`` / ``--no-name``, numbers typed, enums as their values (checked by the config itself, so
a bad value is one line naming the allowed ones), lists and mappings as YAML (``--snapshots
'[s3://b/new/]'``). A config class gives the help of each field in ``HELP``; the default is
appended from the dataclass. Flags left out are ``None``: the YAML file or the default applies.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from enum import Enum
from typing import Any

import yaml

from semvec.config import load_yaml


def _yaml(text: str) -> Any:
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a YAML value") from None


def _base(hint: Any) -> Any:
    """int | None -> int; list[str] -> list; an Enum class stays itself."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and args:
        return _base(args[0])
    return typing.get_origin(hint) or hint


def _shown(value: Any) -> str:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def flag_help(cls: type, field: dataclasses.Field) -> str:
    """The field's help from cls.HELP, with its default (or 'required') appended."""
    text = cls.HELP[field.name]
    hint = _base(typing.get_type_hints(cls)[field.name])
    if isinstance(hint, type) and issubclass(hint, Enum):
        text += f"; one of {', '.join(e.value for e in hint)}"
    if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
        return text + " (required)"
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if default is None or default == [] or default == {}:
        return text  # the help says what happens when it is not given
    return f"{text} (default: {_shown(default)})"


def add_config_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
                     title: str | None = None) -> list[str]:
    """Add a flag per field of cls (but skip); returns the destinations added."""
    group = parser.add_argument_group(title) if title else parser
    hints = typing.get_type_hints(cls)
    aliases = getattr(cls, "FLAG_ALIASES", {})
    added = []
    for field in dataclasses.fields(cls):
        if field.name in skip or not field.init:
            continue
        names = ["--" + field.name.replace("_", "-"), *aliases.get(field.name, ())]
        kind = _base(hints[field.name])
        common = {"dest": field.name, "default": None, "help": flag_help(cls, field)}
        if kind is bool:
            group.add_argument(*names, action=argparse.BooleanOptionalAction, **common)
        elif kind in (int, float):
            group.add_argument(*names, type=kind, metavar=kind.__name__.upper(), **common)
        elif kind in (list, dict) or dataclasses.is_dataclass(kind):  # a nested config: a mapping
            group.add_argument(*names, type=_yaml, metavar="YAML", **common)
        else:  # str and enums: the config checks an enum's value and names the allowed ones
            group.add_argument(*names, metavar="VALUE" if kind is not str else "TEXT", **common)
        added.append(field.name)
    return added


def given(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """The flags among names that were given on the command line."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
