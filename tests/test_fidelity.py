"""The fidelity benchmark's teacher in the loop: the same targets as the store for the store's views,
fresh views from the store's own distribution (that `trainer fit` never loads a teacher is
tests/test_trainer.py's)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from scipy.stats import ks_2samp

from benchmarks import fidelity
from benchmarks.online import OnlineTeacher, fresh_params
from featurestore import views
from featurestore.demo import write_demo_data
from featurestore.store.reader import StoreReader

C = views.COL


@pytest.fixture(scope="module")
def teacher(small_store):
    with StoreReader.open(small_store) as s:
        yield OnlineTeacher(s)


def test_the_teacher_in_the_loop_scores_the_stores_views_as_the_build_did(small_store, teacher):
    with StoreReader.open(small_store) as s:
        split = s.read("split")
        idx = np.array([0, 3, 9, 17, 40, 65, 70, 79])            # labelled, held out, unlabelled; 4 chunks
        for k in (0, 1, 2):
            params = s.read_rows("views/params", idx, k)
            out = teacher.targets(idx, params, "probe", True, True)
            pooled = s.read_rows("teachers/siglip/pooled", idx, k).astype(np.float32)
            np.testing.assert_allclose(out["pooled"].numpy(), pooled, atol=2e-3, rtol=1e-2)
            np.testing.assert_allclose(out["patches"].numpy(), s.read_rows("teachers/siglip/patches", idx, k),
                                       atol=2e-3, rtol=1e-2)
            np.testing.assert_allclose(out["logits"].numpy(), s.read_rows("teachers/siglip/logits/probe", idx, k),
                                       atol=2e-2, rtol=1e-2)
        assert (split[idx] >= 0).any() and (split[idx] < 0).any()
        if "zeroshot" in s.heads():
            out = teacher.targets(idx, s.read_rows("views/params", idx, 1), "zeroshot", False, False)
            np.testing.assert_allclose(out["logits"].numpy(), s.read_rows("teachers/siglip/logits/zeroshot", idx, 1),
                                       atol=2e-2, rtol=1e-2)
            assert out["pooled"] is None and out["patches"] is None


def _stats(p: np.ndarray) -> dict[str, float]:
    mixed = p[:, C["mix_partner"]] >= 0
    return {"hflip": p[:, C["hflip"]].mean(), "vflip": p[:, C["vflip"]].mean(), "rot": (p[:, C["rot90"]] > 0).mean(),
            "mix": mixed.mean(), "cutmix": (p[mixed, C["mix_mode"]] == views.MIX_CUTMIX).mean()}


def test_fresh_views_come_from_the_stores_distribution_and_are_never_the_stored_ones(small_store, teacher):
    policy = teacher.cfg.views
    n = len(teacher.split)
    with StoreReader.open(small_store) as s:                 # how the store drew its views
        np.testing.assert_array_equal(s.read("views/params"), np.concatenate(
            [views.sample_params(policy, a, min(a + 8, n), views.mixing_groups(teacher.split[a:a + 8]))
             for a in range(0, n, 8)]))
    many = dataclasses.replace(policy, views=200)            # the build's own draws, many per image
    built = np.concatenate([views.sample_params(many, a, min(a + 8, n), views.mixing_groups(teacher.split[a:a + 8]))
                            for a in range(0, n, 8)])[:, 1:].reshape(-1, len(C))
    fresh = np.concatenate([fresh_params(policy, np.arange(n), epoch, seed, teacher.mates)
                            for seed in range(3) for epoch in range(70)])

    def area(p):
        return (p[:, C["y1"]] - p[:, C["y0"]]) * (p[:, C["x1"]] - p[:, C["x0"]])
    for name, a, b in (("crop area", area(built), area(fresh)),
                       *[(c, built[:, C[c]], fresh[:, C[c]]) for c in ("brightness", "contrast", "saturation", "hue")],
                       ("mix weight", built[built[:, C["mix_partner"]] >= 0, C["mix_lambda"]],
                        fresh[fresh[:, C["mix_partner"]] >= 0, C["mix_lambda"]])):
        assert ks_2samp(a, b).pvalue > 1e-3, name
    sb, sf = _stats(built), _stats(fresh)
    for key in sb:
        assert abs(sb[key] - sf[key]) < 0.02, (key, sb[key], sf[key])
    assert 0.3 < sf["mix"] < 0.7                                        # the policy's mix_prob of 0.5
    # partners as a build picks them: the same store chunk, the same group (labelled, held out, unlabelled)
    groups = views.mixing_groups(teacher.split)
    img = np.tile(np.arange(n), 3 * 70)
    partner = fresh[:, C["mix_partner"]].astype(np.int64)
    m = partner >= 0
    assert (partner[m] // 8 == img[m] // 8).all() and (groups[partner[m]] == groups[img[m]]).all()
    assert (partner[m] != img[m]).all()
    # never a view the store holds, nor one of another seed or epoch
    rows = {r.tobytes() for r in built}
    assert not any(r.tobytes() in rows for r in fresh)
    assert len({r.tobytes() for r in fresh}) == len(fresh)


@pytest.mark.slow(18)
def test_the_fidelity_benchmark_writes_its_table_on_tiny_data(demo_images, unlabeled_images, tmp_path):
    build = tmp_path / "build.yaml"
    build.write_text("views:\n  views: 3\n  mix_prob: 0.5\nstore:\n  image_size: 64\n  chunk_size: 8\n"
                     "  patch_grid: 2\nprobe:\n  folds: 2\n  val_fraction: 0.1\nworkers: 0\n")
    fit = tmp_path / "fit.yaml"
    fit.write_text("student: shufflenet_v2_x0_5\nimage_size: 32\ncpu: true\noptim:\n  batch_size: 16\n")
    fresh = write_demo_data(tmp_path / "fresh", per_class=2, seed=3)
    out = tmp_path / "fidelity.json"
    argv = ["--images", str(demo_images), "--unlabeled", str(unlabeled_images), "--teacher", "random:tiny",
            "--config", str(build), "--fit-config", str(fit), "--eval-images", str(fresh), "--views", "3",
            "--seeds", "1", "--epochs", "1", "--recipes", "labels,store,online,spread",
            "--work", str(tmp_path / "work"), "--json", str(out)]
    assert fidelity.main(argv) == 0
    r = json.loads(out.read_text())
    assert set(r["recipes"]) == {"labels", "store_k3", "online", "store_k3_spread"}
    assert set(r["heads"]) == {"store_k3 probe", "store_k3 spread"}
    steps = {x["steps"] for x in r["recipes"].values()}
    per_epoch = -(-r["settings"]["training_images"] // 16)                 # the last partial batch counts
    assert steps == {r["settings"]["steps"]} and r["settings"]["steps"] == per_epoch
    for name, x in r["recipes"].items():
        assert {"mean", "std", "values", "seconds"} <= set(x) and len(x["values"]) == 1, name
        assert 0.0 <= x["mean"] <= 1.0 and x["seconds"] > 0
    assert r["recipes"]["store_k3"]["teacher_views"] == 80 * 3
    assert r["recipes"]["online"]["teacher_views"] == r["settings"]["training_images"]     # one pass
    for run in (tmp_path / "work" / "runs" / f"{r['settings']['steps']}steps").glob("*-s0"):
        state = json.loads((run / "summary.json").read_text())
        assert state["steps"] == r["settings"]["steps"], run.name
    assert "| online |" in out.with_suffix(".md").read_text()
    # run again: every finished store and run is reused, the same figures come back
    assert fidelity.main(argv) == 0
    again = json.loads(out.read_text())
    assert {k: v["values"] for k, v in again["recipes"].items()} == {k: v["values"] for k, v in r["recipes"].items()}
