"""Several teachers in one store (format 3): built at once, or one added later by `add-teacher` over the
very same stored views (the same arrays either way, resumable, locked); their standardisation statistics;
`trainer fit` with a projection head and a weight per teacher and KD from one teacher or their mean; and
format 2 stores still train."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import LAYOUT, build_lock_held, run_cli

from featurestore.store.reader import StoreReader
from featurestore.store.writer import StoreWriter
from trainer import cli as tcli

FAST = ["--student", "shufflenet_v2_x0_5", "--image-size", "32", "--batch-size", "16", "--cpu", "--epochs", "1",
        "--no-unlabeled"]
FIXTURE = Path(__file__).parent / "fixtures" / "v2"


def run_trainer(*args) -> int:
    return tcli.main([str(a) for a in args])


@pytest.fixture(scope="module")
def stores(tmp_path_factory, demo_images, tiny_dinov2_dir):
    """The same two teachers (random SigLIP, a saved DINOv2) built at once, and the DINOv2 one added to a
    store of the SigLIP one alone."""
    root = tmp_path_factory.mktemp("multi")
    joint, added = root / "joint.zarr", root / "added.zarr"
    second = f"dino={tiny_dinov2_dir}"
    assert run_cli("build", "--images", demo_images, "--out", joint, *LAYOUT, "--teacher", "siglip=random:tiny",
                   "--teacher", second) == 0
    assert run_cli("build", "--images", demo_images, "--out", added, *LAYOUT, "--teacher", "siglip=random:tiny") == 0
    assert run_cli("add-teacher", added, "--images", demo_images, *LAYOUT, "--teacher", second) == 0
    return joint, added, second


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with StoreReader.open(path) as s:
        out = {f.name: np.asarray(s.read(f.name)) for f in s.fields()}
        out |= {key: s.small(key) for key in s.small_keys()}
        out |= {t.done.name: s.done(t.name) for t in s.teachers}
        return out


def test_add_teacher_gives_the_arrays_of_building_both_at_once(stores):
    joint, added, _ = stores
    a, b = _arrays(joint), _arrays(added)
    assert sorted(a) == sorted(b)
    assert {"teachers/siglip/pooled", "teachers/dino/pooled", "teachers/dino/patches", "teachers/dino/logits/probe",
            "teachers/dino/stats/pooled_std", "teachers/siglip/heads/zeroshot/text_embeds"} <= set(a)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    with StoreReader.open(joint) as x, StoreReader.open(added) as y:
        assert [t.name for t in x.teachers] == [t.name for t in y.teachers] == ["siglip", "dino"]
        assert x.attrs["teachers"] == y.attrs["teachers"]
        assert x.attrs["identity"] == y.attrs["identity"] and x.complete and y.complete
        assert x.teacher("dino").info["family"] == "dinov2" and x.heads("dino") == ["probe"]
        assert x.attrs["digest"] != "" and y.attrs["digest"]
    for path in (joint, added):
        assert run_cli("verify", path) == 0


def test_stats_are_each_teachers_own_over_the_probes_rows(stores):
    joint, _, _ = stores
    with StoreReader.open(joint) as s:
        for t in s.teachers:
            pooled = s.read(t.pooled).astype(np.float32)
            rows = pooled[s.read("split") >= 0].reshape(-1, t.embed_dim)       # every view of the training images
            np.testing.assert_allclose(s.small(t.stats_key("pooled_mean")), rows.mean(0), atol=1e-3)
            np.testing.assert_allclose(s.small(t.stats_key("pooled_std")), rows.std(0), rtol=1e-2, atol=1e-3)


def test_add_teacher_resumes_refuses_a_held_lock_other_images_and_a_taken_name(stores, tmp_path, demo_images,
                                                                             tiny_clip_dir):
    joint, added, second = stores
    store = tmp_path / "resume.zarr"
    shutil.copytree(added, store)
    with StoreWriter.open(str(store)) as w:                      # as if killed after chunk 2 of 8
        t = w.reader.teacher("dino")
        done = w.reader.done("dino")
        done[3:] = False
        w.reset_done(done, t.done)
        w.set_attrs({"complete": False})
        w.set_teacher_attrs("dino", {"complete": False})
        a, _ = w.reader.chunk_range(5)
        w.write(t.pooled, a, np.full_like(w.reader.read_chunk(t.pooled, 5), np.nan))
    assert run_cli("add-teacher", store, "--images", demo_images, *LAYOUT, "--teacher", second) == 0
    a, b = _arrays(joint), _arrays(store)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # a second run finds nothing to do
    assert run_cli("add-teacher", store, "--images", demo_images, *LAYOUT, "--teacher", second) == 0
    with build_lock_held(store):
        assert run_cli("add-teacher", store, "--images", demo_images, *LAYOUT, "--teacher",
                       f"clip={tiny_clip_dir}") == 2
    other = tmp_path / "other"
    shutil.copytree(demo_images, other)
    next(p for p in other.rglob("*.png")).unlink()
    assert run_cli("add-teacher", store, "--images", other, *LAYOUT, "--teacher", f"clip={tiny_clip_dir}") == 2
    assert run_cli("add-teacher", store, "--images", demo_images, *LAYOUT, "--teacher",
                   f"dino={tiny_clip_dir}") == 2                                       # the name is taken
    assert _arrays(store).keys() == a.keys()                                           # nothing added by a refusal


def test_a_version_2_store_refuses_a_second_teacher_and_still_trains(tmp_path, tiny_dinov2_dir):
    old = tmp_path / "old.zarr"
    shutil.copytree(FIXTURE / "reference.zarr", old)
    assert run_cli("add-teacher", old, "--images", FIXTURE / "images", "--unlabeled", FIXTURE / "unlabelled",
                   "--teacher", f"dino={tiny_dinov2_dir}") == 2
    assert run_trainer("fit", "--store", old, "--out", tmp_path / "run", *FAST, "--w-patches", "0.5") == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0 <= summary["val_macro_f1"] <= 1 and (tmp_path / "run" / "student.pt").stat().st_size > 0


def test_fit_trains_a_projector_per_teacher_with_weights_per_teacher(stores, tmp_path):
    joint, _, _ = stores
    out = tmp_path / "both"
    assert run_trainer("fit", "--store", joint, "--out", out, *FAST, "--w-pooled", "siglip=0.5,dino=1.5",
                       "--w-patches", "0.5", "--kd-teacher", "mean") == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    parts = {k.removeprefix("train_"): v for k, v in rows[-1].items() if k.startswith("train_")}
    for term in ("pooled", "patches"):
        a, b = parts[f"{term}:siglip"], parts[f"{term}:dino"]
        assert a > 0 and b > 0 and a != b
    w = {"siglip": 0.5, "dino": 1.5}
    assert parts["pooled"] == pytest.approx(sum(w[t] * parts[f"pooled:{t}"] for t in w) / 2, rel=1e-4)
    state = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]
    with StoreReader.open(joint) as s:
        dims = {t.name: (t.embed_dim, t.patch_dim) for t in s.teachers}
    for name, (d, p) in dims.items():
        pooled = [v for k, v in state.items() if k.startswith(f"pooled_proj.{name}.") and v.ndim == 2]
        patches = [v for k, v in state.items() if k.startswith(f"patch_proj.{name}.") and v.ndim >= 2]
        assert pooled and pooled[-1].shape[0] == d and patches and patches[-1].shape[0] == p
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["loss"]["pooled"] == w and config["kd_teacher"] == "mean" and config["standardize"] == "auto"
    # KD from one teacher's head; a weight naming a teacher the store lacks is refused before any work
    assert run_trainer("fit", "--store", joint, "--out", tmp_path / "dino", *FAST, "--kd-teacher", "dino",
                       "--w-pooled", "dino=1") == 0
    assert run_trainer("fit", "--store", joint, "--out", tmp_path / "bad", *FAST, "--w-pooled", "dinov3=1") == 2
    assert run_trainer("fit", "--store", joint, "--out", tmp_path / "bad2", *FAST, "--kd-teacher", "sam") == 2
    assert not (tmp_path / "bad" / "student.pt").exists()


def test_standardised_targets_are_the_stores_statistics(stores):
    from trainer.data import StoreData
    joint, _, _ = stores
    data = StoreData(str(joint), "probe", True, True, standardize="auto")
    try:
        assert set(data.stats) == {"pooled:siglip", "pooled:dino", "patches:siglip", "patches:dino"}
        with StoreReader.open(joint) as s:
            t = s.teacher("dino")
            mean, std = data.stats["pooled:dino"]
            np.testing.assert_array_equal(mean, s.small(t.stats_key("pooled_mean")))
            np.testing.assert_array_equal(std, s.small(t.stats_key("pooled_std")))
    finally:
        data.close()
    off = StoreData(str(joint), "probe", True, False, standardize="off")
    try:
        assert off.stats == {} and set(off.names) == {"logits:siglip", "pooled:siglip", "pooled:dino"}
    finally:
        off.close()


def test_inspect_plan_and_slim_speak_per_teacher(stores, tmp_path, demo_images, capsys):
    from featurestore import api
    joint, _, second = stores
    s = api.inspect(str(joint))
    assert [t["name"] for t in s["teachers"]] == ["siglip", "dino"]
    assert [t["family"] for t in s["teachers"]] == ["siglip", "dinov2"]
    assert all(t["bytes_per_view"] > 0 and t["probe"]["cv_macro_f1"] is not None for t in s["teachers"])
    plan = api.plan(images=str(demo_images), teacher=["siglip=random:tiny", second], views=2, patch_grid=2,
                    sample_images=2)
    assert set(plan["bytes_per_view_by_teacher"]) == {"siglip", "dino"}
    assert {"teachers/siglip/pooled", "teachers/dino/patches"} <= set(plan["fields"])
    slim = tmp_path / "dino-only.zarr"                       # one teacher's arrays kept: it trains from them alone
    assert run_cli("slim", joint, slim, "--fields",
                   "images,views/params,teachers/dino/pooled,teachers/dino/logits/probe") == 0
    with StoreReader.open(slim) as r:
        kept = {f.name for f in r.fields()}
    assert {"teachers/dino/pooled", "teachers/dino/logits/probe"} <= kept and not any("siglip" in k for k in kept)
    assert run_trainer("fit", "--store", slim, "--out", tmp_path / "run", *FAST, "--kd-teacher", "dino",
                       "--w-pooled", "dino=1") == 0
    assert run_trainer("fit", "--store", slim, "--out", tmp_path / "run2", *FAST, "--w-pooled", "siglip=1") == 2
    assert "slimmed away" in capsys.readouterr().err
