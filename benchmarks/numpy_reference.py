"""Plain NumPy implementation of the *same* iterations as ``clair_jax.solvers``.

This is what a user without JAX would write: one problem at a time, a Python
``while`` loop, ``numpy.linalg.svd`` for every singular-value thresholding, and a
Python loop over layers. It mirrors, step for step, the inexact ALM of
``clair_jax/solvers/alm.py`` (exact program, residual balancing) and the FISTA of
``clair_jax/solvers/apg.py`` (penalised program, continuation, adaptive restart),
including the spectral-norm normalisation done by ``cj.decompose``, so that at the
same tolerance both reach the same objective in the same number of iterations
(``tests/test_bench_smoke.py`` checks this at a tiny size, which also catches the
two drifting apart).

Only used by the benchmarks: it is a yardstick, not part of the package.
"""

from __future__ import annotations

import numpy as np

__all__ = ["solve_exact", "solve_penalized", "decompose"]


def _to_stacked(blocks):
    k, p, q = blocks.shape
    return np.transpose(blocks, (1, 0, 2)).reshape(p, k * q)


def _from_stacked(matrix, k):
    p, kq = matrix.shape
    return np.transpose(matrix.reshape(p, k, kq // k), (1, 0, 2))


def _block_norms(blocks):
    return np.sqrt(np.sum(np.square(blocks), axis=(-2, -1)))


def _block_soft_threshold(blocks, tau):
    norms = _block_norms(blocks)
    keep = norms > tau
    scale = np.where(keep, 1.0 - tau / np.where(keep, norms, 1.0), 0.0)
    return blocks * scale[:, None, None].astype(blocks.dtype)


def _svt(x, tau):
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    s = np.maximum(s - tau, 0.0).astype(x.dtype)
    keep = s > 0
    # Only the kept singular triplets contribute: cheaper reconstruction.
    return (u[:, keep] * s[keep]) @ vt[keep], s


def solve_exact(blocks, lam, *, tol, max_iter, rho_growth=2.0, balance=10.0):
    """Inexact ALM for min ‖L‖_* + λΣ‖C_k‖_F s.t. L + C = M (one (K, p, q) problem).

    Returns a dict with low_rank, sparse, singular_values, iterations, converged,
    objective (in the scaling of ``blocks``).
    """
    dtype = blocks.dtype
    k = blocks.shape[0]
    m = _to_stacked(blocks)
    m_norm = max(np.linalg.norm(m), np.finfo(dtype).tiny)
    spectral = max(np.linalg.norm(m, 2), np.finfo(dtype).tiny)
    dual_scale = max(spectral, np.max(_block_norms(blocks)) / lam)
    rho = 1.25 / spectral
    low = np.zeros_like(blocks)
    sparse = np.zeros_like(blocks)
    dual = (blocks / dual_scale).astype(dtype)
    sv = np.zeros(min(m.shape), dtype)
    primal_res = dual_res = np.inf
    step = 0
    while step < max_iter and not (primal_res < tol and dual_res < tol):
        low_s, sv = _svt(m - _to_stacked(sparse) + _to_stacked(dual) / rho, 1.0 / rho)
        low = _from_stacked(low_s, k)
        new_sparse = _block_soft_threshold(blocks - low + dual / rho, lam / rho)
        residual = blocks - low - new_sparse
        dual = dual + rho * residual
        primal_res = np.linalg.norm(residual) / m_norm
        dual_res = rho * np.linalg.norm(new_sparse - sparse) / m_norm
        sparse = new_sparse
        if primal_res > balance * dual_res:
            rho = rho * rho_growth
        elif dual_res > balance * primal_res:
            rho = rho / rho_growth
        step += 1
        if not np.isfinite(primal_res):
            break
    objective = float(np.sum(sv) + lam * np.sum(_block_norms(sparse)))
    return dict(low_rank=low, sparse=sparse, singular_values=sv, iterations=step,
                converged=bool(primal_res < tol and dual_res < tol), objective=objective)


def solve_penalized(blocks, lam, mu, *, tol, max_iter, continuation=0.6):
    """FISTA for min ½‖M − L − C‖² + μ(‖L‖_* + λΣ‖C_k‖_F) (one (K, p, q) problem)."""
    dtype = blocks.dtype
    k = blocks.shape[0]
    m = _to_stacked(blocks)
    m_norm = max(np.linalg.norm(m), np.finfo(dtype).tiny)
    mu_now = max(np.linalg.norm(m, 2), mu)
    low = np.zeros_like(blocks)
    prev = np.zeros_like(blocks)
    t = 1.0
    sv = np.zeros(min(m.shape), dtype)
    step_res = change = np.inf
    step = 0
    while step < max_iter and not (mu_now <= mu and step_res < tol and change < tol):
        t_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
        beta = (t - 1.0) / t_next
        y = low + dtype.type(beta) * (low - prev)
        c = _block_soft_threshold(blocks - y, mu_now * lam)
        new_s, sv = _svt(m - _to_stacked(c), mu_now)
        new = _from_stacked(new_s, k)
        step_res = np.linalg.norm(new - y) / m_norm
        change = np.linalg.norm(new - low) / m_norm
        against = np.sum((y - new) * (new - low)) > 0
        next_mu = max(mu_now * continuation, mu)
        restart = against or next_mu < mu_now
        t = 1.0 if restart else t_next
        prev, low = low, new
        mu_now = next_mu
        step += 1
        if not np.isfinite(step_res):
            break
    sparse = _block_soft_threshold(blocks - low, mu * lam)
    fit = 0.5 * np.sum(np.square(blocks - low - sparse))
    objective = float(fit + mu * (np.sum(sv) + lam * np.sum(_block_norms(sparse))))
    return dict(low_rank=low, sparse=sparse, singular_values=sv, iterations=step,
                converged=bool(mu_now <= mu and step_res < tol and change < tol),
                objective=objective)


def decompose(blocks, *, lam, mu=None, tol, max_iter):
    """Loop over leading (layer) axes; normalise each problem by its spectral norm.

    Mirrors ``cj.decompose``: ``mu`` is in the user's units, objectives come back
    in the user's scale. Returns (objectives, iterations, converged) arrays of the
    leading shape.
    """
    blocks = np.asarray(blocks)
    lead = blocks.shape[:-3]
    flat = blocks.reshape((-1,) + blocks.shape[-3:])
    objectives, iterations, converged = [], [], []
    for problem in flat:
        scale = max(float(np.linalg.norm(_to_stacked(problem), 2)), np.finfo(problem.dtype).tiny)
        scaled = (problem / scale).astype(problem.dtype)
        if mu is None:
            out = solve_exact(scaled, lam, tol=tol, max_iter=max_iter)
            objectives.append(out["objective"] * scale)
        else:
            out = solve_penalized(scaled, lam, mu / scale, tol=tol, max_iter=max_iter)
            objectives.append(out["objective"] * scale**2)
        iterations.append(out["iterations"])
        converged.append(out["converged"])
    return (np.array(objectives).reshape(lead), np.array(iterations).reshape(lead),
            np.array(converged).reshape(lead))
