"""A PCA basis for patch tokens: store the g x g patch grid at d < D dims.

Fitted on a sample of patch tokens (rows x of width D): with mean m and the sample covariance
Sigma = 1/n sum (x - m)(x - m)^T = V diag(lambda) V^T (lambda descending), the basis B is the top d
rows of V^T, a token is stored as B (x - m), and the mean squared reconstruction error over the
sample, 1/n sum ||x - m - B^T B (x - m)||^2, equals the discarded variance sum_{j >= d} lambda_j.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


class Moments:
    """Running count, sum and sum of outer products (float64) of token rows (n, D)."""

    def __init__(self, dim: int):
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().to("cpu", torch.float64).reshape(-1, self.sum.shape[0])   # (n, D)
        self.n += len(x)
        self.sum += x.sum(0)
        self.outer += x.T @ x


@dataclass
class PatchBasis:
    mean: np.ndarray           # (D,) float32
    basis: np.ndarray          # (d, D) float32, orthonormal rows
    eigenvalues: np.ndarray    # (D,) float64, the sample covariance's, descending

    @property
    def variance_kept(self) -> float:
        ev = np.clip(self.eigenvalues, 0, None)
        return float(ev[: len(self.basis)].sum() / max(ev.sum(), 1e-30))

    @property
    def discarded_variance(self) -> float:
        return float(np.clip(self.eigenvalues[len(self.basis):], 0, None).sum())

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., d), on x's device."""
        mean = torch.as_tensor(self.mean, device=x.device, dtype=x.dtype)
        basis = torch.as_tensor(self.basis, device=x.device, dtype=x.dtype)
        return (x - mean) @ basis.T

    def reconstruct(self, z: np.ndarray) -> np.ndarray:
        """(..., d) -> (..., D)."""
        return z.astype(np.float64) @ self.basis.astype(np.float64) + self.mean


def fit_basis(m: Moments, dim: int) -> PatchBasis:
    if m.n < 2:
        raise ValueError("a PCA basis needs at least two token rows")
    if not 0 < dim <= len(m.sum):
        raise ValueError(f"patch_dim must be in 1..{len(m.sum)}, got {dim}")
    mean = m.sum / m.n
    cov = m.outer / m.n - torch.outer(mean, mean)                            # (D, D)
    ev, vec = torch.linalg.eigh(cov)                                          # ascending
    ev, vec = ev.flip(0), vec.flip(1)
    return PatchBasis(mean.numpy().astype(np.float32), vec[:, :dim].T.contiguous().numpy().astype(np.float32),
                      ev.numpy())
