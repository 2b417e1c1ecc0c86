"""Typed configs: one dataclass is the single source of every flag.

`parse_config(Cls, argv)` builds the argparse CLI from the dataclass fields, lets
`--config file.yaml|json` set any field, and rejects unknown flags/keys and bad values with one
line and exit status 2 — before any model is built. Each field is declared with `arg(...)`, which
carries everything known about the flag: its help, choices and bound (checked here), and whatever
further metadata the config class defines (the trainer's resume policy, recipe and demo default);
lists of flags are derived from that metadata, never written out by hand.

A config class may also list `ALIASES` (`Alias`: another tool's name for something a flag already
says, e.g. diffusers' `--dataset_name`) and translate them in `apply_aliases(values, given)`; an alias
is a flag and a config-file key like any other, and the flag list shows it once, with what it maps to.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from typing import Any

import yaml

from common.errors import ConfigError
from common.helpers import one_line


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints usage + error; we print only the error line (the usage is in --help)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


# A flag's bound: (test, what the error says). None values (an optional flag left unset) are not checked.
BOUNDS = {
    "positive": (lambda v: v > 0, "must be positive"),
    "at_least_1": (lambda v: v >= 1, "must be at least 1"),
    "non_negative": (lambda v: v >= 0, "must be >= 0"),
    "unit_interval": (lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
}


@dataclasses.dataclass(frozen=True)
class Alias:
    """A flag that is another tool's name for what a field says; `maps_to` says onto what, for --help and the flag list."""

    name: str
    help: str
    maps_to: str


def aliases_of(cls: type) -> tuple[Alias, ...]:
    return tuple(getattr(cls, "ALIASES", ()))


