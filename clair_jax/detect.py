"""Stage 4 of the pipeline: name the contaminated clients.

The score of client k is the share of its update that the decomposition could
not explain by the shared low-rank part, s_k = ‖Ĉ_k‖_F / ‖Θ̂_k‖_F ∈ [0, 1]. Benign
blocks have Ĉ_k = 0 (exactly in the noiseless program, up to noise otherwise);
contaminated blocks keep a large share.

The collaborative set Ŝ = {k : s_k ≤ τ}. With no τ given, τ is put in the widest
gap of the sorted scores that leaves a benign majority; a gap narrower than
``min_gap`` means "no contamination" (every score is in one cluster). Across a λ
grid the λ whose scores split most clearly wins.

The pieces this stage shares with the refinement live below it: robust
statistics in :mod:`clair_jax.robust`, the stack's SVD, rank and shared
directions in :mod:`clair_jax.basis`, and the refit test in
:mod:`clair_jax.refit`; their public names are re-exported here.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clair_jax import linalg, sharding, tuning
from clair_jax._compile import host_lanes, in_lanes, program
from clair_jax.basis import SUBSPACE_CLIP, select_rank, stack_svd
from clair_jax.decompose import Decomposition
from clair_jax.prox import safe_frobenius_norm, singular_values
from clair_jax.refit import ENTRY_CLIP, HEAVY_TAIL_RATIO, ResidualTest, residual_test
from clair_jax.robust import (COPY_TOL, ENERGY_CAP, SIZE_SPREAD, masked_median, repeated, robust_units,
                              scaled_norms,
                              size_exponent)
from clair_jax.robust import rounding_floor as _rel_floor
from clair_jax.solvers import solve_alm_path
from clair_jax.stack import release_freed_memory, to_stacked

__all__ = ["block_scores", "Split", "split_scores", "collaborative_set", "masked_median", "MIN_GAP",
           "residual_test", "Detection", "until_settled", "concatenate", "NORM_CLIP", "STACK_NOISE_RATIO", "MAX_PASSES",
           "scaled_norms", "robust_units", "SUBSPACE_CLIP", "ENERGY_CAP", "ENTRY_CLIP", "HEAVY_TAIL_RATIO", "COPY_TOL", "repeated",
           "SCREEN_TOL", "RANK_TOL", "size_exponent", "SIZE_SPREAD", "ResidualTest", "REFIT_ROUNDS"]

#: Smallest score gap read as a real split. Benign scores spread in small steps
#: (a K-sized sample of one distribution); a contaminated cluster sits a clear
#: step above them.
MIN_GAP = 0.1



def block_scores(sparse, blocks, usable):
    """s_k = ‖Ĉ_k‖_F/‖Θ̂_k‖_F; clients that are not ``usable`` (non-finite) score 1."""
    norms = safe_frobenius_norm(blocks)
    score = safe_frobenius_norm(sparse) / jnp.where(norms > 0, norms, 1.0)
    return jnp.where(usable & (norms > 0), jnp.clip(score, 0.0, 1.0), 1.0)


class Split(NamedTuple):
    benign: jax.Array      # (K,) bool
    threshold: jax.Array   # τ used
    gap: jax.Array         # width of the gap τ sits in (0 if no split)


def split_scores(scores, usable, min_gap=MIN_GAP):
    """Widest-gap split of one (K,) score vector, keeping a benign majority.

    Clients that are not ``usable`` are contaminated regardless and do not vote.
    """
    k = scores.shape[-1]
    s = jnp.where(usable, scores, jnp.inf)
    ordered = jnp.sort(s)
    n_usable = jnp.sum(usable)
    gaps = ordered[1:] - ordered[:-1]              # gap after the (i+1)-th smallest
    idx = jnp.arange(k - 1)
    # Benign majority: at least half of the usable clients stay on the low side;
    # gaps into the +inf padding are not gaps.
    valid = (2 * (idx + 1) >= n_usable) & (idx + 1 < n_usable)
    gaps = jnp.where(valid, gaps, -jnp.inf)
    best = jnp.argmax(gaps)
    gap = jnp.maximum(gaps[best], 0.0)
    split = gap >= min_gap
    threshold = jnp.where(split, 0.5 * (ordered[best] + ordered[jnp.minimum(best + 1, k - 1)]), jnp.inf)
    return Split(benign=usable & (scores <= threshold), threshold=threshold, gap=jnp.where(split, gap, 0.0))


def collaborative_set(scores, usable=None, threshold=None, min_gap=MIN_GAP):
    """Ŝ for one (K,) score vector: fixed ``threshold`` if given, else the widest-gap rule.

    Example:
        >>> import jax.numpy as jnp, clair_jax as cj
        >>> cj.detect.collaborative_set(jnp.array([0.0, 0.01, 0.0, 0.9, 0.02]))
        Array([ True,  True,  True, False,  True], dtype=bool)
    """
    usable = jnp.ones(scores.shape, bool) if usable is None else usable
    if threshold is not None:
        return usable & (scores <= threshold)
    return split_scores(scores, usable, min_gap).benign


# --------------------------------------------- the stage: every problem, all passes

#: The λ path is a screen: its solutions enter the verdict only through the
#: block scores (read across a gap of at least MIN_GAP) and rank(L̂). It is
#: solved to this relative tolerance by default (float32; float64: 1e-7), where
#: the scores are within 5e-3 of a 3e-6 solve and rank(L̂) is the same (one 7B
#: LoRA module at 0–5 % noise) in 25–75 % of the iterations.
SCREEN_TOL = 1e-4

#: The λ after the chosen one is solved only for rank(L̂) (the rank cap): to this
#: relative tolerance, where rank(L̂) has settled (the 7B LoRA benchmark at 0–20 %
#: noise: the same rank as at the default tolerance, in 40–60 % of the iterations).
RANK_TOL = 1e-3

#: Blocks larger than NORM_CLIP × the median client norm are scaled down to it
#: before the decomposition. Scaling a block keeps its column space, so the
#: low-rank + block-sparse structure is unchanged, but one huge update can no
#: longer dominate ‖M‖_2 and hide everyone else below the solver tolerance.
NORM_CLIP = 2.0

#: Another detection pass runs at the benign stack's noise level when the μ it
#: gives differs from the last pass's by more than this factor, up to MAX_PASSES
#: passes in all (see :func:`until_settled`).
STACK_NOISE_RATIO = 1.5
MAX_PASSES = 3

#: How many problems (modules) one detection program vmaps together, by backend
#: (``sharding.over_problems(..., "chunks", batch=B)``; a backend not listed vmaps
#: every problem at once). CPU: 1, one after another: vmapped chunks of 7B modules
#: cost 1.2–1.4× the CPU time per module (a vmapped ``while_loop`` selects its whole
#: carry at every step; benchmarks/investigations/problem_batch.py).
PROBLEM_BATCH = {"cpu": 1}

#: On the CPU, :func:`until_settled` cuts the problems into this many chunks per lane
#: (``_compile.host_lanes``: one program per core runs at once), so that lanes whose
#: chunks finish early take the next one; with fewer than two problems a chunk, one lane.
CHUNKS_PER_LANE = 4

#: The refit test runs at most this many rounds per pass, each on the previous
#: round's set; a round that keeps its set ends it (:func:`residual_test`).
REFIT_ROUNDS = 3


def _platform(x):
    """The platform ``x`` lives on (the default backend's for a numpy array)."""
    devices = getattr(x, "devices", None)
    return next(iter(devices())).platform if callable(devices) else jax.default_backend()


def _screen_tolerance(dtype):
    # The λ path's default tolerance (see SCREEN_TOL).
    return 1e-7 if jnp.dtype(dtype) == jnp.float64 else SCREEN_TOL


def _mu_floor(dtype):
    # Below this μ (in units of ‖M‖_2) the noise is rounding error: the exact program
    # (μ = 0) is solved, and a second pass never runs for rounding-level differences.
    return 1e-7 if jnp.dtype(dtype) == jnp.float64 else 1e-5


class _Prepared(NamedTuple):
    """One problem made scale free: what every detection pass starts from."""

    x: jax.Array        # (K, d, w) blocks, outliers equalised, divided by ``scale``
    scale: jax.Array    # ‖stack‖_2 after equalisation
    weights: jax.Array  # (K,) equalisation factors (1 for most clients)
    cols: jax.Array     # (K,) noise columns each block adds (tuning.effective_columns)
    sigma: jax.Array    # first noise estimate σ̂ (clients' median; the whole stack's for rank-deficient blocks), units of ``x``
    edge: jax.Array     # √p + √(noise columns): μ = σ·edge is the noise's spectral norm


def _equalise(blocks, usable):
    """Scale blocks above NORM_CLIP × median norm down to it (see NORM_CLIP); overflow safe."""
    norms = scaled_norms(blocks)
    cap = NORM_CLIP * masked_median(norms, usable)
    return jnp.where((norms > cap) & (cap > 0), cap / jnp.where(norms > 0, norms, 1.0), 1.0)


def _prepare_one(blocks, usable, *, dims):
    p, _ = dims
    weights = _equalise(blocks, usable)
    x = blocks * weights[:, None, None]
    # The stack's singular values give both ‖stack‖_2 (the scale) and the stack's
    # noise level (divided by |entry| max first: nothing overflows or underflows).
    peak = jnp.max(jnp.abs(x))
    peak = jnp.where(peak > 0, peak, 1.0)
    stack_sv = singular_values(to_stacked(x / peak)) * peak
    scale = jnp.where(stack_sv[0] > 0, stack_sv[0], 1.0)
    x, stack_sv = x / scale, stack_sv / scale
    # One per-client SVD serves both per-client rules (block ranks are scale free).
    client_sv = singular_values(x)
    cols = tuning.effective_columns(x, dims, singular_values=client_sv)
    width = jnp.sum(jnp.where(usable, cols, 0)).astype(x.dtype)
    # Rank-deficient blocks (LoRA updates) each look noiseless on their own: their
    # noise shows only in the stack, whose median singular value contamination
    # barely moves (it adds a minority of columns at the top of the spectrum).
    rank_deficient = 2 * masked_median(cols, usable) < min(dims)
    sigma = jnp.where(rank_deficient, select_rank(stack_sv, usable, *dims, columns=cols)[1],
                      tuning.noise_level(x, usable, dims=dims, singular_values=client_sv))
    return _Prepared(x, scale, weights, cols, sigma, float(np.sqrt(p)) + jnp.sqrt(width))


@program(static_argnames=("dims",))
def _prepare_all(blocks, usable, *, dims):
    return jax.vmap(functools.partial(_prepare_one, dims=dims))(blocks, usable)


class _Static(NamedTuple):
    """The hashable part of one detection pass (a jit static argument)."""

    tol: float
    max_iter: int
    svt_budget: object
    min_gap: float
    has_threshold: bool
    refit: bool
    rank: object
    z_crit: float
    dims: tuple
    carry_width: int = 0         # singular vectors of the final set's SVD handed to the refinement
    batch: int = 1               # problems vmapped together (sharding.over_problems "chunks"); 1: one by one


class _Pass(NamedTuple):
    """One detection pass over one problem."""

    benign: jax.Array         # (K,) collaborative set
    scores: jax.Array         # (K,) ‖Ĉ_k‖/‖Θ̂_k‖ at the chosen λ
    z: jax.Array              # (K,) refit statistic (0 without refit)
    decomposition: Decomposition
    rank_cap: jax.Array       # rank(L̂) near the chosen λ: r̂ never exceeds it
    sigma_stack: jax.Array    # noise level of the benign stack, units of the prepared problem
    copies: jax.Array         # (K,) updates that repeat a lower-numbered client's
    svd: object               # basis.StackSVD of the final set (the refinement reuses it)


def _pass_one(prep, blocks, usable, lams, mu, threshold, static):
    """Decompose one (K, p, q) problem on a λ grid and keep the clearest split.

    ``mu`` is in units of ``prep.x`` (0: the exact program, for noiseless data).
    ``static.dims`` is the dense (p, q): for an exact LoRA reduction every
    data-driven rule is evaluated as on the dense blocks, so factors and dense
    input agree.
    """
    p, q = static.dims
    x, scale, weights, cols = prep.x, prep.scale, prep.weights, prep.cols

    # The smallest λ (the grid ascends) whose scores split cleanly while L̂ keeps
    # some rank: below the window everything is pushed into C and no clean split
    # exists; above it contaminated blocks are absorbed into L one after another,
    # so the first clean split is the one that flags the most of them. A benign
    # client flagged there is recovered by the refit test. With no split anywhere,
    # the grid's middle (no contamination found).
    def split_at(sol):
        score = block_scores(sol.sparse, x, usable)
        split = split_scores(score, usable, static.min_gap)
        return score, split, (split.gap > 0) & (sol.singular_values[0] > 0)

    # One ALM path up the grid, stopped one λ after the first clean split (the rank
    # cap below reads that next λ too).
    sols = solve_alm_path(x, lams, mu, tol=static.tol, max_iter=static.max_iter, spectral_norm=1.0,
                          svt_budget=static.svt_budget, until=lambda sol: split_at(sol)[2], extra=1,
                          extra_tol=RANK_TOL)
    scores, splits, clean = jax.vmap(split_at)(sols)
    valid = (sols.iterations > 0) & clean  # the path's unsolved tail is zeros
    best = jnp.where(jnp.any(valid), jnp.argmax(valid), lams.shape[0] // 2)
    sol = jax.tree_util.tree_map(lambda a: a[best], sols)
    score = scores[best]
    # rank(L̂) at the chosen λ caps r̂: SVT at the noise level has removed the
    # noise, and contamination sits in Ĉ, so a contaminated client that slips
    # into the set cannot add its own directions to the subspace. Taken at the
    # chosen λ and the next one up: at the smallest clean λ a weak benign
    # direction may still be shrunk away.
    ranks_l = jnp.sum(sols.singular_values > 0, axis=-1)
    rank_cap = jnp.maximum(ranks_l[best], ranks_l[jnp.minimum(best + 1, lams.shape[0] - 1)]).astype(jnp.int32)
    benign = usable & (score <= threshold) if static.has_threshold else splits.benign[best]
    # A repeated update counts once: its copies never enter the set.
    copies = repeated(x, usable)
    benign = benign & ~copies
    if static.refit:
        def rank_fn(sv, current):
            if static.rank is not None:
                return jnp.asarray(static.rank)
            return jnp.minimum(select_rank(sv, current, p, q, columns=cols)[0], rank_cap)

        test = residual_test(blocks, benign, usable & ~copies, rank_fn, z_crit=static.z_crit,
                             rel_floor=_rel_floor(x.dtype), rounds=REFIT_ROUNDS, dims=static.dims, columns=cols,
                             carry_width=static.carry_width)
        benign, z = test.benign, test.z
        # A refit that settled has already computed its set's SVD.
        svd = jax.lax.cond(test.stable, lambda: test.svd,
                           lambda: stack_svd(blocks, benign, test.svd.u.shape[-1]))
    else:
        z = jnp.zeros_like(score)
        svd = stack_svd(blocks, benign, static.carry_width)
    spectrum = svd.s * svd.peak
    unweight = (scale / weights)[:, None, None]
    # The exact program's objective is homogeneous of degree 1, the penalised one's of degree 2.
    # Norms are taken in the solver's units and scaled after (‖c·C_k‖ = |c|‖C_k‖): squaring
    # entries of a 1e30-scaled input would overflow where the norm itself does not.
    block_norms = safe_frobenius_norm(sol.sparse) * (scale / weights)
    objective = sol.objective * jnp.where(mu > 0, scale**2, scale)
    dec = Decomposition(
        low_rank=sol.low_rank * unweight,
        sparse=sol.sparse * unweight,
        block_norms=block_norms,
        singular_values=sol.singular_values * scale,
        iterations=sol.iterations,
        # A non-finite intermediate or reported number is never reported as converged (the
        # penalised objective grows with scale²: past ≈ 1e19 it overflows float32).
        converged=sol.converged & jnp.all(jnp.isfinite(sol.low_rank)) & jnp.all(jnp.isfinite(sol.sparse))
        & jnp.isfinite(sol.objective) & jnp.all(jnp.isfinite(z)) & jnp.isfinite(objective)
        & jnp.all(jnp.isfinite(block_norms)),
        objective=objective,
        primal_residual=sol.primal_residual,
        dual_residual=sol.dual_residual,
        lam=lams[best],
        mu=mu * scale,
    )
    sigma_stack = select_rank(spectrum, benign, p, q, columns=cols)[1]
    return _Pass(benign, score, z, dec, rank_cap, sigma_stack / scale, copies, svd)


@program(static_argnames=("static",))
def _pass_all(prep, blocks, usable, lams, mu, threshold, *, static):
    def one(pr, b, u, m):
        return _pass_one(pr, b, u, lams, m, threshold, static)

    # Chunks of ``static.batch`` problems, each chunk one vmapped program (see PROBLEM_BATCH).
    return sharding.over_problems(one, "chunks", batch=static.batch)(prep, blocks, usable, mu)


class Detection(NamedTuple):
    """Stage 4's answer for a batch of n problems of K clients (see :func:`until_settled`).

    Attributes:
        benign: (n, K) collaborative set of each problem.
        scores: (n, K) contamination scores ‖Ĉ_k‖_F/‖Θ̂_k‖_F.
        z: (n, K) refit statistic (off-subspace energy in robust standard deviations).
        usable: (n, K) the client's update is finite.
        decomposition: :class:`~clair_jax.Decomposition` at the chosen λ, per problem.
        rank_cap: (n,) rank(L̂) near the chosen λ; r̂ never exceeds it.
        noise_level: (n,) σ̂ per entry, in the input's units.
        columns: (n, K) noise columns each block adds.
        passes: how many detection passes ran.
        copies: (n, K) updates that repeat a lower-numbered client's (:func:`repeated`).
        svd: :class:`clair_jax.refine.StackSVD` of each problem's final set, its
            leading singular vectors only (the refinement reuses it).
    """

    benign: jax.Array
    scores: jax.Array
    z: jax.Array
    usable: jax.Array
    decomposition: Decomposition
    rank_cap: jax.Array
    noise_level: jax.Array
    columns: jax.Array
    passes: int
    copies: jax.Array
    svd: object = None


def until_settled(problems, options) -> Detection:
    """Stage 4 over a batch of problems: detection passes until the noise level settles.

    Each pass solves the λ grid of :func:`clair_jax.tuning.lambda_grid` as one ALM
    path per problem at μ = σ̂(√p + √n) (the exact program, μ = 0, where μ is
    below a rounding floor), keeps the first clean score split and confirms it
    with :func:`residual_test`. Another pass runs while the benign stack's own
    noise level gives a μ more than :data:`STACK_NOISE_RATIO` away from the one
    used (heterogeneous clients; for rank-deficient updates, contamination that
    moved the stack's median), at most :data:`MAX_PASSES` in all. Noiseless
    low-rank data settle at once.

    Args:
        problems: :class:`clair_jax.stack.Problems`.
        options: :class:`clair_jax.options.ClairOptions`.
    """
    n = problems.blocks.shape[0]
    lanes, width = _lane_plan(n, _platform(problems.blocks))
    if lanes == 1:
        return _settle(problems, options)
    # On the CPU, chunks of problems settle in lanes (one program per core at once; the
    # passes of one chunk never wait for another's). More chunks than lanes even out
    # problems whose paths take longer; equal chunks (the last padded by repeating its
    # last problem) share one compiled program.
    starts = range(0, n, width)

    def chunk(start):
        blocks, usable = sharding.take_problems((problems.blocks, problems.usable), start, width, pad="repeat")
        return _settle(problems._replace(blocks=blocks, usable=usable), options)

    # Joined before the chunks' memory is handed back (the join runs asynchronously).
    out = jax.block_until_ready(concatenate(in_lanes(chunk, starts, lanes), n))
    release_freed_memory()
    return out


def _lora_rank(problems):
    return problems.factors.B.shape[-1] if problems.factored else None


def _setup(shape, dtype, dims, lora_rank, platform, options):
    """The λ grid, the fixed threshold and the static part of a pass over problems of ``shape``."""
    n, k = shape[0], shape[1]
    p, q = dims
    lams = np.asarray(tuning.lambda_grid(k, p, q) if options.lam is None else [options.lam], dtype)   # host: no compilation
    tol = _screen_tolerance(dtype) if options.tol is None else options.tol
    stacked = (shape[-2], k * shape[-1])
    # A LoRA stack's L̂ has about the adapters' rank: budget the partial SVT for it.
    budget = linalg.choose_svt_budget(stacked, options.svt, expected_rank=lora_rank)
    static = _Static(
        tol=float(tol), max_iter=options.max_iter, min_gap=options.min_gap,
        has_threshold=options.threshold is not None, refit=options.refit and options.threshold is None,
        rank=options.rank, z_crit=float(options.z_crit), dims=dims, svt_budget=budget,
        carry_width=carry_width(budget, stacked),
        batch=max(1, min(n, PROBLEM_BATCH.get(platform, n))),
    )
    return lams, np.asarray(options.threshold or 0.0, dtype), static


def carry_width(budget, stacked):
    """How many singular vectors of the final set's SVD the detection hands to the refinement
    for a ``stacked`` (m, n) problem: rank(L̂), which caps r̂, rarely exceeds a partial SVT's
    ``budget``, so that many (none without a partial SVT)."""
    return budget if budget is not None and budget < min(stacked) else 0


def _lane_plan(n, platform):
    """(lanes, problems per chunk) for n problems: lanes only where every chunk holds at least
    two problems (for a few small problems the lanes' extra dispatch and joins cost more)."""
    lanes = host_lanes(platform)
    if lanes == 1 or n < 2 * CHUNKS_PER_LANE * lanes:
        return 1, n
    return lanes, -(-n // (CHUNKS_PER_LANE * lanes))


def compile_ahead(shape, dtype, dims, lora_rank, options) -> None:
    """Compile the detection's programs for ``n`` problems of (K, d, w) blocks, ``shape``
    = (n, K, d, w), before the problems exist (the pipeline does it while stage 2
    reduces LoRA factors). A call with such problems then compiles nothing.
    """
    platform = jax.default_backend()
    shape = (_lane_plan(shape[0], platform)[1],) + tuple(shape[1:])
    lams, threshold, static = _setup(shape, dtype, dims, lora_rank, platform, options)
    blocks = jax.ShapeDtypeStruct(shape, dtype)
    usable = jax.ShapeDtypeStruct(shape[:2], jnp.bool_)
    _prepare_all.lower(blocks, usable, dims=dims).compile()
    prep = jax.eval_shape(functools.partial(_prepare_all, dims=dims), blocks, usable)
    mu = jax.ShapeDtypeStruct(shape[:1], dtype)
    _pass_all.lower(prep, blocks, usable, lams, mu, threshold, static=static).compile()


def _settle(problems, options) -> Detection:
    """:func:`until_settled` on one batch of problems, in one program per pass."""
    blocks, usable, dims = problems.blocks, problems.usable, problems.dims
    dtype = blocks.dtype
    lams, threshold, static = _setup(blocks.shape, dtype, dims, _lora_rank(problems), _platform(blocks), options)
    prep = _prepare_all(blocks, usable, dims=dims)
    estimated = options.noise is None
    # The pass control runs on the host, in numpy: n numbers per pass.
    np_dtype = np.dtype(dtype)
    scale, edge = np.asarray(prep.scale), np.asarray(prep.edge)
    # σ in units of each problem's scaled stack, and μ = σ·(noise edge).
    sigma = np.asarray(prep.sigma) if estimated else (np.asarray(options.noise, np_dtype) / scale).astype(np_dtype)
    floor = _mu_floor(dtype)

    def mu_of(s):  # noise below the rounding floor is no noise: the exact program (μ = 0)
        return np.where(s * edge < floor, 0.0, s * edge).astype(np_dtype)

    def run(mu):
        return _pass_all(prep, blocks, usable, lams, mu, threshold, static=static)

    mu = mu_of(sigma)
    out, passes = run(mu), 1
    # Each further pass re-reads σ̂ from the benign stack of the previous verdict.
    while estimated and passes < MAX_PASSES:
        sigma_stack = np.asarray(out.sigma_stack)
        mu_stack = mu_of(sigma_stack)
        again = (mu_stack > STACK_NOISE_RATIO * mu) | (mu > STACK_NOISE_RATIO * mu_stack)
        if not again.any():
            break
        sigma = np.where(again, sigma_stack, sigma).astype(np_dtype)
        mu = mu_of(sigma)
        del out   # a pass's decompositions are the size of the stacks: never two alive at once
        out, passes = run(mu), passes + 1
    return Detection(out.benign, out.scores, out.z, usable, out.decomposition, out.rank_cap,
                     jnp.asarray(sigma * scale), prep.cols, passes, out.copies, out.svd)


def concatenate(parts, size, device=None) -> Detection:
    """Detections of consecutive chunks of problems → the first ``size`` in one, on ``device``."""
    arrays = sharding.join_problems([d._replace(passes=None) for d in parts], size, device)
    return arrays._replace(passes=max(d.passes for d in parts))
