"""The Python API: each command of the CLI as a function, with the flags' names and defaults (the
command line calls these same functions).

    import featurestore
    store = featurestore.build(images="data/train", out="stores/derm.zarr", teacher="google/medsiglip-448",
                               views=32, patch_grid=8)
    featurestore.inspect("stores/derm.zarr")["probe"]

Keywords are the long flags with dashes as underscores (`--patch-grid` -> patch_grid); `config` names a
YAML file the keywords override, exactly as on the command line.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from featurestore.common import log
from featurestore.common.errors import not_in_a_reimported_script
from featurestore.common.options import load_config
from featurestore.pipeline.config import BuildConfig
from featurestore.store.reader import StoreReader


def build(*, config: str | None = None, overwrite: bool = False, **kwargs) -> StoreReader:
    """`featurestore build`; returns the finished store, open for reading."""
    not_in_a_reimported_script("featurestore.build")
    from featurestore.pipeline.builder import build as run_build
    log.enable()
    cfg = load_config(BuildConfig, config, kwargs)
    run_build(cfg, overwrite=overwrite)
    return StoreReader.open(cfg.out, cfg.storage_options)


def add_teacher(store: str, *, config: str | None = None, **kwargs) -> StoreReader:
    """`featurestore add-teacher`: --teacher over the very views of a finished store; returns the store.
    The views, layout and probe are the store's own; the teacher settings, images (default: the ones the
    store was built from), device and workers are the keywords'."""
    not_in_a_reimported_script("featurestore.add_teacher")
    from featurestore.common.options import from_dict, merge, to_dict
    from featurestore.pipeline.builder import add_teacher as run_add
    log.enable()
    given = load_config(BuildConfig, config, kwargs)
    with StoreReader.open(store, given.storage_options) as s:
        recorded = from_dict(BuildConfig, merge(to_dict(BuildConfig()), s.attrs["config"]))
    where = {k: getattr(given, k) for k in ("images", "manifest", "unlabeled", "classes_file", "allow_outside_paths")}
    if not (given.images or given.manifest):
        where = {k: getattr(recorded, k) for k in where}
    cfg = dataclasses.replace(recorded, teacher=given.teacher, device=given.device, workers=given.workers,
                              storage_options=given.storage_options, **where)
    run_add(cfg, store)
    return StoreReader.open(store, given.storage_options)


def plan(*, config: str | None = None, sample_images: int = 8, **kwargs) -> dict:
    """`featurestore plan`: the same keywords as build (out is not needed); returns the plan."""
    from featurestore.pipeline.planner import plan as run_plan
    log.enable()
    return run_plan(load_config(BuildConfig, config, kwargs), sample_images)


def slim(src: str, dst: str, fields: list[str] | str, storage_options: dict | None = None) -> StoreReader:
    """`featurestore slim`; returns the verified copy, open for reading."""
    from featurestore.store.slimming import slim as run_slim
    log.enable()
    run_slim(src, dst, fields.split(",") if isinstance(fields, str) else list(fields), storage_options)
    return StoreReader.open(dst, storage_options)


def inspect(store: str, storage_options: dict | None = None) -> dict:
    """`featurestore inspect --json`."""
    from featurestore.store.report import summarize
    with StoreReader.open(store, storage_options) as s:
        return summarize(s)


def show(store: str, images: list[int], out: str, teacher: str | None = None, head: str | None = None,
         size: int = 128, top: int = 3, max_views: int = 16, storage_options: dict | None = None) -> dict:
    """`featurestore show`: the picture of what the teacher saw, written to `out`; returns what it shows."""
    from featurestore.views.show import show as run_show
    return run_show(store, list(images), out, teacher, head, size, top, max_views, storage_options)


def verify(store: str, fix: bool = False, storage_options: dict | None = None, digest: str | None = None) -> list[str]:
    """`featurestore verify [--fix] [--digest HEX]`: one line per problem (empty: the store is whole)."""
    from featurestore.store.integrity import check
    return [p.line() for p in check(store, fix, storage_options, digest)[0].problems]


def demo_data(out: str, per_class: int = 40, seed: int = 0, flat: bool = False,
              counts: list[int] | None = None) -> Path:
    """`featurestore demo-data` (counts: images of each class, instead of per_class of each)."""
    from featurestore.demo import write_demo_data
    return write_demo_data(out, per_class, seed, flat=flat, counts=counts)


def demo_teacher(out: str, images: int = 3000, steps: int = 300, seed: int = 1000, family: str = "siglip") -> str:
    """`featurestore demo-teacher`; returns one line saying what was saved."""
    from featurestore.demo.teacher import train_demo_teacher
    log.enable()
    return train_demo_teacher(out, images, steps, seed, family)
