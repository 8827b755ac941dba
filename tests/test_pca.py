"""PCA patch targets: the basis is orthonormal, the reconstruction error is the discarded variance,
and a store built with --patch-dim holds exactly the projection of the full-width patch grid."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SMALL, run_cli

from featurestore.pipeline.pca import Moments, fit_basis
from featurestore.pipeline.teacher_pass import PCA_VIEWS_PER_IMAGE, load_basis
from featurestore.store.reader import StoreReader
from featurestore.views import COL, MIX_NONE


def test_basis_is_orthonormal_and_reconstruction_error_is_the_discarded_variance():
    rng = np.random.default_rng(0)
    scales = np.geomspace(5.0, 0.01, 24)                                 # a decaying spectrum
    x = rng.standard_normal((3000, 24)) * scales @ np.linalg.qr(rng.standard_normal((24, 24)))[0] + 3.0
    m = Moments(24)
    for part in np.array_split(x, 7):                                    # streamed in pieces
        m.add(torch.from_numpy(part))
    basis = fit_basis(m, 6)
    b = basis.basis.astype(np.float64)
    np.testing.assert_allclose(b @ b.T, np.eye(6), atol=1e-5)
    z = basis.project(torch.from_numpy(x)).numpy()
    err = ((x - basis.reconstruct(z)) ** 2).sum(1).mean()
    assert err == pytest.approx(basis.discarded_variance, rel=1e-4)
    total = ((x - x.mean(0)) ** 2).sum(1).mean()
    assert basis.variance_kept == pytest.approx(1 - err / total, rel=1e-4)
    ref = np.linalg.svd(x - x.mean(0), full_matrices=False)[2][:6]     # the same subspace as an SVD gives
    np.testing.assert_allclose(np.abs(ref @ b.T), np.eye(6), atol=1e-3)


def test_a_pca_store_holds_the_projection_of_the_full_width_patches(tmp_path, demo_images, capsys):
    full, small = tmp_path / "full.zarr", tmp_path / "pca.zarr"
    assert run_cli("build", "--images", demo_images, "--out", full, *SMALL) == 0
    assert run_cli("build", "--images", demo_images, "--out", small, *SMALL, "--patch-dim", "12",
                   "--pca-images", "20") == 0
    with StoreReader.open(full) as f, StoreReader.open(small) as s:
        assert s.shape("teachers/siglip/patches")[-1] == 12 and s.teacher().patch_dim == 12
        basis = load_basis(s)
        b = basis.basis.astype(np.float64)
        np.testing.assert_allclose(b @ b.T, np.eye(12), atol=1e-5)
        want = basis.project(torch.from_numpy(f.read("teachers/siglip/patches").astype(np.float32))).numpy()
        got = s.read("teachers/siglip/patches").astype(np.float32)
        np.testing.assert_allclose(got, want, atol=0.02, rtol=0.02)        # fp16 storage on both sides
        np.testing.assert_array_equal(s.read("teachers/siglip/pooled"), f.read("teachers/siglip/pooled"))
        # the basis was fitted on the unmixed views 0.. of the first 20 store images: on exactly those
        # tokens its reconstruction error is the variance it discards
        params = f.read("views/params", 0, 20)
        tokens = np.concatenate([f.read("teachers/siglip/patches", i, i + 1)[0, np.flatnonzero(
            params[i, :, COL["mix_mode"]] == MIX_NONE)[:PCA_VIEWS_PER_IMAGE]].reshape(-1, 64) for i in range(20)])
        tokens = tokens.astype(np.float64)
        err = ((tokens - basis.reconstruct(basis.project(torch.from_numpy(tokens)).numpy())) ** 2).sum(1).mean()
        assert err == pytest.approx(basis.discarded_variance, rel=0.05)   # fp16-stored tokens vs float32 ones
        assert s.teacher().attrs["patch_variance_kept"] == pytest.approx(basis.variance_kept)
    assert run_cli("inspect", small) == 0
    assert "siglip: 2x2 grid, 12 dims (PCA of 64; the basis keeps" in capsys.readouterr().out