def arg(
    default: Any = dataclasses.MISSING,
    help: str = "",
    choices: tuple | None = None,
    *,
    bound: str | None = None,
    **metadata: Any,
) -> Any:
    """A dataclass field carrying its CLI help, choices and bound (a key of BOUNDS), plus any further metadata."""
    if bound is not None and bound not in BOUNDS:
        raise ValueError(f"unknown bound {bound!r}; one of {', '.join(BOUNDS)}")
    meta = {"help": help, "choices": choices, "bound": bound, **metadata}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def field_default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def check_bounds(cfg: Any) -> None:
    """ConfigError (one line) for the first field whose value breaks its declared bound."""
    for f in dataclasses.fields(cfg):
        bound, value = f.metadata.get("bound"), getattr(cfg, f.name)
        if bound is not None and value is not None and not BOUNDS[bound][0](value):
            raise ConfigError(f"--{f.name} {BOUNDS[bound][1]}, got {value}")


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_optional) for `X | None`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _str_to_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _optional(parse):
    def convert(text: str):
        return None if text.lower() in ("none", "null", "") else parse(text)

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=prog, description=description, allow_abbrev=False)
    parser.add_argument("--config", default=None, help="YAML or JSON file setting any of the flags below (flags win)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, optional = _unwrap(hints[f.name])
        meta = f.metadata
        default = field_default(f)
        # SUPPRESS lets us tell which flags the user gave explicitly (config-file merging, demo defaults).
        kw: dict[str, Any] = dict(help=meta.get("help", ""), default=argparse.SUPPRESS)
        if meta.get("choices"):
            kw["choices"] = meta["choices"]
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            kw.update(action="append", type=item)
        else:
            kw["type"] = _optional(tp) if optional else tp
            kw["metavar"] = tp.__name__.upper()
        # argparse %-formats help strings: a literal % (e.g. "within 0.4%") would crash --help.
        kw["help"] = f"{kw['help']} (default: {default!r})".replace("%", "%%")
        parser.add_argument(f"--{f.name}", **kw)
    for alias in aliases_of(cls):
        help_text = f"{alias.help} (maps to: {alias.maps_to})".replace("%", "%%")
        parser.add_argument(f"--{alias.name}", default=argparse.SUPPRESS, metavar="STR", help=help_text)
    return parser


def _coerce(cls: type, key: str, value: Any) -> Any:
    """Type-check a value coming from a config file."""
    tp, optional = _unwrap(typing.get_type_hints(cls)[key])
    if value is None and optional:
        return None
    if tp is bool:
        if isinstance(value, str):
            return _str_to_bool(value)
        if isinstance(value, bool):
            return value
        _bad(key, value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            _bad(key, value)
        (item,) = typing.get_args(tp)
        return [item(v) for v in value]
    if tp in (int, str) and isinstance(value, tp) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, (int, float)):
        return str(value)
    _bad(key, value)


def _bad(key: str, value: Any) -> typing.NoReturn:
    raise ConfigError(f"config key {key!r}: bad value {value!r}")


def load_config_file(cls: type, path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path) as f:
        text = f.read()
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:  # json's JSONDecodeError is a ValueError
        raise ConfigError(
            f"config file {path!r} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: {one_line(e, name=False)}"
        ) from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of flag names to values")
    names = {f.name for f in dataclasses.fields(cls)} | {a.name for a in aliases_of(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"config file {path!r}: unknown key(s) {', '.join(unknown)}")
    alias_names = {a.name for a in aliases_of(cls)}
    values = {k: str(v) if k in alias_names else _coerce(cls, k, v) for k, v in data.items()}
    for f in dataclasses.fields(cls):
        choices = f.metadata.get("choices")
        if f.name in values and choices and values[f.name] not in choices:
            raise ConfigError(f"config key {f.name!r}: {values[f.name]!r} is not one of {', '.join(map(str, choices))}")
    return values


def parse_config(cls: type, argv: list[str] | None, prog: str, description: str = ""):
    """Parse flags (and an optional config file) into `cls`; returns (config, names set explicitly).

    Exits with status 2 and one line on stderr for any bad flag, key or value: a declared bound
    (`check_bounds`), or what `cls.check()` finds when the class has one (checks across flags).
    Aliases given (flag or file) go to `cls.apply_aliases(values, given)`, which sets the fields they map onto;
    the names returned are the fields', not the aliases'.
    """
    parser = build_parser(cls, prog, description)
    ns = vars(parser.parse_args(argv))
    config_path = ns.pop("config")
    try:
        values = load_config_file(cls, config_path) if config_path else {}
        values.update(ns)
        given = {a.name: values.pop(a.name) for a in aliases_of(cls) if a.name in values}
        if given:
            cls.apply_aliases(values, given)
        cfg = cls(**values)
        check_bounds(cfg)
        if hasattr(cfg, "check"):
            cfg.check()
    except ConfigError as e:
        parser.exit(2, f"{prog}: error: {e}\n")
    return cfg, set(values)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def fail(prog: str, message: str) -> typing.NoReturn:
    """Exit with one line on stderr (for errors found after parsing, e.g. missing data)."""
    sys.stderr.write(f"{prog}: error: {message}\n")
    raise SystemExit(2)


def markdown_reference(cls: type, columns: dict[str, str] | None = None) -> str:
    """A markdown table of every flag of `cls`: flag, type, default, choices and help, plus one column per
    metadata key in `columns` ({metadata key: column title}), for docs/flags.md."""
    columns = columns or {}
    hints = typing.get_type_hints(cls)
    head = ["flag", "type", "default", *columns.values(), "description"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in dataclasses.fields(cls):
        tp, optional = _unwrap(hints[f.name])
        type_name = typing.get_origin(tp).__name__ if typing.get_origin(tp) else tp.__name__
        help_text = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            help_text += " (one of: " + ", ".join(f"`{c}`" for c in f.metadata["choices"]) + ")"
        if f.metadata.get("bound"):
            help_text += f" ({BOUNDS[f.metadata['bound']][1]})"
        extra = [
            "" if f.metadata.get(key, dataclasses.MISSING) is dataclasses.MISSING else f"`{f.metadata[key]!r}`"
            for key in columns
        ]
        cells = [
            f"`--{f.name}`",
            type_name + (" or None" if optional else ""),
            f"`{field_default(f)!r}`",
            *extra,
            help_text,
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    if aliases_of(cls):
        lines += [
            "",
            "Aliases (other tools' names for the flags above):",
            "",
            "| alias | maps to | description |",
            "|---|---|---|",
        ]
        for alias in aliases_of(cls):
            cells = [f"`--{alias.name}`", alias.maps_to, alias.help]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
