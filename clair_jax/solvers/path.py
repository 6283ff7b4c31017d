"""A λ path: one solver run up an ascending λ grid in a single ``lax.while_loop``.

A vmapped batch of independent solves would pay its slowest member's iterations
at every λ; the path pays each solve's own iterations, can warm-start each solve
from its neighbour, and can stop as soon as the caller has what it needs.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from clair_jax import linalg
from clair_jax.prox import safe_frobenius_norm
from clair_jax.solvers.alm import solve_alm
from clair_jax.solvers.apg import solve_penalized
from clair_jax.solvers.common import SolverOutput, regularizer, start_subspace
from clair_jax.stack import to_stacked

__all__ = ["solve_path", "solve_penalized_path", "solve_alm_path", "solve_exact_path", "empty_low_rank_limit",
           "empty_low_rank_solution"]


def empty_low_rank_limit(blocks):
    r"""λ₀ such that for every λ ≤ λ₀ both programs are solved by L̂ = 0 (no iterations needed).

    λ₀ = 1/‖N‖_2 with N = [M_1/‖M_1‖_F … M_K/‖M_K‖_F] (zero blocks left out). With
    L = 0 the block part is C_k = M_k·max(0, 1 − μλ/‖M_k‖_F) (C = M for μ = 0), and
    (0, C) is optimal iff the residual's dual certificate holds, ‖R‖_2 ≤ 1 with
    R_k = M_k·min(1/μ, λ/‖M_k‖_F) (the subgradient of ‖·‖_* at 0 is the unit
    spectral ball). R = N·D with a diagonal D ≤ λ, so λ‖N‖_2 ≤ 1 suffices (and
    is exact for the exact program). Below λ₀ the scores are all 1 and L̂ has no
    rank: a λ path can start at λ₀ instead of iterating there.
    """
    norms = safe_frobenius_norm(blocks)
    unit = blocks / jnp.where(norms > 0, norms, 1.0)[:, None, None]
    top = linalg.spectral_norm(to_stacked(unit))
    return jnp.where(top > 0, 1.0 / jnp.where(top > 0, top, 1.0), jnp.inf)


def empty_low_rank_solution(blocks, lam, mu, template: SolverOutput) -> SolverOutput:
    """The closed-form solution for λ ≤ :func:`empty_low_rank_limit` (L̂ = 0), shaped like ``template``."""
    norms = safe_frobenius_norm(blocks)
    keep = jnp.maximum(1.0 - mu * lam / jnp.where(norms > 0, norms, 1.0), 0.0)
    sparse = blocks * jnp.where(norms > 0, keep, 0.0)[:, None, None]
    zero = jnp.zeros((), blocks.dtype)
    penalty = regularizer(jnp.zeros_like(template.singular_values), sparse, lam)
    return template._replace(
        low_rank=jnp.zeros_like(blocks), sparse=sparse, singular_values=jnp.zeros_like(template.singular_values),
        iterations=jnp.zeros_like(template.iterations), converged=jnp.asarray(True), primal_residual=zero,
        dual_residual=zero, svt_fallbacks=jnp.zeros_like(template.svt_fallbacks),
        objective=jnp.where(mu > 0, 0.5 * jnp.sum(jnp.square(blocks - sparse)) + mu * penalty, penalty))


def solve_path(solve: Callable, lams, *, until: Optional[Callable] = None, extra: int = 0, start=0,
               known: Optional[Callable] = None, initial: Optional[SolverOutput] = None) -> SolverOutput:
    """Run ``solve(lam, previous, settled)`` for each λ of an ascending grid, in one ``while_loop``.

    Args:
        solve: ``(λ, previous, settled) → SolverOutput`` for one problem; ``previous`` is
            None (or ``initial``) for the first λ and the previous λ's output afterwards (its L̂ and
            partial-SVT subspace are warm starts); ``settled`` (traced bool) says that
            ``until`` already held at a smaller λ (this solve is one of the ``extra``).
        lams: (G,) λ values, ascending.
        until: optional ``SolverOutput → bool``; the path stops ``extra`` λ values
            after the first one where it holds. Entries not solved are zeros with
            ``iterations = 0`` and ``converged = False``.
        start: index of the first λ to solve (may be traced; clamped to the grid).
        known: ``(λ, template) → SolverOutput``, the solution at each λ before ``start``,
            known in closed form (``template``: an output of ``solve``, for shapes).
        initial: optional ``previous`` for the first λ, shaped like ``solve``'s output.
            With it every λ, the first included, is solved by the loop's one copy of
            ``solve`` (traced and compiled once); without it the first solve gets
            ``previous=None`` and runs before the loop.

    Returns:
        :class:`SolverOutput` with a leading (G,) axis.
    """
    num = lams.shape[0]
    start = jnp.clip(jnp.asarray(start, jnp.int32), 0, num - 1)
    hit = (lambda out: jnp.asarray(False)) if until is None else until
    if initial is None:
        template = solve(lams[start], None, jnp.asarray(False))
        begin, found = start + 1, jnp.where(hit(template), start, num)   # found: the first λ where ``until`` held
    else:
        template, begin, found = initial, start, jnp.asarray(num)
    buffer = jax.tree_util.tree_map(lambda a: jnp.zeros((num,) + a.shape, a.dtype), template)
    if known is not None:
        before = jnp.arange(num) < start
        closed = jax.vmap(lambda lam: known(lam, template))(lams)
        buffer = jax.tree_util.tree_map(
            lambda b, c: jnp.where(before.reshape((num,) + (1,) * (b.ndim - 1)), c, b), buffer, closed)
    if initial is None:
        buffer = jax.tree_util.tree_map(lambda b, a: b.at[start].set(a), buffer, template)

    def cond(state):
        i, _, found, _ = state
        return (i < num) & (i <= found + extra)

    def body(state):
        i, previous, found, buffer = state
        out = solve(lams[i], previous, found < num)
        found = jnp.where((found == num) & hit(out), i, found)
        buffer = jax.tree_util.tree_map(lambda b, a: b.at[i].set(a), buffer, out)
        return i + 1, out, found, buffer

    _, _, _, buffer = jax.lax.while_loop(cond, body, (begin, template, found, buffer))
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
    def solve(lam, previous, settled):
        if previous is None:
            return solve_penalized(blocks, lam, mu, tol=tol, max_iter=max_iter, **kwargs)
        return solve_penalized(blocks, lam, mu, tol=tol, max_iter=max_iter, init=previous.low_rank,
                               svt_state=previous.svt_state, **kwargs)

    return solve_path(solve, lams, until=until, extra=extra)


def solve_alm_path(blocks, lams, mu, *, tol, max_iter, until=None, extra=0, skip_empty=True, extra_tol=None,
                   **kwargs):
    """The exact (μ = 0) or penalised program along an ascending λ path, by ALM.

    Each ALM solve starts from L = C = 0 (its penalty parameter adapts, and it
    solves each λ in a few tens of iterations, where FISTA at a small μ needs
    hundreds); only the partial SVT's subspace is carried from one λ to the next.
    With ``skip_empty`` the λ at or below :func:`empty_low_rank_limit` are not
    iterated: their solution (L̂ = 0) is written in closed form, with
    ``iterations = 0`` and ``converged = True``. ``extra_tol``: a looser tolerance
    for the ``extra`` solves after ``until`` first held (a caller that reads only
    their rank need not converge them fully).

    Args: as :func:`solve_penalized_path`; kwargs go to :func:`~clair_jax.solvers.solve_alm`.
    """
    lams = jnp.asarray(lams, blocks.dtype)
    mu = jnp.asarray(mu, blocks.dtype)

    def solve(lam, previous, settled):
        state = None if previous is None else previous.svt_state
        tol_now = tol if extra_tol is None else jnp.where(settled, max(tol, extra_tol), tol)
        return solve_alm(blocks, lam, mu, tol=tol_now, max_iter=max_iter, svt_state=state, **kwargs)

    # Every λ goes through the loop's one ALM (compiled once): the first starts from
    # the subspace a cold solve would use, in an otherwise empty "previous".
    shapes = jax.eval_shape(lambda: solve(lams[0], None, jnp.asarray(False)))
    initial = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)._replace(
        svt_state=start_subspace(None, (blocks.shape[-2], blocks.shape[0] * blocks.shape[-1]),
                                 kwargs.get("svt_budget"), blocks.dtype))
    if not skip_empty:
        return solve_path(solve, lams, until=until, extra=extra, initial=initial)
    start = jnp.sum(lams <= empty_low_rank_limit(blocks))
    return solve_path(solve, lams, until=until, extra=extra, start=start, initial=initial,
                      known=lambda lam, template: empty_low_rank_solution(blocks, lam, mu, template))


def solve_exact_path(blocks, lams, *, tol, max_iter, until=None, extra=0, **kwargs):
    """The exact program along an ascending λ path (:func:`solve_alm_path` with μ = 0)."""
    return solve_alm_path(blocks, lams, 0.0, tol=tol, max_iter=max_iter, until=until, extra=extra, **kwargs)
