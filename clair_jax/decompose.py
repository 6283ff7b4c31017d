"""Stage 3 of the pipeline: split stacked updates into low-rank plus block-sparse parts.

``decompose`` is the public entry: it checks the input, brings every problem to
a common scale, solves all of them in one jitted, vmapped call and reports, per
problem, how the solver ended.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clair_jax import _checks, linalg
from clair_jax._compile import program
from clair_jax.prox import safe_frobenius_norm
from clair_jax.sharding import over_problems
from clair_jax.solvers import solve_exact, solve_penalized
from clair_jax.solvers.common import default_tolerance
from clair_jax.stack import orient, to_stacked
from clair_jax.tuning import noise_level

__all__ = ["Decomposition", "decompose", "DEFAULT_LAMBDA"]

#: λ used by :func:`decompose` when none is given. It sits inside the exact
#: program's recovery window for spread-out benign clients (above √(r/K)) and
#: below the level where rank-one contamination is absorbed (≈ 1). :func:`clair`
#: does better: it chooses λ from the data.
DEFAULT_LAMBDA = 0.9


class Decomposition(NamedTuple):
    """M = L + C (+ residual), per problem. Leading axes are those of the input.

    Attributes:
        low_rank: (..., K, p, q) L̂, in the blocks' layout and scale.
        sparse: (..., K, p, q) Ĉ, block-sparse.
        block_norms: (..., K) ‖Ĉ_k‖_F.
        singular_values: (..., min(p, Kq)) singular values of the stacked L̂.
        iterations: (...,) solver steps taken.
        converged: (...,) bool: both stopping criteria met before ``max_iter``.
        objective: (...,) objective value in the input's scale.
        primal_residual, dual_residual: (...,) relative residuals at the last step.
        lam: (...,) λ used. mu: (...,) μ used (0 for the exact program).
    """

    low_rank: jax.Array
    sparse: jax.Array
    block_norms: jax.Array
    singular_values: jax.Array
    iterations: jax.Array
    converged: jax.Array
    objective: jax.Array
    primal_residual: jax.Array
    dual_residual: jax.Array
    lam: jax.Array
    mu: jax.Array


def spectral_scale(blocks):
    """‖[Θ_1 … Θ_K]‖_2 of one problem, 1 where it is 0 (nothing to scale)."""
    s = linalg.spectral_norm(to_stacked(blocks))
    return jnp.where(s > 0, s, 1.0)


def solve_one(blocks, lam, mu, *, exact, tol, max_iter, svt_budget=None):
    """Solve one (K, p, q) problem at its own scale; ``mu`` in the blocks' units.

    The problem is divided by ‖M‖_2 so that tolerances and defaults are scale
    free; L, C, singular values and objective are mapped back. ``svt_budget``:
    None for the full-SVD SVT, else the partial SVT's rank budget
    (:func:`clair_jax.linalg.choose_svt_budget`).
    """
    scale = spectral_scale(blocks)
    x = blocks / scale
    if exact:
        out = solve_exact(x, lam, tol=tol, max_iter=max_iter, spectral_norm=1.0, svt_budget=svt_budget)
        objective = out.objective * scale          # homogeneous of degree 1
        mu_used = jnp.zeros((), blocks.dtype)
    else:
        out = solve_penalized(x, lam, mu / scale, tol=tol, max_iter=max_iter, spectral_norm=1.0,
                              svt_budget=svt_budget)
        objective = out.objective * scale**2       # degree 2 once μ is scaled with M
        mu_used = jnp.asarray(mu, blocks.dtype)
    sparse = out.sparse * scale
    return Decomposition(
        low_rank=out.low_rank * scale,
        sparse=sparse,
        block_norms=safe_frobenius_norm(sparse),
        singular_values=out.singular_values * scale,
        iterations=out.iterations,
        # Non-finite data become a flag, never a silent "converged".
        converged=out.converged & jnp.isfinite(objective) & jnp.all(jnp.isfinite(blocks)),
        objective=objective,
        primal_residual=out.primal_residual,
        dual_residual=out.dual_residual,
        lam=jnp.asarray(lam, blocks.dtype),
        mu=mu_used,
    )


@functools.lru_cache(maxsize=256)
def _oriented_shape(shape, side):
    # Cached: tracing ``orient`` costs a quarter of a millisecond, as much as a small solve.
    return jax.eval_shape(lambda b: orient(b, side), jax.ShapeDtypeStruct(shape, jnp.float32)).shape


@program(static_argnames=("side", "exact", "auto_mu", "tol", "max_iter", "svt_budget"))
def _decompose_jit(blocks, lam, mu, *, side, exact, auto_mu, tol, max_iter, svt_budget):
    # Everything after the input checks is one compiled call: on small problems
    # the eager reshapes and broadcasts around the solve cost as much as the solve.
    def one(b, l, m):
        if auto_mu:
            k, p, q = b.shape
            m = noise_level(b) * float(np.sqrt(p) + np.sqrt(k * q))
        return solve_one(b, l, m, exact=exact, tol=tol, max_iter=max_iter, svt_budget=svt_budget)

    oriented = orient(blocks, side)
    lead = oriented.shape[:-3]
    flat = oriented.reshape((-1,) + oriented.shape[-3:])
    n = flat.shape[0]
    lam_flat = jnp.broadcast_to(jnp.asarray(lam, flat.dtype), lead).reshape(n)
    mu_flat = jnp.broadcast_to(jnp.asarray(mu, flat.dtype), lead).reshape(n)
    # One problem after another on CPU (a vmapped while_loop waits for its slowest
    # member, and pays every member's partial-SVT fallbacks); batched elsewhere.
    out = over_problems(one)(flat, lam_flat, mu_flat)
    out = jax.tree_util.tree_map(lambda x: x.reshape(lead + x.shape[1:]), out)
    return out._replace(low_rank=orient(out.low_rank, side), sparse=orient(out.sparse, side))


def decompose(blocks, *, lam=None, mu=None, side="left", tol=None, max_iter=None, svt="auto") -> Decomposition:
    r"""Low-rank plus block-sparse decomposition of stacked client updates.

    Exact program (``mu=None``), solved by inexact ALM:

    .. math:: \min_{L,C} \|L\|_* + λ \sum_k \|C_k\|_F \ \text{s.t.}\ L + C = M

    Penalised program (``mu`` a float, or ``"auto"`` for μ = σ̂(√p + √(Kq)) with σ̂
    estimated from the spectrum), solved by FISTA with continuation:

    .. math:: \min_{L,C} \tfrac12\|M − L − C\|_F^2 + μ(\|L\|_* + λ \sum_k \|C_k\|_F)

    where M = [Θ̂_1 … Θ̂_K] (``side="left"``; ``"right"`` stacks the transposes).

    Args:
        blocks: (..., K, p, q) floating array; leading axes are independent problems.
        lam: λ > 0, a scalar or an array of the leading shape. Default
            :data:`DEFAULT_LAMBDA` (``clair`` chooses λ from the data instead).
        mu: None (exact program), ``"auto"``, or μ > 0 in the units of ``blocks``.
        side: ``"left"`` (shared column space) or ``"right"`` (shared row space).
        tol: relative stopping tolerance (default 1e-9 in float64, 3e-6 in float32).
        max_iter: iteration cap (default 1000 exact, 3000 penalised).
        svt: how the solvers threshold singular values: ``"full"`` (a full SVD per
            iteration), ``"partial"`` (the certified, warm-started partial SVT of
            :mod:`clair_jax.linalg`, which falls back to the full SVD whenever it
            cannot certify its answer; where the budget covers the short side, the
            whole spectrum from the certified Gram eigendecomposition), or
            ``"auto"`` (the rank-k partial SVT where
            :func:`clair_jax.linalg.choose_svt_budget` measured that it pays, the
            Gram path elsewhere). All three agree to the solver tolerance.

    Returns:
        :class:`Decomposition`, in the layout of ``blocks``; check ``converged``.

    Example:
        >>> import clair_jax as cj
        >>> fed = cj.data.make_federation(0, num_clients=12, p=10, q=3, rank=2, noise=0.0)
        >>> dec = cj.decompose(fed.updates, lam=0.9)
        >>> bool(dec.converged), dec.block_norms.shape
        (True, (12,))
    """
    blocks = _checks.check_blocks(blocks, "blocks")
    _checks.check_side(side)
    lam = DEFAULT_LAMBDA if lam is None else _checks.check_positive(lam, "lam")
    mu = _checks.check_positive(mu, "mu", allow_none=True, allow=("auto",))
    tol = default_tolerance(blocks.dtype) if tol is None else float(_checks.check_positive(tol, "tol"))
    exact = mu is None
    max_iter = (1000 if exact else 3000) if max_iter is None else _checks.check_int(max_iter, "max_iter", low=1)

    auto_mu = isinstance(mu, str)
    k, p, q = _oriented_shape(blocks.shape, side)[-3:]
    svt_budget = linalg.choose_svt_budget((p, k * q), svt)
    return _decompose_jit(blocks, lam, 0.0 if (exact or auto_mu) else mu, side=side, exact=exact, auto_mu=auto_mu,
                          tol=tol, max_iter=max_iter, svt_budget=svt_budget)
