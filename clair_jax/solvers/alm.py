r"""Inexact augmented Lagrangian (ALM / ADMM) for the exact program.

.. math:: \min_{L, C} \|L\|_* + λ \sum_k \|C_k\|_F \quad \text{s.t.}\quad L + C = M

Iteration (Lin, Chen & Ma's inexact ALM with block shrinkage in place of
entrywise shrinkage)::

    L ← svt(M − C + Y/ρ, 1/ρ)
    C ← block_soft_threshold(M − L + Y/ρ, λ/ρ)
    Y ← Y + ρ (M − L − C)
    ρ ← ρ·η or ρ/η when one residual outgrows the other (residual balancing)

Stops when the relative primal residual ‖M − L − C‖_F/‖M‖_F and the relative dual
residual ρ‖ΔC‖_F/‖M‖_F are both below ``tol``, or after ``max_iter`` steps
(``converged`` is then False: non-convergence is reported, never hidden).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from clair_jax.linalg import init_subspace, partial_svt_with_spectrum
from clair_jax.prox import block_soft_threshold, safe_frobenius_norm, svt_with_spectrum
from clair_jax.solvers.common import SolverOutput, regularizer
from clair_jax.stack import from_stacked, to_stacked

__all__ = ["solve_exact"]


class _State(NamedTuple):
    step: jax.Array
    low_rank: jax.Array
    sparse: jax.Array
    dual: jax.Array
    rho: jax.Array
    singular_values: jax.Array
    primal_residual: jax.Array
    dual_residual: jax.Array
    svt_state: object          # linalg.SubspaceState with the partial SVT, else None


def solve_exact(blocks, lam, *, tol, max_iter, rho_growth=2.0, balance=10.0, spectral_norm=None,
                svt_budget=None, svt_slack=0.1):
    """Solve the exact program for one (K, p, q) problem scaled to ‖M‖_2 ≈ 1.

    Args:
        blocks: (K, p, q) array M (block k is client k).
        lam: block-penalty weight λ > 0 (scalar).
        tol: relative tolerance on primal and dual residuals.
        max_iter: iteration cap.
        rho_growth: factor by which the penalty parameter ρ moves when rebalancing.
        balance: ρ moves when one residual exceeds the other by this factor.
        svt_budget: None for the full-SVD SVT; an int k for the warm-started rank-k
            partial SVT of :mod:`clair_jax.linalg` (certified, falls back to the full SVD).
        svt_slack: the partial SVT's answer is also accepted when its Ritz residual is
            below this fraction of the current primal residual ‖M − L − C‖_F (capped
            at 1 % of ‖M‖_F): inexact steps whose error shrinks with the residual.
        spectral_norm: ‖M‖_2 if the caller knows it (saves one SVD).

    Returns:
        :class:`SolverOutput`.
    """
    num_clients = blocks.shape[0]
    dtype = blocks.dtype
    lam = jnp.asarray(lam, dtype)
    m_stacked = to_stacked(blocks)
    m_norm = jnp.maximum(safe_frobenius_norm(m_stacked), jnp.finfo(dtype).tiny)
    spectral = jnp.linalg.norm(m_stacked, ord=2) if spectral_norm is None else jnp.asarray(spectral_norm, dtype)
    spectral = jnp.maximum(spectral, jnp.finfo(dtype).tiny)
    # Dual start scaled into the unit ball of the dual norm max(‖Y‖_2, max_k ‖Y_k‖_F / λ).
    dual_scale = jnp.maximum(spectral, jnp.max(safe_frobenius_norm(blocks)) / lam)
    rho0 = 1.25 / spectral
    min_pq = min(m_stacked.shape)

    def cond(s):
        done = (s.primal_residual < tol) & (s.dual_residual < tol)
        return (s.step < max_iter) & ~done & ((s.step == 0) | jnp.isfinite(s.primal_residual))

    def svt_step(x, tau, svt_state, primal_res):
        if svt_budget is None:
            return svt_with_spectrum(x, tau), svt_state
        slack = svt_slack * m_norm * jnp.minimum(primal_res, 1e-2)
        return partial_svt_with_spectrum(x, tau, svt_state, atol=slack)

    def body(s):
        (low_rank_stacked, sv), svt_state = svt_step(
            m_stacked - to_stacked(s.sparse) + to_stacked(s.dual) / s.rho, 1.0 / s.rho, s.svt_state,
            s.primal_residual,
        )
        low_rank = from_stacked(low_rank_stacked, num_clients)
        sparse = block_soft_threshold(blocks - low_rank + s.dual / s.rho, lam / s.rho)
        residual = blocks - low_rank - sparse
        dual = s.dual + s.rho * residual
        primal_res = safe_frobenius_norm(to_stacked(residual)) / m_norm
        dual_res = s.rho * safe_frobenius_norm(to_stacked(sparse - s.sparse)) / m_norm
        # Residual balancing (Boyd et al. §3.4.1): keep primal and dual residuals
        # within a factor of each other so that neither stalls.
        rho = jnp.where(primal_res > balance * dual_res, s.rho * rho_growth,
                        jnp.where(dual_res > balance * primal_res, s.rho / rho_growth, s.rho))
        return _State(s.step + 1, low_rank, sparse, dual, rho, sv, primal_res, dual_res, svt_state)

    inf = jnp.asarray(jnp.inf, dtype)
    init = _State(
        step=jnp.asarray(0, jnp.int32),
        low_rank=jnp.zeros_like(blocks),
        sparse=jnp.zeros_like(blocks),
        dual=blocks / dual_scale,
        rho=rho0.astype(dtype),
        singular_values=jnp.zeros((min_pq,), dtype),
        primal_residual=inf,
        dual_residual=inf,
        svt_state=None if svt_budget is None else init_subspace(m_stacked.shape, svt_budget, dtype),
    )
    s = jax.lax.while_loop(cond, body, init)
    converged = (s.primal_residual < tol) & (s.dual_residual < tol)
    return SolverOutput(
        low_rank=s.low_rank,
        sparse=s.sparse,
        singular_values=s.singular_values,
        iterations=s.step,
        converged=converged,
        primal_residual=s.primal_residual,
        dual_residual=s.dual_residual,
        objective=regularizer(s.singular_values, s.sparse, lam),
        svt_fallbacks=jnp.asarray(0, jnp.int32) if svt_budget is None else s.svt_state.fallbacks,
    )
