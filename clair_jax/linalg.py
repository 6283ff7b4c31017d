r"""Fast singular-value thresholding: a warm-started partial SVD with an exact fallback.

SVT only needs the singular triplets *above* the threshold, and inside the solvers
the matrix changes little from one iteration to the next. :func:`partial_svt_with_spectrum`
therefore runs block subspace iteration on a rank budget of ``k`` columns,
started from the right singular vectors of the previous call (carried in a
:class:`SubspaceState`)::

    for _ in range(power_iters):  V ← orth(Xᵀ orth(X V))
    Q = orth(X V);  Ũ Σ Vᵀ = svd(Qᵀ X)  (k × n);  U = Q Ũ
    svt ≈ U max(Σ − τ, 0) Vᵀ

which costs a few (m × n) @ (n × k) products instead of a full SVD. The answer is
*certified* before it is used: it is accepted only if (a) at least ``guard`` of the
k Ritz values fall below τ (the budget was large enough) and (b) every kept Ritz
pair has a residual ‖X vᵢ − σᵢ uᵢ‖ ≤ ``rtol``·σ₁ (the subspace has converged).
Otherwise the call falls back to the full SVD of :func:`clair_jax.prox.svt_with_spectrum`
and restarts the subspace from it, so the result never silently differs from the
exact path by more than the certified residual.

Under ``jax.vmap`` a per-problem ``lax.cond`` becomes a ``select`` that runs both
branches; pass ``axis_name`` (the vmap axis name) to pool the accept/fallback
decision across the batch, so the cond stays a real branch and the full SVD is only
computed on iterations where some problem in the batch needs it.

:func:`use_partial_svt` is the rule for when this pays (measured by
``benchmarks/bench_svt.py``): a rank budget well below the short side of a matrix
that is not tiny.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from clair_jax.prox import safe_frobenius_norm

__all__ = [
    "SubspaceState",
    "init_subspace",
    "partial_svt_with_spectrum",
    "rank_budget",
    "use_partial_svt",
]


class SubspaceState(NamedTuple):
    """Warm-start state of the partial SVT for one (m, n) matrix.

    Attributes:
        basis: (n, k) orthonormal estimate of the leading right singular subspace.
        fallbacks: int32 count of calls that needed the full SVD (a diagnostic).
    """

    basis: jax.Array
    fallbacks: jax.Array


def rank_budget(shape, expected_rank=None, *, oversample=8):
    """Static number of columns k for a partial SVT of an (m, n) matrix.

    ``2·expected_rank + oversample`` (or min(m, n)/8 + oversample when unknown),
    capped at min(m, n).
    """
    short = min(shape[-2:])
    base = 2 * int(expected_rank) if expected_rank is not None else short // 8
    return int(min(short, max(base + oversample, 2 * oversample)))


def use_partial_svt(shape, budget):
    """Whether the partial SVT is expected to beat a full SVD (static rule).

    From ``benchmarks/bench_svt.py`` on CPU: the full SVD of an (m, n) matrix costs
    O(m n min(m, n)) with a large constant, a partial step a handful of O(m n k)
    products plus O(n k²) small factorisations. It pays once the short side is at
    least 64 and the budget is at most a quarter of it.
    """
    short = min(shape[-2:])
    return short >= 64 and 4 * budget <= short


def init_subspace(shape, budget, dtype=jnp.float32, *, seed=0):
    """A deterministic random orthonormal (n, k) start for an (m, n) matrix."""
    n = shape[-1]
    k = min(int(budget), min(shape[-2:]))
    gauss = jax.random.normal(jax.random.PRNGKey(seed), (n, k), dtype)
    basis, _ = jnp.linalg.qr(gauss)
    return SubspaceState(basis=basis, fallbacks=jnp.asarray(0, jnp.int32))


def _orth(y):
    q, _ = jnp.linalg.qr(y)
    return q


def _full_branch(x, tau, k):
    """Exact SVT by full SVD (same zero handling as prox.svt_with_spectrum) + new basis."""
    m, n = x.shape
    below = safe_frobenius_norm(x) <= tau
    anchor = jnp.eye(m, n, dtype=x.dtype) * (1.0 + jnp.arange(n, dtype=x.dtype))
    x_safe = jnp.where(below, anchor, x)
    u, s, vt = jnp.linalg.svd(x_safe, full_matrices=False)
    s_shrunk = jnp.where(below, 0.0, jnp.maximum(s - tau, 0.0))
    return (u * s_shrunk[None, :]) @ vt, s_shrunk, jnp.swapaxes(vt[:k], 0, 1)


def partial_svt_with_spectrum(x, tau, state, *, power_iters=1, rtol=None, guard=2,
                              axis_name=None):
    r"""Singular-value soft-thresholding of one (m, n) matrix by warm-started subspace iteration.

    Computes :math:`\operatorname{svt}(X, τ) = U\max(Σ − τ, 0)V^T` like
    :func:`clair_jax.prox.svt_with_spectrum`, from a rank-k partial SVD when it can
    be certified (see the module docstring), else from the full SVD.

    Args:
        x: (m, n) matrix (one problem; vmap for more).
        tau: threshold τ ≥ 0 (scalar).
        state: :class:`SubspaceState` from :func:`init_subspace` or the previous call.
        power_iters: subspace-iteration steps per call (the warm start accumulates
            them across calls).
        rtol: accepted Ritz residual relative to σ₁; default 1e-3·√eps-ish by dtype
            (3e-5 in float32, 1e-9 in float64).
        guard: how many of the k Ritz values must fall below τ.
        axis_name: name of an enclosing ``vmap`` axis over which to pool the
            fallback decision (keeps ``lax.cond`` a branch under vmap).

    Returns:
        ``((svt(x, τ), shrunk singular values of shape (min(m, n),)), new_state)``;
        the spectrum is descending and zero-padded beyond k on the fast path.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from clair_jax import linalg
        >>> x = jax.random.normal(jax.random.PRNGKey(0), (64, 5)) @ jax.random.normal(
        ...     jax.random.PRNGKey(1), (5, 80))
        >>> state = linalg.init_subspace(x.shape, 16)
        >>> for _ in range(3):
        ...     (low, s), state = linalg.partial_svt_with_spectrum(x, 1.0, state)
        >>> bool(jnp.sum(s > 0) == 5)
        True
    """
    m, n = x.shape
    short = min(m, n)
    k = state.basis.shape[-1]
    dtype = x.dtype
    tau = jnp.asarray(tau, dtype)
    if rtol is None:
        rtol = 1e-9 if dtype == jnp.float64 else 3e-5
    basis = state.basis.astype(dtype)
    for _ in range(power_iters):
        basis = _orth(x.T @ _orth(x @ basis))
    q = _orth(x @ basis)                                   # (m, k)
    ub, s, vt = jnp.linalg.svd(q.T @ x, full_matrices=False)  # (k, k), (k,), (k, n)
    u = q @ ub
    s_shrunk = jnp.maximum(s - tau, 0.0)
    kept = s_shrunk > 0
    # (a) the budget reaches below the threshold, (b) kept Ritz pairs have converged.
    budget_ok = jnp.sum(kept) <= k - guard
    residual = jnp.sqrt(jnp.sum(jnp.square(x @ vt.T - u * s[None, :]), axis=0))
    accurate = jnp.all(jnp.where(kept, residual, 0.0) <= rtol * jnp.maximum(s[0], jnp.finfo(dtype).tiny))
    finite = jnp.all(jnp.isfinite(s))
    below = safe_frobenius_norm(x) <= tau
    ok = (budget_ok & accurate & finite) | below
    if axis_name is not None:
        ok = jax.lax.pmin(ok.astype(jnp.int32), axis_name) > 0

    def fast(_):
        low = jnp.where(below, 0.0, (u * s_shrunk[None, :]) @ vt)
        spec = jnp.zeros((short,), dtype).at[:k].set(jnp.where(below, 0.0, s_shrunk))
        new_basis = jnp.where(below, state.basis.astype(dtype), vt.T)
        return low, spec, new_basis

    def full(_):
        return _full_branch(x, tau, k)

    low, spec, new_basis = jax.lax.cond(ok, fast, full, None)
    new_state = SubspaceState(basis=new_basis, fallbacks=state.fallbacks + (~ok).astype(jnp.int32))
    return (low, spec), new_state
