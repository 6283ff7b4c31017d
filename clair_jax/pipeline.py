"""The CLAIR pipeline: stack → decompose → detect → subspace → refine → report.

:func:`clair` is the one entry point. Each problem (a layer, a LoRA module) is
handled by functions written for a single (K, p, q) stack and vmapped over the
leading axes; the client-level verdict then pools the evidence of all problems.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from clair_jax import _checks, detect, linalg, refine, sharding, tuning
from clair_jax.decompose import Decomposition, spectral_scale
from clair_jax.lora import LoRAFactors, reduce_factors
from clair_jax.prox import safe_frobenius_norm
from clair_jax.solvers import solve_alm_path
from clair_jax.solvers.common import default_tolerance
from clair_jax.stack import orient, to_stacked

__all__ = ["ClairResult", "clair", "NORM_CLIP", "STACK_NOISE_RATIO", "MAX_PASSES"]

#: Blocks larger than NORM_CLIP × the median client norm are scaled down to it
#: before the decomposition. Scaling a block keeps its column space, so the
#: low-rank + block-sparse structure is unchanged, but one huge update can no
#: longer dominate ‖M‖_2 and hide everyone else below the solver tolerance.
NORM_CLIP = 2.0

#: Another detection pass runs at the benign stack's noise level when the μ it
#: gives differs from the last pass's by more than this factor, up to MAX_PASSES
#: passes in all (see ``clair``).
STACK_NOISE_RATIO = 1.5
MAX_PASSES = 3


class ClairResult(NamedTuple):
    """What CLAIR found. ``...`` are the input's leading (layer / module) axes.

    Attributes:
        benign: (..., K) bool, the collaborative set of each problem.
        scores: (..., K) contamination scores ‖Ĉ_k‖_F/‖Θ̂_k‖_F in [0, 1].
        client_benign: (K,) bool verdict pooled over all problems (what the
            refinement uses when there are leading axes).
        client_scores: (K,) mean score over problems.
        client_z: (K,) mean refit statistic over problems (the pooled verdict
            flags a client whose mean exceeds ``z_crit``).
        residual_z: (..., K) refit statistic: off-subspace energy above the benign
            median, in robust standard deviations (0 when ``refit=False``).
        nonfinite: (K,) bool, clients whose update holds NaN/Inf (always flagged).
        subspace: (..., p, r_max) Û, orthonormal columns; columns ≥ ``rank`` are 0.
        rank: (...,) r̂; 0 where no shared direction was found (the benign updates of
            that problem are then returned unrefined, and a ``RuntimeWarning`` says so).
        refined: refined updates, the same kind as the input (array or LoRAFactors).
        decomposition: :class:`Decomposition` at the chosen λ (for LoRA input, of the
            reduced problem).
        lam: (...,) λ chosen. noise_level: (...,) σ̂ per entry, in the input's units.
        converged: (...,) bool, whether the chosen decomposition converged.
    """

    benign: jax.Array
    scores: jax.Array
    client_benign: jax.Array
    client_scores: jax.Array
    client_z: jax.Array
    residual_z: jax.Array
    nonfinite: jax.Array
    subspace: jax.Array
    rank: jax.Array
    refined: Union[jax.Array, LoRAFactors]
    decomposition: Decomposition
    lam: jax.Array
    noise_level: jax.Array
    converged: jax.Array

    def summary(self) -> str:
        """A short human-readable report."""
        flagged = np.flatnonzero(~np.asarray(self.client_benign))
        lines = [
            f"clients: {self.client_benign.shape[-1]}, flagged contaminated: {len(flagged)} {flagged.tolist()}",
            f"rank r̂: {np.unique(np.asarray(self.rank)).tolist()}, λ: {np.round(np.unique(np.asarray(self.lam)), 3).tolist()}",
            f"converged: {int(np.sum(self.converged))}/{np.size(self.converged)} problems",
        ]
        if np.any(np.asarray(self.rank) == 0):
            lines.append(f"no shared subspace (r̂ = 0) in {int(np.sum(np.asarray(self.rank) == 0))} problem(s): "
                         "benign updates there are left as they were")
        if np.any(self.nonfinite):
            lines.append(f"non-finite updates (excluded): {np.flatnonzero(np.asarray(self.nonfinite)).tolist()}")
        return "\n".join(lines)


# ----------------------------------------------------------------- one problem


def _equalise(blocks, usable):
    """Scale blocks above NORM_CLIP × median norm down to it (see NORM_CLIP)."""
    norms = safe_frobenius_norm(blocks)
    cap = NORM_CLIP * detect.masked_median(norms, usable)
    return jnp.where((norms > cap) & (cap > 0), cap / jnp.where(norms > 0, norms, 1.0), 1.0)


def _rel_floor(dtype):
    # Off-subspace energy below this share of a block's energy is rounding error.
    return 1e-10 if jnp.dtype(dtype) == jnp.float64 else 1e-5


def _mu_floor(dtype):
    # Below this μ (in units of ‖M‖_2) the noise is rounding error: the exact program
    # (μ = 0) is solved, and a second pass never runs for rounding-level differences.
    return 1e-4 if jnp.dtype(dtype) == jnp.float64 else 1e-3


class _Prepared(NamedTuple):
    """One problem made scale free: what both detection passes start from."""

    x: jax.Array        # (K, p, q) blocks, outliers equalised, divided by ``scale``
    scale: jax.Array    # ‖stack‖_2 after equalisation
    weights: jax.Array  # (K,) equalisation factors (1 for most clients)
    cols: jax.Array     # (K,) noise columns each block adds (tuning.effective_columns)
    sigma: jax.Array    # first noise estimate σ̂ (clients' median; the whole stack's for rank-deficient blocks), units of ``x``
    edge: jax.Array     # √p + √(noise columns): μ = σ·edge is the noise's spectral norm


def _prepare_one(blocks, usable, *, dims):
    p, _ = dims
    blocks = jnp.where(usable[:, None, None], blocks, 0.0)
    weights = _equalise(blocks, usable)
    x = blocks * weights[:, None, None]
    scale = spectral_scale(x)
    x = x / scale
    # One per-client SVD serves both per-client rules (block ranks are scale free).
    client_sv = jnp.linalg.svd(x, compute_uv=False)
    cols = tuning.effective_columns(x, dims, singular_values=client_sv)
    width = jnp.sum(jnp.where(usable, cols, 0)).astype(x.dtype)
    # Rank-deficient blocks (LoRA updates) each look noiseless on their own: their
    # noise shows only in the stack, whose median singular value contamination
    # barely moves (it adds a minority of columns at the top of the spectrum).
    rank_deficient = 2 * detect.masked_median(cols, usable) < min(dims)
    stack_sv = jnp.linalg.svd(to_stacked(x), compute_uv=False)
    sigma = jnp.where(rank_deficient, refine.select_rank(stack_sv, usable, *dims, columns=cols)[1],
                      tuning.noise_level(x, usable, dims=dims, singular_values=client_sv))
    return _Prepared(x, scale, weights, cols, sigma, float(np.sqrt(p)) + jnp.sqrt(width))


@functools.partial(jax.jit, static_argnames=("dims",))
def _prepare_all(blocks, usable, *, dims):
    return jax.vmap(functools.partial(_prepare_one, dims=dims))(blocks, usable)


def _detect_one(prep, blocks, usable, lams, mu, threshold, *, tol, max_iter, min_gap, refit, rank, z_crit,
                dims, svt_budget=None):
    """Decompose one (K, p, q) problem on a λ grid and keep the clearest split.

    ``mu`` is in units of ``prep.x`` (0: the exact program, for noiseless data).
    ``dims`` is the dense (p, q): for an exact LoRA reduction every data-driven
    rule is evaluated as on the dense blocks, so factors and dense input agree.
    """
    p, q = dims
    x, scale, weights, cols = prep.x, prep.scale, prep.weights, prep.cols
    blocks = jnp.where(usable[:, None, None], blocks, 0.0)

    # The smallest λ (the grid ascends) whose scores split cleanly while L̂ keeps
    # some rank: below the window everything is pushed into C and no clean split
    # exists; above it contaminated blocks are absorbed into L one after another,
    # so the first clean split is the one that flags the most of them. A benign
    # client flagged there is recovered by the refit test. With no split anywhere,
    # the grid's middle (no contamination found).
    def split_at(sol):
        score = detect.block_scores(sol.sparse, x, usable)
        split = detect.split_scores(score, usable, min_gap)
        return score, split, (split.gap > 0) & (sol.singular_values[0] > 0)

    # One ALM path up the grid, stopped one λ after the first clean split (the rank
    # cap below reads that next λ too).
    sols = solve_alm_path(x, lams, mu, tol=tol, max_iter=max_iter, spectral_norm=1.0, svt_budget=svt_budget,
                          until=lambda sol: split_at(sol)[2], extra=1)
    scores, splits, clean = jax.vmap(split_at)(sols)
    valid = (sols.iterations > 0) & clean  # the path's unsolved tail is zeros
    best = jnp.where(jnp.any(valid), jnp.argmax(valid), lams.shape[0] // 2)
    pick = lambda a: a[best]  # noqa: E731
    sol = jax.tree_util.tree_map(pick, sols)
    score = scores[best]
    # rank(L̂) at the chosen λ caps r̂: SVT at the noise level has removed the
    # noise, and contamination sits in Ĉ, so a contaminated client that slips
    # into the set cannot add its own directions to the subspace.
    # Taken at the chosen λ and the next one up: at the smallest clean λ a weak
    # benign direction may still be shrunk away.
    ranks_l = jnp.sum(sols.singular_values > 0, axis=-1)
    rank_cap = jnp.maximum(ranks_l[best], ranks_l[jnp.minimum(best + 1, lams.shape[0] - 1)]).astype(jnp.int32)
    benign = splits.benign[best] if threshold is None else usable & (score <= threshold)
    if refit:
        rank_fn = (lambda sv, b: jnp.minimum(refine.select_rank(sv, b, p, q, columns=cols)[0], rank_cap)) if rank is None else (lambda sv, b: jnp.asarray(rank))
        test = detect.residual_test(blocks, benign, usable, rank_fn, z_crit=z_crit, rel_floor=_rel_floor(x.dtype), rounds=3,
                                    dims=dims, columns=cols)
        benign, z = test.benign, test.z
    else:
        z = jnp.zeros_like(score)
    unweight = (scale / weights)[:, None, None]
    # The exact program's objective is homogeneous of degree 1, the penalised one's of degree 2.
    dec = Decomposition(
        low_rank=sol.low_rank * unweight,
        sparse=sol.sparse * unweight,
        block_norms=safe_frobenius_norm(sol.sparse * unweight),
        singular_values=sol.singular_values * scale,
        iterations=sol.iterations,
        converged=sol.converged,
        objective=sol.objective * jnp.where(mu > 0, scale**2, scale),
        primal_residual=sol.primal_residual,
        dual_residual=sol.dual_residual,
        lam=lams[best],
        mu=mu * scale,
    )
    # Noise level of the benign stack itself (see ``clair``: further passes); a
    # refit that settled has already computed its spectrum.
    spectrum = lambda: refine.benign_spectrum(blocks, benign)[1]  # noqa: E731
    if refit:
        spectrum_now = jax.lax.cond(test.stable, lambda: test.spectrum, spectrum)
    else:
        spectrum_now = spectrum()
    sigma_stack = refine.select_rank(spectrum_now, benign, p, q, columns=cols)[1]
    return benign, score, z, dec, rank_cap, sigma_stack / scale


@functools.partial(jax.jit, static_argnames=("tol", "max_iter", "min_gap", "has_threshold", "refit", "rank",
                                             "z_crit", "dims", "svt_budget"))
def _detect_all(prep, blocks, usable, lams, mu, threshold, *, tol, max_iter, min_gap, has_threshold,
                refit, rank, z_crit, dims, svt_budget=None):
    fn = lambda pr, b, u, m: _detect_one(  # noqa: E731
        pr, b, u, lams, m, threshold if has_threshold else None,
        tol=tol, max_iter=max_iter, min_gap=min_gap, refit=refit, rank=rank, z_crit=z_crit, dims=dims,
        svt_budget=svt_budget,
    )
    # One problem after another on CPU: a vmapped path would pay its slowest member's
    # iterations (and every member's SVT fallbacks) at every step.
    return sharding.over_problems(fn)(prep, blocks, usable, mu)


@functools.partial(jax.jit, static_argnames=("rank", "margin", "dims"))
def _spectrum_all(blocks, benign, rank_cap, columns, *, rank, margin, dims):
    def one(b, s, cap, cols):
        u, sv = refine.benign_spectrum(b, s)
        r = jnp.minimum(refine.select_rank(sv, s, *dims, margin, columns=cols)[0], cap) if rank is None else jnp.asarray(rank)
        r = jnp.minimum(r, jnp.sum(sv > 0))
        if rank is None:  # a user-given rank is taken as is
            return refine.shared_basis(u, r, b, s)
        return refine.subspace(u, r), r.astype(jnp.int32)

    return jax.vmap(one)(blocks, benign, rank_cap, columns)


# ------------------------------------------------------------------ public API


def _check_updates(updates):
    if isinstance(updates, LoRAFactors):
        b = _checks.as_float_array(updates.B, "updates.B", min_ndim=3)
        a = _checks.as_float_array(updates.A, "updates.A", min_ndim=3)
        if b.shape[:-2] != a.shape[:-2]:
            raise ValueError(f"updates.B and updates.A must share leading (…, K) axes, got {b.shape} and {a.shape}")
        if b.shape[-1] != a.shape[-2]:
            raise ValueError(f"LoRA rank mismatch: updates.B is (…, p, {b.shape[-1]}) but updates.A is (…, {a.shape[-2]}, q)")
        if b.dtype != a.dtype:
            raise TypeError(f"updates.B and updates.A must have the same dtype, got {b.dtype} and {a.dtype}")
        if b.shape[-3] < 2:
            raise ValueError(f"updates must hold at least 2 clients (axis -3), got K = {b.shape[-3]}")
        return LoRAFactors(b, a)
    return _checks.check_blocks(updates, "updates")


def clair(
    updates,
    *,
    rank: int | None = None,
    lam=None,
    noise="auto",
    side: str = "left",
    threshold: float | None = None,
    tol: float | None = None,
    max_iter: int = 3000,
    min_gap: float = detect.MIN_GAP,
    refit: bool = True,
    z_crit: float = 5.0,
    svt: str = "auto",
) -> ClairResult:
    r"""Find the contaminated clients and refine every benign client's update.

    Steps, per problem (leading axes are layers/modules, solved in one vmapped call):

    1. clients whose update holds NaN/Inf are flagged and zeroed; blocks far above
       the median norm are scaled down (their column space is kept);
    2. the penalised decomposition ½‖M − L − C‖² + μ(‖L‖_* + λΣ‖C_k‖_F) is solved for
       a grid of λ at μ = σ̂(√p + √n), σ̂ the robust noise level of
       :func:`clair_jax.tuning.noise_level` and n the stack's noise columns
       (Kq for full-rank blocks, Σ rank_k for LoRA updates); where μ is negligible
       (noiseless data) the exact program min ‖L‖_* + λΣ‖C_k‖_F s.t. L + C = M
       is solved instead; for rank-deficient updates (LoRA) σ̂ is read off the
       whole stack; while the benign stack's own noise level gives a μ more than
       1.5× away, steps 2–3 run again at that level (at most 3 passes);
    3. scores s_k = ‖Ĉ_k‖_F/‖Θ̂_k‖_F; the λ whose scores split most clearly (widest
       gap leaving a benign majority) gives a first collaborative set, which a
       refit test of each client's off-subspace energy then confirms or corrects;
    4. the client-level verdict: benign in most problems, a mean score that does
       not split off from the others, and a mean refit z at most ``z_crit``;
    5. Û = leading r̂ left singular vectors of the stacked benign updates, r̂ from
       the noise edge of their spectrum, at most rank(L̂), and only directions
       shared by several clients; Θ̃_k = Û Ûᵀ Θ̂_k for benign k.

    Args:
        updates: (..., K, p, q) array of client updates, or :class:`LoRAFactors`
            with B (..., K, p, r) and A (..., K, r, q) (reduced exactly, never densified).
        rank: r̂; default chosen from the spectrum.
        lam: λ; default chosen from a grid by the block scores. A float fixes it.
        noise: ``"auto"`` (estimate σ) or σ ≥ 0, the per-entry noise std in the
            input's units (0 means noiseless).
        side: ``"left"`` shares the column space (span of the B's), ``"right"`` the row space.
        threshold: fixed score threshold τ (Ŝ = {s_k ≤ τ}); default: widest gap.
        tol: solver tolerance (default by dtype). max_iter: solver iteration cap.
        min_gap: smallest score gap read as contamination (see :mod:`clair_jax.detect`).
        refit: after the score split, re-test every client by its off-subspace
            energy against the benign population (:func:`clair_jax.detect.residual_test`).
        z_crit: how many robust standard deviations above the benign median the
            refit test allows.
        svt: ``"auto"`` (default), ``"full"`` or ``"partial"``: the solvers' singular-value
            thresholding, as in :func:`clair_jax.decompose` (all agree to the solver tolerance;
            ``"auto"`` takes the rank-k partial SVT for stacks with a short side ≥ 64,
            the whole spectrum from the Gram matrix below that).

    Returns:
        :class:`ClairResult`.

    Example:
        >>> import clair_jax as cj
        >>> fed = cj.data.make_federation(0, num_clients=20, p=16, q=8, rank=2, contamination=0.25)
        >>> res = cj.clair(fed.updates)
        >>> bool((res.benign == fed.benign).all())
        True
    """
    updates = _check_updates(updates)
    _checks.check_side(side)
    rank = _checks.check_int(rank, "rank", low=1, allow_none=True)
    if lam is not None:
        _checks.check_positive(lam, "lam")
    if not (isinstance(noise, str) and noise == "auto"):
        if isinstance(noise, str):
            raise ValueError(f"noise must be 'auto' or a number >= 0, got {noise!r}")
        if not np.isfinite(noise) or noise < 0:
            raise ValueError(f"noise must be 'auto' or a finite number >= 0, got {noise}")
    if threshold is not None and not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1] (scores are shares of an update), got {threshold}")
    max_iter = _checks.check_int(max_iter, "max_iter", low=1)
    min_gap = float(min_gap)
    if not 0 < min_gap < 1:
        raise ValueError(f"min_gap must be in (0, 1), got {min_gap}")
    _checks.check_positive(z_crit, "z_crit")

    factored = isinstance(updates, LoRAFactors)
    if factored:
        oriented = updates if side == "left" else updates.transpose()
        b, a = oriented.B, oriented.A
        dtype, lead = b.dtype, b.shape[:-3]
        k = b.shape[-3]
        b_flat = b.reshape((-1,) + b.shape[-3:])
        a_flat = a.reshape((-1,) + a.shape[-3:])
        usable = jnp.all(jnp.isfinite(b_flat), axis=(-2, -1)) & jnp.all(jnp.isfinite(a_flat), axis=(-2, -1))
        b_flat = jnp.where(usable[..., None, None], b_flat, 0.0)
        a_flat = jnp.where(usable[..., None, None], a_flat, 0.0)
        reduced = jax.jit(jax.vmap(reduce_factors))(b_flat, a_flat)
        blocks = reduced.blocks
    else:
        oriented = orient(updates, side)
        dtype, lead = oriented.dtype, oriented.shape[:-3]
        k = oriented.shape[-3]
        blocks = oriented.reshape((-1,) + oriented.shape[-3:])
        usable = jnp.all(jnp.isfinite(blocks), axis=(-2, -1))
        blocks = jnp.where(usable[..., None, None], blocks, 0.0)
    n_problems = blocks.shape[0]
    # The dense block shape: every data-driven rule is evaluated for it.
    dims = (b.shape[-2], a.shape[-1]) if factored else tuple(blocks.shape[-2:])
    p, q = dims

    if tol is None:
        tol = default_tolerance(dtype)
    lams = jnp.asarray(tuning.lambda_grid(k, p, q) if lam is None else [lam], dtype)
    prep = _prepare_all(blocks, usable, dims=dims)
    has_sigma = not isinstance(noise, str)
    # σ in units of each problem's scaled stack, and μ = σ·(noise edge).
    sigma_n = jnp.asarray(noise, dtype) / prep.scale if has_sigma else prep.sigma
    # Noise below the rounding floor is no noise: the exact program (μ = 0).
    floor = _mu_floor(dtype)
    mu_of = lambda s: jnp.where(s * prep.edge < floor, 0.0, s * prep.edge)  # noqa: E731
    detect_all = functools.partial(  # mu → one detection pass over all problems
        _detect_all, prep, blocks, usable, lams, threshold=jnp.asarray(threshold or 0.0, dtype),
        tol=float(tol), max_iter=max_iter, min_gap=min_gap, has_threshold=threshold is not None,
        refit=refit and threshold is None, rank=rank, z_crit=float(z_crit), dims=dims,
        # A LoRA stack's L̂ has about the adapters' rank: budget the partial SVT for it.
        svt_budget=linalg.choose_svt_budget((blocks.shape[-2], k * blocks.shape[-1]), svt,
                                            expected_rank=b.shape[-1] if factored else None),
    )
    mu = mu_of(sigma_n)
    benign, scores, z, dec, rank_cap, sigma_stack = detect_all(mu)
    # Further passes while the benign stack's noise level is far from the one used:
    # much noisier than the per-client estimate said (heterogeneous clients), or,
    # for rank-deficient updates estimated from the whole stack, contamination that
    # did move its median (then the first verdict was read at the wrong μ). Each
    # pass re-reads σ̂ from the benign stack of the previous verdict. Noiseless
    # low-rank data settle at once: their benign stack has no bulk, and μ below the
    # rounding floor is 0 on both sides.
    for _ in range(MAX_PASSES - 1 if not has_sigma else 0):
        mu_stack = mu_of(sigma_stack)
        again = (mu_stack > STACK_NOISE_RATIO * mu) | (mu > STACK_NOISE_RATIO * mu_stack)
        if not bool(jnp.any(again)):
            break
        sigma_n = jnp.where(again, sigma_stack, sigma_n)
        mu = mu_of(sigma_n)
        benign, scores, z, dec, rank_cap, sigma_stack = detect_all(mu)
    sigma_hat = sigma_n * prep.scale
    cols = prep.cols

    # Client-level verdict, two kinds of evidence: flagged in most problems, or a
    # mean score over problems that splits off from the rest (contamination
    # confined to a few modules, e.g. only the value projections, shows there).
    client_usable = jnp.all(usable, axis=0)
    client_scores = jnp.mean(scores, axis=0)
    by_vote = 2 * jnp.sum(benign, axis=0) > n_problems
    # Refit evidence pooled over problems: mean z above z_crit is contamination
    # even when no single problem is sure (weak, consistent excess energy).
    client_z = jnp.mean(z, axis=0)
    by_z = client_z <= z_crit
    if threshold is not None:
        by_score = client_scores <= threshold
    else:
        by_score = detect.split_scores(client_scores, client_usable, min_gap).benign
    # One problem has nothing to pool: its own verdict (refit included) is the client's.
    client_benign = client_usable & by_vote & by_score & by_z if n_problems > 1 else benign[0]
    used = jnp.broadcast_to(client_benign, benign.shape)

    u, ranks = _spectrum_all(blocks, used, rank_cap, cols, rank=rank, margin=1.2, dims=dims)
    r_max = max(int(jnp.max(ranks)), 1)
    basis = u[..., :r_max]  # kept columns come first, the rest are zero
    # r̂ = 0 means no shared direction was found: projecting would zero every benign
    # update, so there the benign clients keep their own (local) update.
    no_subspace = ranks == 0
    if bool(jnp.any(no_subspace)):
        warnings.warn(f"clair: no shared subspace found (r̂ = 0) in {int(jnp.sum(no_subspace))} of {n_problems} "
                      "problem(s); their benign clients keep their local updates", RuntimeWarning, stacklevel=2)
    used = used & ~no_subspace[:, None]

    if factored:
        full_basis = jnp.einsum("npd,ndr->npr", reduced.basis, basis)
        proj_b = jnp.einsum("npr,nkpl->nkrl", full_basis, b_flat)
        refined_b = jnp.where(used[..., None, None], jnp.einsum("npr,nkrl->nkpl", full_basis, proj_b), b_flat)
        refined = LoRAFactors(refined_b.reshape(b.shape), a_flat.reshape(a.shape))
        if side == "right":
            refined = refined.transpose()
        subspace_out = full_basis
    else:
        refined = jax.vmap(refine.project)(basis, blocks, used)
        refined = orient(refined.reshape(oriented.shape), side)
        subspace_out = basis

    reshape = lambda x: x.reshape(lead + x.shape[1:])  # noqa: E731
    dec = jax.tree_util.tree_map(reshape, dec)
    if not factored:
        dec = dec._replace(low_rank=orient(dec.low_rank, side), sparse=orient(dec.sparse, side))
    return ClairResult(
        benign=reshape(benign),
        scores=reshape(scores),
        client_benign=client_benign,
        client_scores=client_scores,
        client_z=client_z,
        residual_z=reshape(z),
        nonfinite=~client_usable,
        subspace=reshape(subspace_out),
        rank=reshape(ranks),
        refined=refined,
        decomposition=dec,
        lam=dec.lam,
        noise_level=reshape(sigma_hat),
        converged=dec.converged,
    )
