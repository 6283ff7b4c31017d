"""A λ path: one solver run up an ascending λ grid in a single ``lax.while_loop``.

A vmapped batch of independent solves would pay its slowest member's iterations
at every λ; the path pays each solve's own iterations, can warm-start each solve
from its neighbour, and can stop as soon as the caller has what it needs.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from clair_jax.solvers.alm import solve_alm
from clair_jax.solvers.apg import solve_penalized
from clair_jax.solvers.common import SolverOutput

__all__ = ["solve_path", "solve_penalized_path", "solve_alm_path", "solve_exact_path"]


def solve_path(solve: Callable, lams, *, until: Optional[Callable] = None, extra: int = 0) -> SolverOutput:
    """Run ``solve(lam, init)`` for each λ of an ascending grid, in one ``while_loop``.

    Args:
        solve: ``(λ, previous) → SolverOutput`` for one problem; ``previous`` is None
            for the first λ and the previous λ's output afterwards (its L̂ and partial-SVT
            subspace are warm starts).
        lams: (G,) λ values, ascending.
        until: optional ``SolverOutput → bool``; the path stops ``extra`` λ values
            after the first one where it holds. Entries not solved are zeros with
            ``iterations = 0`` and ``converged = False``.

    Returns:
        :class:`SolverOutput` with a leading (G,) axis.
    """
    num = lams.shape[0]
    first = solve(lams[0], None)
    hit = (lambda out: jnp.asarray(False)) if until is None else until
    buffer = jax.tree_util.tree_map(lambda a: jnp.zeros((num,) + a.shape, a.dtype).at[0].set(a), first)
    found = jnp.where(hit(first), 0, num)   # index of the first λ where ``until`` held

    def cond(state):
        i, _, found, _ = state
        return (i < num) & (i <= found + extra)

    def body(state):
        i, previous, found, buffer = state
        out = solve(lams[i], previous)
        found = jnp.where((found == num) & hit(out), i, found)
        buffer = jax.tree_util.tree_map(lambda b, a: b.at[i].set(a), buffer, out)
        return i + 1, out, found, buffer

    _, _, _, buffer = jax.lax.while_loop(cond, body, (jnp.asarray(1), first, found, buffer))
    return buffer


def solve_penalized_path(blocks, lams, mu, *, tol, max_iter, until=None, extra=0, **kwargs):
    """The penalised program along an ascending λ path, each solve warm-started.

    The first solve runs the μ continuation from L = 0; every later one starts from
    the previous λ's L̂ at the target μ (neighbouring λ have nearby optima).

    Args:
        blocks: (K, p, q), scaled to ‖M‖_2 ≈ 1.
        lams: (G,) λ values, ascending.
        mu: as :func:`~clair_jax.solvers.solve_penalized`.
        tol: as :func:`~clair_jax.solvers.solve_penalized`.
        max_iter: as :func:`~clair_jax.solvers.solve_penalized`, per λ.
        until: as :func:`solve_path`.
        extra: as :func:`solve_path`.
        **kwargs: as :func:`~clair_jax.solvers.solve_penalized`.
    """
    lams = jnp.asarray(lams, blocks.dtype)
    def solve(lam, previous):
        if previous is None:
            return solve_penalized(blocks, lam, mu, tol=tol, max_iter=max_iter, **kwargs)
        return solve_penalized(blocks, lam, mu, tol=tol, max_iter=max_iter, init=previous.low_rank,
                               svt_state=previous.svt_state, **kwargs)

    return solve_path(solve, lams, until=until, extra=extra)


def solve_alm_path(blocks, lams, mu, *, tol, max_iter, until=None, extra=0, **kwargs):
    """The exact (μ = 0) or penalised program along an ascending λ path, by ALM.

    Each ALM solve starts from L = C = 0 (its penalty parameter adapts, and it
    solves each λ in a few tens of iterations, where FISTA at a small μ needs
    hundreds); only the partial SVT's subspace is carried from one λ to the next.

    Args: as :func:`solve_penalized_path`; kwargs go to :func:`~clair_jax.solvers.solve_alm`.
    """
    lams = jnp.asarray(lams, blocks.dtype)

    def solve(lam, previous):
        state = None if previous is None else previous.svt_state
        return solve_alm(blocks, lam, mu, tol=tol, max_iter=max_iter, svt_state=state, **kwargs)

    return solve_path(solve, lams, until=until, extra=extra)


def solve_exact_path(blocks, lams, *, tol, max_iter, until=None, extra=0, **kwargs):
    """The exact program along an ascending λ path (:func:`solve_alm_path` with μ = 0)."""
    return solve_alm_path(blocks, lams, 0.0, tol=tol, max_iter=max_iter, until=until, extra=extra, **kwargs)
