"""Matrix PCA across blocks: orthonormal matrix atoms fitted to a stack of weights."""

from __future__ import annotations

import torch


def matrix_pca(weights: torch.Tensor, n_atoms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uncentred PCA of L matrices under the trace inner product.

    Args:
        weights: (L, d_out, d_in) stack of one projection type across L blocks.
        n_atoms: S <= L atoms to keep.

    Returns:
        atoms (S, d_out, d_in) with tr(D_i^T D_j) = delta_ij, and coefficients (L, S) with
        c[l, s] = tr(D_s^T W_l), both float64. With S = L the weights are reproduced exactly.
    """
    n_blocks = weights.shape[0]
    if not 1 <= n_atoms <= n_blocks:
        raise ValueError(f"n_atoms must be in [1, {n_blocks}] for {n_blocks} matrices, got {n_atoms}")
    flat = weights.reshape(n_blocks, -1).double()  # (L, d_out*d_in)
    # Thin SVD of the L x (d_out d_in) stack: rows of Vh are the atoms (eigenvectors of the L x L Gram
    # lifted back), U * sigma are the coefficients. Stable even when blocks are identical (rank < L).
    u, sigma, vh = torch.linalg.svd(flat, full_matrices=False)
    atoms = vh[:n_atoms].reshape(n_atoms, *weights.shape[1:])  # (S, d_out, d_in)
    coefficients = u[:, :n_atoms] * sigma[:n_atoms]  # (L, S)
    return atoms, coefficients


def unexplained_energy(weights: torch.Tensor, n_atoms: int) -> float:
    """Fraction of sum_l ||W_l||_F^2 that the best S-atom matrix PCA leaves out."""
    sigma = torch.linalg.svdvals(weights.reshape(weights.shape[0], -1).double())
    energy = sigma.square()
    return float(energy[n_atoms:].sum() / energy.sum().clamp_min(1e-300))
