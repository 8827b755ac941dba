"""The Python API: each command of the CLI as a function, with the flags' names and defaults.

    import featurestore
    store = featurestore.build(images="data/train", out="stores/derm.zarr", teacher="google/medsiglip-448",
                               views=32, patch_grid=8)
    featurestore.inspect("stores/derm.zarr")["probe"]

Keywords are the long flags with dashes as underscores (`--patch-grid` -> patch_grid); `config` names a
YAML file the keywords override, exactly as on the command line.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .config import BuildConfig, ConfigError, load_config, load_prompts
from .store import Store


def config_from(cls: type, table: dict[str, str], kwargs: dict[str, Any], config: str | None = None) -> Any:
    """A typed config from CLI-named keywords; an unknown keyword is an error with a suggestion."""
    unknown = [k for k in kwargs if k not in table]
    if unknown:
        close = difflib.get_close_matches(unknown[0], table, n=1)
        raise ConfigError(f"unknown keyword {unknown[0]!r}" + (f" (did you mean {close[0]!r}?)" if close else
                                                             f"; known: {', '.join(sorted(table))}"))
    return load_config(cls, config, SimpleNamespace(**kwargs), table)


def build(*, config: str | None = None, overwrite: bool = False, **kwargs) -> Store:
    """`featurestore build`; returns the finished store, open for reading."""
    from .builder import build as run_build
    from .cli import FLAGS
    if isinstance(kwargs.get("prompts"), (str, Path)):
        kwargs["prompts"] = load_prompts(kwargs["prompts"])
    cfg = config_from(BuildConfig, FLAGS, kwargs, config)
    run_build(cfg, overwrite=overwrite)
    return Store.open(cfg.out)


def plan(*, config: str | None = None, sample_images: int = 8, **kwargs) -> dict:
    """`featurestore plan`: the same keywords as build (out is not needed); returns the plan."""
    from .cli import FLAGS
    from .planner import plan as run_plan
    return run_plan(config_from(BuildConfig, FLAGS, kwargs, config), sample_images)


def slim(src: str, dst: str, fields: list[str] | str) -> Store:
    """`featurestore slim`; returns the verified copy, open for reading."""
    from .slimming import slim as run_slim
    run_slim(src, dst, fields.split(",") if isinstance(fields, str) else list(fields))
    return Store.open(dst)


def inspect(store: str) -> dict:
    """`featurestore inspect --json`."""
    from .report import summarize
    with Store.open(store) as s:
        return summarize(s)


def verify(store: str, fix: bool = False) -> list[str]:
    """`featurestore verify [--fix]`: one line per problem (empty: the store is whole)."""
    from .integrity import check
    return [p.line() for p in check(store, fix)[0]]


def demo_data(out: str, per_class: int = 40, seed: int = 0, flat: bool = False) -> Path:
    """`featurestore demo-data`."""
    from .demo import write_demo_data
    return write_demo_data(out, per_class, seed, flat=flat)
