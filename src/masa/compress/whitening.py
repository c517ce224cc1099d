"""Whitened low-rank factorisation (SVD-LLM): truncate W in the geometry of its calibration inputs.

With X the calibration inputs of a layer (y = x W^T) and G = X^T X = L L^T, the output error of an
approximation is ||(W - W_hat) X^T||_F^2 = ||(W - W_hat) L||_F^2, so the best rank-r approximation is
the truncated SVD of W L mapped back with L^{-1}. Any invertible lower-triangular transform works the
same way: the identity gives plain SVD, a diagonal of channel scales gives ASVD.
"""

from __future__ import annotations

import torch

MAX_DAMPING_STEPS = 5  # lambda grows 1e-6 -> 1e-2 times the mean |diagonal|; more would distort the layer


def all_finite(matrix: torch.Tensor, rows: int = 256) -> bool:
    """Whether every value is finite, checked ``rows`` rows at a time (``torch.isfinite`` on the whole of a
    large matrix makes temporaries of its size)."""
    return all(bool(torch.isfinite(part).all()) for part in matrix.split(rows))


def cholesky_factor(gram: torch.Tensor) -> torch.Tensor:
    """Lower L (float64) with L L^T = gram + lambda I, lambda the smallest damping that makes it PD.

    lambda starts at 1e-6 times the mean |diagonal| and grows tenfold per failed attempt (singular
    Grams are common: dead channels, fewer calibration rows than input features).
    """
    return damped_cholesky(gram)[0]


def damped_cholesky(gram: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``cholesky_factor`` and the damping lambda it added: L L^T - lambda I is the Gram again, so exact
    output errors tr(D G D^T) = ||D L||^2 - lambda ||D||^2 can be taken from the factor alone."""
    gram = gram.to(torch.float64)
    scale = float(gram.diagonal().abs().mean()) if gram.numel() else 0.0
    if not all_finite(gram) or scale == 0.0:
        raise ValueError(
            "the calibration Gram matrix is zero or not finite (the layer saw no calibration input, or "
            "its inputs overflowed); check the calibration text and run the model in float32 or float64"
        )
    # gram + damping I factorised in one working copy, in place on the CPU (no identity matrix, no
    # temporaries: at d_in = 11008 each (d_in, d_in) float64 matrix is 1 GB); the diagonal sums are the
    # same floats as with the identity, and so is the factor. The copy is column-major, LAPACK's layout
    # (gram is symmetric), else torch factorises a column-major temporary and copies it back.
    work = torch.empty_like(gram).T
    info = torch.zeros((), dtype=torch.int32, device=gram.device)
    damping = 1e-6 * scale
    for _ in range(MAX_DAMPING_STEPS):
        work.copy_(gram)
        work.diagonal().add_(damping)
        if work.device.type == "cpu":
            chol, info = torch.linalg.cholesky_ex(work, out=(work, info))
        else:
            chol, info = torch.linalg.cholesky_ex(work)
        if int(info) == 0 and all_finite(chol):
            return chol, damping
        del chol
        damping *= 10.0
    raise ValueError(
        f"the calibration Gram matrix is not positive definite even with damping {damping / 10:.3g} "
        f"({damping / 10 / scale:.0e} x its mean diagonal): it is not a Gram matrix X^T X; recompute the "
        "calibration statistics (delete the calibration cache) in float32 or float64"
    )


WHITEN_PARTS = 4  # column blocks of the triangular product


def whiten(x: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """``x @ lower`` (..., d) for a lower-triangular ``lower`` (d, d), skipping the zeros above its diagonal.

    Column block [a, b) of the product only needs rows a: of ``lower``: in ``WHITEN_PARTS`` = 4 blocks that
    is 5/8 of the dense product's multiplications, 1.3-1.5x faster on one CPU thread at d = 256-1024 (the
    same values up to the order of the sums). Every transform of this module is lower triangular.
    """
    d = lower.shape[0]
    flat = x.reshape(-1, d)
    bounds = [d * i // WHITEN_PARTS for i in range(WHITEN_PARTS + 1)]
    parts = [flat[:, a:] @ lower[a:, a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    return torch.cat(parts, dim=1).reshape(*x.shape[:-1], d)


def whitened_lowrank(
    weight: torch.Tensor, chol: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors (up (d_out, r), down (r, d_in)), float64, minimising ||(W - up down) L||_F.

    ``chol`` is any invertible lower-triangular transform (d_in, d_in). The singular values are split
    evenly between the factors (sqrt on each side) so both have comparable scale.
    """
    chol = chol.to(torch.float64)
    whitened = whiten(weight.to(torch.float64), chol)  # (d_out, d_in); the float64 copy of W is freed at once
    if whitened.shape[0] < whitened.shape[1]:  # wide: LAPACK is about 2x faster on the tall transpose
        v, s, uh = torch.linalg.svd(whitened.T, full_matrices=False)  # (d_in, k), (k,), (k, d_out)
        u, vh = uh.T, v.T
        del v, uh
    else:
        u, s, vh = torch.linalg.svd(whitened, full_matrices=False)  # (d_out, k), (k,), (k, d_in)
    del whitened
    root = s[:rank].sqrt()
    up = u[:, :rank] * root  # (d_out, r)
    whitened_down = root[:, None] * vh[:rank]  # (r, d_in), in the whitened basis
    del u, vh  # the full singular vectors, before the triangular solve allocates
    down = torch.linalg.solve_triangular(chol, whitened_down, upper=False, left=False)  # down L = whitened
    return up, down


def whitened_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """Output error on the calibration inputs: ||(W - W_hat) X^T||_F^2 = tr((W - W_hat) G (W - W_hat)^T)."""
    delta = weight.detach().to(torch.float64) - approx.detach().to(torch.float64)  # (d_out, d_in)
    return float(((delta @ gram.to(torch.float64)) * delta).sum())


def squared_singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """sigma^2 of ``matrix`` (descending, min(shape) values) as the eigenvalues of its smaller Gram matrix.

    Two to four times faster than ``svdvals(matrix).square()`` on one CPU thread (eigvalsh of a k x k
    matrix, k = min(shape), after one product); the same values to float noise: each is off by at most a
    few eps x sigma_max^2, which is also the size of the rounding of the squared singular values.
    """
    small = matrix if matrix.shape[-2] <= matrix.shape[-1] else matrix.mT  # (k, n), k <= n
    return torch.linalg.eigvalsh(small @ small.mT).flip(-1).clamp_min(0.0)
