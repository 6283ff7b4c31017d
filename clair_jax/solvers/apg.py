r"""Accelerated proximal gradient (FISTA) for the penalised program.

.. math:: \min_{L, C} \tfrac12\|M − L − C\|_F^2 + μ\big(\|L\|_* + λ \sum_k \|C_k\|_F\big)

C is minimised out in closed form, C(L) = block_soft_threshold(M − L, μλ), which
leaves a problem in L alone whose smooth part (a block-wise Huber function of
M − L) has a 1-Lipschitz gradient −(M − L − C(L)). A proximal-gradient step
with unit step size is then simply::

    L⁺ = svt(M − C(Y), μ)          (Y: the extrapolated point)

FISTA adds momentum, *continuation* starts μ at ‖M‖_2 (where L = 0) and
shrinks it geometrically to the target (each stage warm-starts the next), and an
adaptive restart (O'Donoghue & Candès) resets momentum when it stops helping.

Stops, once μ has reached its target, when the prox-gradient step
‖L⁺ − Y‖_F/‖M‖_F (the optimality residual) and the change ‖L⁺ − L‖_F/‖M‖_F are
both below ``tol``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from clair_jax import linalg
from clair_jax.prox import block_soft_threshold, safe_frobenius_norm, svt_with_spectrum
from clair_jax.solvers.common import SolverOutput, regularizer, start_subspace as _start_subspace
from clair_jax.stack import from_stacked, to_stacked

__all__ = ["solve_penalized"]


class _State(NamedTuple):
    step: jax.Array
    low_rank: jax.Array
    previous: jax.Array
    momentum: jax.Array       # FISTA t_k
    mu: jax.Array             # continuation level of the next step
    at_target: jax.Array      # the last step was taken at the target μ
    singular_values: jax.Array
    primal_residual: jax.Array
    dual_residual: jax.Array
    svt_state: object          # linalg.SubspaceState with the partial SVT, else None


def solve_penalized(blocks, lam, mu, *, tol, max_iter, continuation=0.6, spectral_norm=None,
                    svt_budget=None, svt_slack=0.1, svt_state=None, init=None):
    """Solve the penalised program for one (K, p, q) problem scaled to ‖M‖_2 ≈ 1.

    Args:
        blocks: (K, p, q) array M.
        lam: block-penalty weight λ > 0.
        mu: overall penalty μ > 0 (in the same scaling as ``blocks``).
        tol: relative tolerance on the prox-gradient step and the change in L.
        max_iter: iteration cap (continuation stages included).
        continuation: factor by which μ shrinks per step until it reaches ``mu``.
        svt_budget: None for the full-SVD SVT; an int k for the warm-started rank-k
            partial SVT of :mod:`clair_jax.linalg` (certified, falls back to the full SVD).
        svt_state: the partial SVT's starting subspace (``SolverOutput.svt_state`` of a
            neighbouring solve); default a fixed random start.
        svt_slack: the partial SVT's answer is also accepted when its Ritz residual is
            below this fraction of the current prox-gradient step ‖L⁺ − Y‖_F (capped at
            1 % of ‖M‖_F): inexact steps whose error shrinks as FISTA converges.
        spectral_norm: ‖M‖_2 if the caller knows it (saves one SVD).
        init: (K, p, q) warm start for L (e.g. the solution at a neighbouring λ);
            continuation is then skipped (the start is already near the target)
            unless ``init`` is all zeros.

    Returns:
        :class:`SolverOutput`; ``objective`` is ½‖M − L − C‖_F² + μ(‖L‖_* + λΣ‖C_k‖_F).
    """
    num_clients = blocks.shape[0]
    dtype = blocks.dtype
    lam = jnp.asarray(lam, dtype)
    mu = jnp.asarray(mu, dtype)
    m_stacked = to_stacked(blocks)
    m_norm = jnp.maximum(safe_frobenius_norm(m_stacked), jnp.finfo(dtype).tiny)
    spectral = linalg.spectral_norm(m_stacked) if spectral_norm is None else jnp.asarray(spectral_norm, dtype)
    mu_start = jnp.maximum(spectral, mu)
    if init is not None:  # a warm start skips the continuation, unless it is L = 0 (a cold start)
        mu_start = jnp.where(jnp.any(init != 0), mu, mu_start)
    min_pq = min(m_stacked.shape)

    def prox_grad(y, mu_now, svt_state, step_res):
        sparse = block_soft_threshold(blocks - y, mu_now * lam)
        x = m_stacked - to_stacked(sparse)
        if svt_budget is None:
            (low_rank_stacked, sv) = svt_with_spectrum(x, mu_now)
        else:
            slack = svt_slack * m_norm * jnp.minimum(step_res, 1e-2)
            (low_rank_stacked, sv), svt_state = linalg.partial_svt_with_spectrum(x, mu_now, svt_state, atol=slack)
        return from_stacked(low_rank_stacked, num_clients), sv, svt_state

    # Residuals certify the target problem only when the step that produced them was
    # taken at the target μ: when μ reaches its target in one shrink (μ > 0.6‖M‖₂),
    # L = SVT(M, ‖M‖₂) = 0 twice in a row would otherwise look converged.
    def cond(s):
        done = s.at_target & (s.primal_residual < tol) & (s.dual_residual < tol)
        return (s.step < max_iter) & ~done & ((s.step == 0) | jnp.isfinite(s.primal_residual))

    def body(s):
        beta = (s.momentum - 1.0) / (0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * s.momentum**2)))
        y = s.low_rank + beta * (s.low_rank - s.previous)
        new, sv, svt_state = prox_grad(y, s.mu, s.svt_state, s.primal_residual)
        # ‖L⁺ − Y‖², ‖L⁺ − L‖² and ⟨Y − L⁺, L⁺ − L⟩ as one reduction (on small problems
        # every separate reduction is a kernel launch that costs as much as its work).
        step, move = new - y, new - s.low_rank
        sq_step, sq_move, inner = jnp.sum(jnp.stack([step * step, move * move, -step * move]), axis=(1, 2, 3))
        step_res = jnp.sqrt(sq_step) / m_norm
        change = jnp.sqrt(sq_move) / m_norm
        # Restart momentum when the step points against it, or when μ moves on.
        against = inner > 0
        next_mu = jnp.maximum(s.mu * continuation, mu)
        restart = against | (next_mu < s.mu)
        t_next = jnp.where(restart, 1.0, 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * s.momentum**2)))
        return _State(
            s.step + 1, new, s.low_rank, t_next.astype(dtype), next_mu, s.mu <= mu, sv, step_res, change,
            svt_state,
        )

    inf = jnp.asarray(jnp.inf, dtype)
    start = jnp.zeros_like(blocks) if init is None else jnp.asarray(init, dtype)
    state0 = _State(
        step=jnp.asarray(0, jnp.int32),
        low_rank=start,
        previous=start,
        momentum=jnp.asarray(1.0, dtype),
        mu=mu_start.astype(dtype),
        at_target=jnp.asarray(False),
        singular_values=jnp.zeros((min_pq,), dtype),
        primal_residual=inf,
        dual_residual=inf,
        svt_state=_start_subspace(svt_state, m_stacked.shape, svt_budget, dtype),
    )
    s = jax.lax.while_loop(cond, body, state0)
    sparse = block_soft_threshold(blocks - s.low_rank, mu * lam)
    fit = 0.5 * jnp.sum(jnp.square(blocks - s.low_rank - sparse))
    converged = s.at_target & (s.primal_residual < tol) & (s.dual_residual < tol)
    return SolverOutput(
        low_rank=s.low_rank,
        sparse=sparse,
        singular_values=s.singular_values,
        iterations=s.step,
        converged=converged,
        primal_residual=s.primal_residual,
        dual_residual=s.dual_residual,
        objective=fit + mu * regularizer(s.singular_values, sparse, lam),
        svt_fallbacks=jnp.asarray(0, jnp.int32) if svt_budget is None else s.svt_state.fallbacks,
        svt_state=s.svt_state,
    )
