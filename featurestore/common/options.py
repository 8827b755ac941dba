"""Options declared once: each config dataclass field carries its flag, help and choices (`opt`), and
the command line, the YAML files and the Python API are all made from that one declaration.

- `add_options(parser, Config)` adds every flagged field (nested ones too) with its help and the real
  default; `options(Config)` maps each flag's name (dashes as underscores: the API's keyword) to its
  dotted config key; `load_config(Config, yaml_path, values)` reads the YAML, puts the given values on
  top, and builds the typed config. An unknown key, in YAML or as a keyword, is an error naming the
  closest known one.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featurestore.common.errors import KdstoreError
from featurestore.common.untrusted import load_yaml


class ConfigError(KdstoreError, ValueError):
    """A configuration file or flag is invalid; the message names the key and the problem."""


def opt(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,  # noqa: A002
        choices: list[str] | None = None, negate: bool = False, parse: Callable[[str], Any] | None = None,
        default_factory: Callable[[], Any] | None = None, secret: bool = False) -> Any:
    """A config field. flag: its command-line flag ("--view-seed"; none: YAML only); negate: a
    boolean whose flag turns it off ("--no-zeroshot"); parse: turns the flag's text into the value
    (a YAML file of prompts, say), applied with the other flags, so its errors are the config's;
    secret: never recorded (in a store, a run's config.yaml, a resume identity)."""
    meta = {"help": help, "flag": flag, "choices": choices, "negate": negate, "parse": parse, "secret": secret}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def in_range(name: str, value, lo=None, hi=None, why: str = "") -> None:
    """Refuse a number outside [lo, hi] (None: no bound on that side), naming the setting and the range."""
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f"{lo}..{hi}" if lo is not None and hi is not None else f">= {lo}" if lo is not None else f"<= {hi}"
        raise ConfigError(f"{name} must be {span}, got {value}" + (f": {why}" if why else ""))


@dataclass(frozen=True)
class Option:
    key: str                  # dotted config key
    dest: str                 # the flag's name with underscores: the API's keyword
    flag: str
    field: dataclasses.Field
    hint: Any                 # the field's type
    many: bool = False        # a list the flag fills one value per use (--teacher A --teacher B)

    @property
    def switch(self) -> bool:
        return self.hint is bool


def walk(cls: type, prefix: str = "") -> list[Option]:
    """Every flagged field of `cls`, nested dataclasses included, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += walk(hint, f"{prefix}{f.name}.")
        elif f.metadata.get("flag"):
            flag = f.metadata["flag"]
            dest = flag[len("--no-"):] if f.metadata.get("negate") else flag[2:]
            many = typing.get_origin(hint) is list and not f.metadata.get("parse")
            out.append(Option(prefix + f.name, dest.replace("-", "_"), flag, f, _scalar(hint), many))
    return out


def options(cls: type) -> dict[str, str]:
    """{API keyword (a flag's dest): dotted config key}."""
    return {o.dest: o.key for o in walk(cls)}


def add_options(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """`--config` and one flag per flagged field of `cls`, its help ending in the real default."""
    parser.add_argument("--config", help="YAML config (see configs/); the flags here override it")
    defaults = cls()
    for o in walk(cls):
        if o.dest in skip:
            continue
        meta, value = o.field.metadata, _get(defaults, o.key)
        text = meta["help"]
        if value is not None and not o.switch and not isinstance(value, (dict, tuple)) and "(default:" not in text:
            text = f"{text} (default: {value})"
        kw: dict[str, Any] = {"dest": o.dest, "default": None, "help": text}
        if o.switch:
            kw["action"] = "store_false" if meta["negate"] else "store_true"
        else:
            kw["type"] = str if meta["parse"] else o.hint
            if o.many:
                kw["action"] = "append"
            if meta["choices"]:
                kw["choices"] = meta["choices"]
        parser.add_argument(o.flag, **kw)


def values_of(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The values of `cls`'s flags in parsed arguments (None where a flag was not given)."""
    return {o.dest: getattr(args, o.dest, None) for o in walk(cls)}


def whole(lo: int, hi: int | None = None):
    """An argparse type: a whole number in [lo, hi] (None: no upper bound)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects a whole number, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {lo}..{hi}, got {value}" if hi is not None else
                                             f"must be >= {lo}, got {value}")
        return value
    return parse


def positive(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def command_parser(prog: str, description: str, epilog: str):
    """The top-level parser of a kdstore command, its subcommand table, and the parent parser that
    gives every subcommand --debug."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of a failure (also KDSTORE_DEBUG=1)")
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog)
    return p, p.add_subparsers(dest="command", required=True), common


def load_config(cls: type, config_path: str | None, values: dict[str, Any]) -> Any:
    """YAML (if given), then `values` (keywords or parsed flags; None: not given) on top, into `cls`."""
    table = {o.dest: o for o in walk(cls)}
    unknown = [k for k in values if k not in table]
    if unknown:
        close = difflib.get_close_matches(unknown[0], table, n=1)
        raise ConfigError(f"unknown keyword {unknown[0]!r}" + (f" (did you mean {close[0]!r}?)" if close else
                                                             f"; known: {', '.join(sorted(table))}"))
    base = load_yaml(config_path) if config_path else {}
    if config_path:
        try:
            from_dict(cls, base)                    # the file's own types first: a flag must not hide them
        except ConfigError as e:
            raise ConfigError(f"{config_path}: {e}") from None
    top: dict[str, Any] = {}
    for dest, value in values.items():
        if value is None:
            continue
        o = table[dest]
        if o.field.metadata["parse"] and isinstance(value, (str, Path)):
            value = o.field.metadata["parse"](value)
        node = top
        *parents, leaf = o.key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return from_dict(cls, merge(base, top))


# ---- typed dataclasses ----------------------------------------------------------------------
def to_dict(obj: Any) -> Any:
    """A config as plain data, for records: secret fields (credentials) are left out."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if not f.metadata.get("secret")}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from `data`; unknown keys raise ConfigError with a suggestion."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown key {where + key!r}{hint}")
        kwargs[key] = coerce(hints[key], value, where + key)
    return cls(**kwargs)


def coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of its settings, got {value!r}")
        return from_dict(hint, value or {}, where + ".")
    origin = typing.get_origin(hint)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        args = typing.get_args(hint)
        if args and typing.get_origin(args[1]) is list:          # name -> one or more strings
            return {str(k): [v] if isinstance(v, str) else list(v or []) for k, v in value.items()}
        return dict(value)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of names, got {value!r}")
        return list(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(hint)):
            raise ConfigError(f"{where} must be a list of {len(typing.get_args(hint))} numbers, got {value!r}")
        return tuple(float(v) for v in value)
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where} expects a number, got {value!r}")
    if hint is float and isinstance(value, int):
        value = float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    expected = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    kinds = [typing.get_origin(t) or t for t in expected]
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, dict) and dict in kinds and dict[str, float] in expected:     # a weight per name
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value.values()):
            raise ConfigError(f"{where} maps names to numbers, got {value!r}")
        value = {str(k): float(v) for k, v in value.items()}
    if value is not None and not any(isinstance(value, t) for t in kinds if isinstance(t, type)):
        names = " or ".join(getattr(t, "__name__", str(t)) for t in kinds)
        raise ConfigError(f"{where} expects {names}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    return value


def config_diff(old, new, prefix=""):
    """'key: stored X, now Y' for every setting that differs, nested keys dotted."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: stored {a!r}, now {b!r}")
    return out


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `override` (e.g. CLI flags) onto `base` (e.g. YAML)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def json_options(text: str | None) -> dict:
    """--storage-options: a JSON object of fsspec options (none: {})."""
    import json
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"--storage-options is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--storage-options must be a JSON object, got {text!r}")
    return value


def storage_options_flag(parser: argparse.ArgumentParser) -> None:
    """--storage-options for commands that open a store without a config."""
    parser.add_argument("--storage-options", default=None, help=STORAGE_HELP)


STORAGE_HELP = ("JSON object of fsspec options for a store at a URL, such as "
                '\'{"endpoint_url": "http://minio:9000", "profile": "lab"}\' (default: the usual places: '
                "AWS_ENDPOINT_URL, AWS_PROFILE, ~/.aws)")


def _get(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _scalar(hint: Any) -> Any:
    """int, float, str or bool of an annotation such as `str | None`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is not dict and len(args) == 1 else hint
