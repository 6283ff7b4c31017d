"""Stages 5–6: the shared subspace from the benign clients, then refined updates.

Û = leading r̂ left singular vectors of the stacked benign blocks [Θ̂_k : k ∈ Ŝ]
(pooling every benign client is where the averaging gain comes from), and each
benign client gets Θ̃_k = Û Ûᵀ Θ̂_k: its error off the subspace is removed, its
own coefficients inside the subspace are kept. Contaminated clients keep Θ̂_k,
except those whose update looks like an honest one under heavier noise
(:func:`noise_like`), which are projected too.

:func:`partial_pool` goes one step further inside the subspace: each benign
client's coordinates V_k = ÛᵀΘ̂_k are shrunk toward their robust centre V̄ by an
empirical-Bayes factor Λ_k, so homogeneous clients pool their estimation noise
away (FedAvg-like) and heterogeneous ones keep their own coordinates.

The stage's parts live in modules of their own, below it, and their public
names are re-exported here: the shared basis and rank in
:mod:`clair_jax.basis`, partial pooling in :mod:`clair_jax.shrinkage`, and the
local share, noisy and crowded fallbacks in :mod:`clair_jax.fallbacks`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clair_jax import stack
from clair_jax._compile import program
from clair_jax.basis import (DECISIVE_Z, MAJORITY_MAX_RANK, MAJORITY_SLACK, OWN_NOISE, OWN_SHARE, RANK_MARGIN,
                             StackSVD, basis_coefficients, benign_spectrum, capped, heavy_tails_clipped, majority_basis,
                             project, select_rank, shared_basis, stack_svd, subspace)
from clair_jax.fallbacks import (BULK_PASSES, CROWDED_SHARE, LOCAL_SLACK, NOISY_FLAT, NOISY_Z, bulk_shrinkage, crowded,
                                 local_share, noise_like)
from clair_jax.lora import LoRAFactors, lift
from clair_jax.robust import rounding_floor
from clair_jax.shrinkage import CENTRE_PASSES, CENTRE_Z, HUBER, POOLING, centre_cut, partial_pool, pool_members

__all__ = ["centre_cut", "pool_members", "capped", "benign_spectrum", "StackSVD", "stack_svd", "select_rank", "shared_basis",
           "majority_basis", "subspace", "project", "local_share", "crowded", "CROWDED_SHARE", "bulk_shrinkage",
           "BULK_PASSES", "partial_pool", "POOLING",
           "Refinement", "refine", "noise_like", "reported_noise", "DECISIVE_Z", "MAJORITY_MAX_RANK", "MAJORITY_SLACK",
           "CENTRE_Z", "CENTRE_PASSES", "NOISY_FLAT", "NOISY_Z", "RANK_MARGIN", "OWN_SHARE", "OWN_NOISE", "LOCAL_SLACK",
           "HUBER", "WIDTH_STEP"]


class Refinement(NamedTuple):
    """Stage 6's answer for a batch of n problems.

    Attributes:
        subspace: (n, p, r_max) Û in the user's (dense, oriented) space; columns ≥ rank are 0.
        rank: (n,) r̂; 0 where no shared direction was found.
        refined: (n, K, p, q) blocks, or flat oriented :class:`~clair_jax.LoRAFactors`.
        used: (n, K) clients whose update was refined.
        shrinkage: (n, K, r_max) Λ of :func:`partial_pool` (1: the client's own
            coordinates, 0: the benign centre's; all 1 without pooling).
        local_share: (n, K) α_k, the share of its off-subspace part a refined client
            kept (:func:`local_share`; 0 = plain projection, 1 = its local update).
        noisy: (n, K) flagged clients refined anyway, by projection: their update
            looks like an honest one under heavier noise (:func:`noise_like`). They
            were left out of Û.
        crowded: (n,) problems where r̂ reached :data:`CROWDED_SHARE` of the stack's
            short side with σ̂ estimated (:func:`crowded`): dense blocks there read
            σ̂ and r̂ from the spectrum's bulk and weigh Û's directions by optimal
            shrinkage (:func:`bulk_shrinkage`); where that bulk would be under half
            the spectrum, and for LoRA factors, every refined client kept its whole
            off-subspace part (α = 1).
        outlying: (n, K) clients of the verdict's benign set whose coordinates inside
            Û the pooling model could not explain given the noise they reported
            (:func:`pool_members`): left out of Û and of the pooled centre, they keep
            their update. All False without ``coordinate_noise``.
    """

    subspace: jax.Array
    rank: jax.Array
    refined: object
    used: jax.Array
    shrinkage: jax.Array
    local_share: jax.Array
    noisy: jax.Array
    crowded: jax.Array
    outlying: jax.Array



#: Û's widths are static arguments of stage 6's programs, read from the data (the cap
#: on r̂, the largest r̂); they are rounded up to a multiple of WIDTH_STEP (at most the
#: stack's short side) so that r̂ = 1 … 8 share one compiled program.
WIDTH_STEP = 8


def _bucket_width(width, cap):
    """``width`` rounded up to a multiple of :data:`WIDTH_STEP`, at most ``cap`` (never below ``width``).

    Stage 6's bases have their r̂ kept columns first and zeros after, and every step
    reads the zero columns as absent (they add exact zeros to each sum): padding a
    basis changes no number beyond rounding, and a run whose r̂ moves between calls
    (a Flower run's rounds) compiles once.
    """
    return max(int(width), min(WIDTH_STEP * -(-int(width) // WIDTH_STEP), int(cap)))


def refine(problems, detection, client_benign, *, rank=None, margin=RANK_MARGIN, pooling="none",
           noise_given=False, coordinate_noise=None) -> Refinement:
    """Stage 6: Û from the benign clients' stacked updates, then Θ̃_k = Û Ûᵀ Θ̂_k + α_k(I − Û Ûᵀ)Θ̂_k.

    r̂ is the number of singular values of the benign stack above the noise edge
    ``margin``·σ̂(√p + √n) (:func:`select_rank`), at most rank(L̂) near the
    chosen λ, counting only directions shared by several clients
    (:func:`shared_basis`) and carried by a majority of them
    (:func:`majority_basis`); a given ``rank`` is taken as is. Where r̂ = 0 no
    shared direction exists and the benign clients keep their own update.

    Never worse than local: α_k (:func:`local_share`) is 0 where client k's
    off-subspace part is what noise at σ̂ leaves (the plain projection) and
    grows toward 1 where the client clearly carries signal outside Û, so a
    benign client never loses signal its own update carries for lack of
    evidence of a shared direction. Where r̂ and σ̂ are both read from the
    spectrum and r̂ reaches a fifth of the stack's short side (:func:`crowded`),
    the median singular value σ̂ is read from may be signal (``crowded``): dense
    blocks read σ̂ and r̂ again from the spectrum's bulk past r̂ and refine by
    Θ̃_k = Σ_j w_j û_j û_jᵀ Θ̂_k + α_k(I − ÛÛᵀ)Θ̂_k, each direction weighed by
    how far it stands above the noise (:func:`bulk_shrinkage`); where that bulk
    would be under half of the spectrum (structured noise read as signal), and
    for LoRA factors, α_k = 1: every refined client keeps its whole off-subspace
    part. A client flagged decisively in one problem
    (refit z > :data:`DECISIVE_Z`) is left out of that problem's Û; on noiseless data the refined update of a
    benign client is its own update. ``local_share`` reports α per problem and client.

    A flagged client whose update looks like an honest one under heavier noise
    (a flat residual spectrum and the shared signal inside Û, :func:`noise_like`)
    gets Θ̃_k = Û Ûᵀ Θ̂_k too; it stays flagged and out of Û (``noisy``).
    Other contaminated clients keep their update.

    For LoRA input Û = Q Ũ maps the reduced problem's basis back, and
    B̃_k = Û Ûᵀ B_k + α_k(I − Û Ûᵀ)B_k (A_k unchanged), so no dense ΔW is formed.

    Args:
        problems: :class:`clair_jax.stack.Problems`.
        detection: :class:`clair_jax.detect.Detection` (its rank caps and noise columns).
        client_benign: (K,) the pooled client verdict.
        pooling: ``"none"``: Θ̃_k = Û Ûᵀ Θ̂_k; ``"auto"`` / ``"full"``: partial / full
            pooling of the coordinates inside Û (:func:`partial_pool`, with the
            detection's σ̂ and noise columns). Dense input only: LoRA factors keep
            the projection (a pooled update would not have the client's LoRA shape).
        noise_given: σ̂ is the caller's noise level, not an estimate (no ``crowded`` fallback).
        coordinate_noise: optional callable, Û (the user's leading axes, p, r_max) → ν
            (leading axes, K, r_max): each client's noise along each direction of Û
            (:func:`partial_pool`), asked once Û is known; used with ``pooling="auto"``,
            except in ``crowded`` problems (where Λ = 1). Benign clients whose coordinates
            the pooling model cannot explain with it (:func:`pool_members`) are set aside
            (``outlying``: they keep their update), Û is fitted again without them and the
            callable is asked again for the new Û.
    """
    # r̂ ≤ rank(L̂) near the chosen λ (or the given rank): no basis needs more columns.
    most = int(rank) if rank is not None else int(np.max(np.asarray(detection.rank_cap)))
    limit = min(problems.blocks.shape[-2], problems.num_clients * problems.blocks.shape[-1])
    most = max(1, min(most, limit))
    # Û's widths are static arguments read from the data: bucketed (zero columns), so that
    # calls whose r̂ differs (a Flower run's rounds) share compiled programs. The detection's
    # SVD keeps serving where it holds the unbucketed width.
    held = 0 if detection.svd is None else detection.svd.u.shape[-1]
    most = _bucket_width(most, held if most <= held else limit)

    # Dense blocks: Û and the evidence off it are read from blocks whose heavy-tailed
    # residual entries are clipped (:func:`heavy_tails_clipped`); the clients' own
    # blocks are what gets projected. (A LoRA reduction's coordinates mix entries.)
    evidence, heavy = problems.blocks, np.zeros(problems.blocks.shape[0], bool)   # (host: no compilation)
    if not problems.factored:
        evidence, heavy = _heavy_tails(problems.blocks, client_benign, detection.benign, detection.z,
                                       detection.rank_cap, detection.columns, detection.svd, dims=problems.dims,
                                       width=most)

    def fit(members):
        """Û, r̂, Û's coefficients on the blocks, the refined set, Û's width, crowded problems and σ."""
        basis, ranks, coefficients, used = _bases(evidence, members, detection.benign, detection.z,
                                                  detection.rank_cap, detection.columns, detection.svd, heavy,
                                                  rank=rank, margin=margin, dims=problems.dims, width=most)
        # Kept columns come first, the rest are zero.
        width = _bucket_width(max(int(np.max(np.asarray(ranks))), 1), most)
        # A σ̂ that may hold shared signal removes nothing off Û: with σ = 0, α_k = 1 (LoRA
        # factors, whose reduced coordinates carry coloured noise) ...
        unsure, sigma, shrunk, weights = _unsure(ranks, used, detection.columns, detection.noise_level,
                                                 p=problems.dims[0], check=rank is None and not noise_given,
                                                 width=width)
        if not problems.factored and bool(jnp.any(unsure)):
            # ... while dense blocks read σ̂ and r̂ again from the spectrum's bulk and shrink Û's
            # directions by how far each stands above the noise (:func:`bulk_shrinkage`).
            u, w, bulk_rank, bulk_sigma = _bulk_shrinkage(evidence, members, detection.benign, detection.z,
                                                          detection.columns, dims=problems.dims)
            shrunk = unsure & (bulk_rank > 0)
            top = int(np.max(np.asarray(jnp.where(shrunk, bulk_rank, 1))))
            width = max(width, _bucket_width(top, limit))
            keep = jnp.arange(width) < bulk_rank[:, None]
            basis = jnp.where(shrunk[:, None, None], jnp.where(keep[:, None, :], _columns(u, width), 0.0),
                              _columns(basis, width))
            weights = jnp.where(shrunk[:, None], jnp.where(keep, _columns(w, width), 0.0), 1.0)
            ranks = jnp.where(shrunk, bulk_rank, ranks).astype(ranks.dtype)
            sigma = jnp.where(shrunk, bulk_sigma, sigma)
        return basis, ranks, coefficients, used, width, unsure, sigma, (shrunk, weights)

    basis, ranks, coefficients, used, width, unsure, sigma, shrink = fit(client_benign)
    if problems.factored:
        # Host (numpy) factors are refined a chunk of modules at a time, into a numpy B̃.
        full_basis, refined_b, share, ones, noisy = stack.map_chunks(
            functools.partial(_refine_factors, p=problems.dims[0], width=width),
            (coefficients, problems.right, basis, ranks, problems.blocks, problems.factors.B, problems.usable, used,
             sigma, detection.columns), host_out=(1,))
        a = problems.factors.A
        if not np.all(np.asarray(problems.usable)):   # non-finite clients are returned zeroed, as stage 2 reads them
            a = jnp.where(problems.usable[..., None, None], a, 0.0)
        return Refinement(full_basis, ranks, LoRAFactors(refined_b, a), used, ones, share, noisy, unsure,
                          jnp.zeros(used.shape, bool))
    reported, outlying = None, jnp.zeros(used.shape, bool)
    if coordinate_noise is not None:
        reported = reported_noise(coordinate_noise, problems, basis[..., :width])
        # With the clients' own noise along Û the pooling model is calibrated: a client
        # whose coordinates it cannot explain (another task inside Û, invisible to the
        # detection) is kept out of Û too, and Û, r̂ and the noise are read again without it.
        members = _members(basis[..., :width], problems.blocks, used, detection.noise_level, detection.columns,
                           reported)
        outlying = used & ~members
        if bool(jnp.any(outlying)):
            basis, ranks, coefficients, used, width, unsure, sigma, shrink = fit(members)
            reported = reported_noise(coordinate_noise, problems, basis[..., :width])
        # Where σ̂ may hold shared signal Û may miss directions: no pooling there.
        reported = jnp.where(unsure[:, None, None], 0.0, reported)
    return _refine_blocks(basis, ranks, problems.blocks, evidence, problems.usable, used, sigma, detection.columns,
                          reported, outlying, *shrink, p=problems.dims[0], pooling=pooling,
                          width=width)._replace(crowded=unsure)


@program(static_argnames=("p", "check", "width"))
def _unsure(ranks, used, columns, noise_level, *, p, check, width):
    """Problems whose σ̂ may hold shared signal (:func:`crowded`, where σ̂ was estimated: ``check``),
    σ for the refinement (0 there), and no shrinkage of Û yet (flags, unit weights)."""
    unsure = crowded(ranks, used, columns, p) & check
    return (unsure, jnp.where(unsure, 0.0, noise_level), jnp.zeros(ranks.shape, bool),
            jnp.ones(ranks.shape + (width,), noise_level.dtype))


def _columns(x, width):
    """x's first ``width`` entries of its last axis, zero-padded where it has fewer."""
    x = x[..., :width]
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])


@program(static_argnames=("dims",))
def _bulk_shrinkage(blocks, client_benign, benign, z, columns, *, dims):
    """Per problem: the fitted set's U (every column), the shrinkage weights, r̂ (the
    weights above 0) and σ̂, read from the bulk (:func:`bulk_shrinkage`)."""
    def one(args):
        x, used, cols = args
        svd = stack_svd(x, used)
        n = jnp.sum(jnp.where(used, cols, 0))
        sigma, weights = bulk_shrinkage(svd.s * svd.peak, dims[0], n)
        rank = jnp.sum(weights > 0).astype(jnp.int32)
        # The bulk is a noise spectrum only while it is at least half of the stack's short
        # side; past that (structured noise read as signal) the problem keeps the fallback.
        return svd.u, weights, jnp.where(2 * rank < jnp.minimum(dims[0], n), rank, 0), sigma

    return jax.lax.map(one, (blocks, _fitted_set(client_benign, benign, z), columns))


@program
def _members(basis, blocks, used, noise_level, columns, reported):
    return jax.vmap(lambda b, x, u, s, c, nu: pool_members(b, x, u, s, c, coordinate_noise=nu))(
        basis, blocks, used, noise_level, columns, reported)


def reported_noise(coordinate_noise, problems, basis):
    """Ask ``coordinate_noise`` for ν given Û (n, p, r) and check its answer → (n, K, r)."""
    k, r = problems.num_clients, basis.shape[-1]
    answer = coordinate_noise(problems.unflatten(basis))
    try:
        nu = np.asarray(answer, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"coordinate_noise must return an array of shape {problems.lead + (k, r)}, "
                        f"got {type(answer).__name__}") from err
    if nu.shape != problems.lead + (k, r):
        raise ValueError(f"coordinate_noise must return shape {problems.lead + (k, r)} (leading axes, K clients, "
                         f"the {r} columns of Û it was given), got {nu.shape}")
    bad = ~(np.isfinite(nu) & (nu >= 0))
    if bad.any():
        client = int(np.argwhere(bad)[0][-2])
        raise ValueError(f"coordinate_noise must be finite and >= 0 (a variance), got {nu[bad].ravel()[0]!r} "
                         f"for client {client}")
    return jnp.asarray(nu.reshape((-1, k, r)), problems.blocks.dtype)


def _refine_b(b, used, basis, share):
    """B̃_k = ÛÛᵀB_k + α_k(I − ÛÛᵀ)B_k for one problem (Û: (p, m) in the dense space);
    clients outside ``used`` keep B_k."""
    projected = basis @ jnp.einsum("pm,kpl->kml", basis, b)
    mixed = projected + share[:, None, None] * (b - projected)
    return jnp.where(used[:, None, None], mixed, b)


@program(static_argnames=("p", "width"))
def _refine_factors(coefficients, right, basis, ranks, blocks, factors_b, usable, used, noise_level, columns, *, p,
                    width):
    """LoRA input: B̃_k = ÛÛᵀB_k + α_k(I − ÛÛᵀ)B_k with Û = QŨ (lifted without Q); A_k unchanged."""
    basis, coefficients = basis[..., :width], coefficients[..., :width]
    share = jnp.where(used, jax.vmap(lambda *a: local_share(*a[:5], p=p, used=a[5]))(
        basis, blocks, ranks, noise_level, columns, used), 0.0)
    # LoRA's estimation noise lives in the trained factor B_k: judge noise-likeness on
    # Qᵀ B_k = X_k (A_k R_k)⁺, where isotropic noise in B stays isotropic (in X_k it is
    # coloured by A_k's singular values, which no flatness test should read as structure).
    whitened = jnp.einsum("nkdr,nkrs->nkds", blocks, jnp.linalg.pinv(right))
    noisy = _noisy(basis, whitened, ranks, columns, usable, used, p)

    def one(args):
        coef, rt, b, ok, u, r, sh = args
        b = jnp.where(ok[:, None, None], b, 0.0)   # non-finite clients zeroed, as stage 2 reads them
        full_basis = jnp.where(r > 0, lift(coef, b, rt), 0.0)
        return full_basis, _refine_b(b, u, full_basis, sh)

    # One module at a time: the (K, p, r) intermediates of a whole model would not fit.
    full_basis, refined_b = jax.lax.map(one, (coefficients, right, factors_b, usable, used | noisy, ranks, share))
    return full_basis, refined_b, share, jnp.ones(used.shape + (width,), basis.dtype), noisy


def _noisy(basis, blocks, ranks, columns, usable, used, p):
    """(n, K) flagged clients refined by projection (:func:`noise_like`)."""
    like = jax.vmap(functools.partial(noise_like, p=p))(basis, blocks, ranks, columns)
    return like & usable & ~used & (ranks > 0)[:, None]


@program(static_argnames=("p", "pooling", "width"))
def _refine_blocks(basis, ranks, blocks, evidence, usable, used, noise_level, columns, reported, outlying, shrunk,
                   weights, *, p, pooling, width):
    """Dense input: the (partially pooled) projection plus α_k of each client's off-subspace part
    (α_k read from ``evidence``, the blocks Û was fitted to); in ``shrunk`` problems the
    projection weighs Û's directions by ``weights`` (:func:`bulk_shrinkage`), unpooled."""
    basis = basis[..., :width]
    share = jnp.where(used, jax.vmap(lambda *a: local_share(*a[:5], p=p, used=a[5]))(
        basis, evidence, ranks, noise_level, columns, used), 0.0)
    refined, shrinkage = jax.vmap(lambda *a: partial_pool(*a[:5], pooling=pooling, coordinate_noise=a[5]))(
        basis, blocks, used, noise_level, columns, reported)
    scaled = basis * jnp.sqrt(weights[..., :width])[:, None, :]
    weighted = jnp.einsum("npr,nkrq->nkpq", scaled, jnp.einsum("npr,nkpq->nkrq", scaled, blocks))
    refined = jnp.where((shrunk[:, None] & used)[..., None, None], weighted, refined)
    # The off-subspace part each client keeps (α_k; 0 outside ``used``).
    projected = jnp.einsum("npr,nkrq->nkpq", basis, jnp.einsum("npr,nkpq->nkrq", basis, blocks))
    noisy = _noisy(basis, blocks, ranks, columns, usable, used, p) & ~outlying
    refined = jnp.where(noisy[..., None, None], projected, refined + share[..., None, None] * (blocks - projected))
    return Refinement(basis, ranks, refined, used, shrinkage, share, noisy, jnp.zeros(ranks.shape, bool), outlying)


# --------------------------------------------- the stage: every problem at once


def _pilot_svd(blocks, used, carried, width=None):
    """The set's :class:`StackSVD` (at least ``width`` vectors): the detection's where it
    is of the same set and holds them, else computed."""
    if carried is None or (width is not None and carried.u.shape[-1] < width):
        return stack_svd(blocks, used, width)
    return jax.lax.cond(jnp.all(carried.members == used), lambda: carried,
                        lambda: stack_svd(blocks, used, carried.u.shape[-1]))


def _fitted_set(client_benign, benign, z):
    """The clients Û is fitted on: the pooled benign set less those a problem flagged
    decisively (refit z above DECISIVE_Z): they stay out of that problem's Û, still refined."""
    used = jnp.broadcast_to(client_benign, benign.shape)
    return used & (benign | (z <= DECISIVE_Z))


@program(static_argnames=("dims", "width"))
def _heavy_tails(blocks, client_benign, benign, z, rank_cap, columns, carried, *, dims, width):
    """(blocks with heavy-tailed residual entries clipped, heavy-tailed) per problem."""
    def one(args):
        x, used, cap, cols, svd = args
        svd = _pilot_svd(x, used, svd, width)
        def rank_of(sv):
            return jnp.minimum(select_rank(sv, used, *dims, columns=cols)[0], cap)

        return heavy_tails_clipped(x, used, svd.u, rank_of(svd.s * svd.peak), rank_of)

    return jax.lax.map(one, (blocks, _fitted_set(client_benign, benign, z), rank_cap, columns, carried))


def _basis_one(blocks, used, rank_cap, columns, carried, *, rank, margin, dims, width):
    """Û (its first ``width`` columns) and r̂ of one problem from the clients in ``used``,
    and Û's coefficients Z_k on the blocks (Û = Σ_k Θ̂_k Z_k: what a LoRA reduction lifts by).

    ``carried``: the detection's :class:`StackSVD` (None: computed here); used as is
    when it is of the same set, as it is whenever the pooled verdict keeps the refit's.
    """
    svd = _pilot_svd(blocks, used, carried)
    sv = svd.s * svd.peak
    if rank is not None:  # a user-given rank is taken as is
        r = jnp.minimum(jnp.asarray(rank), jnp.sum(sv > 0))
        basis, r = subspace(svd.u, r), r.astype(jnp.int32)
    else:
        r = jnp.minimum(select_rank(sv, used, *dims, margin, columns=columns)[0], rank_cap)
        basis, r = shared_basis(svd.u, jnp.minimum(r, jnp.sum(sv > 0)), blocks, used, spectrum=svd.s)
    basis = basis[:, :width]
    return basis, r, basis_coefficients(basis, svd)


@program(static_argnames=("rank", "margin", "dims", "width"))
def _bases(blocks, client_benign, benign, z, rank_cap, columns, carried, heavy, *, rank, margin, dims, width):
    used = jnp.broadcast_to(client_benign, benign.shape)
    fit = _fitted_set(client_benign, benign, z)
    if carried is not None:   # the detection's SVD is of the blocks as given, not of clipped ones
        carried = carried._replace(members=carried.members & ~heavy[:, None])
    # The detection's SVD serves only where it holds the ``width`` vectors needed.
    if carried is not None and carried.u.shape[-1] < width:
        carried = None
    one = functools.partial(_basis_one, rank=rank, margin=margin, dims=dims, width=width)
    # On CPU one problem after another (each reuses its SVD or computes it: a batch
    # would compute both); elsewhere eight at a time, so the full SVDs of a whole
    # model's stacks are never held at once.
    batch = None if jax.default_backend() == "cpu" else 8
    basis, ranks, coefficients = jax.lax.map(lambda args: one(*args), (blocks, fit, rank_cap, columns, carried),
                                             batch_size=batch)
    if rank is None:
        # Majority support, one problem at a time after the batched SVDs.
        def majority(args):
            b, r, x, f, c = args
            return majority_basis(b, r, x, f, dims[0], c, rel_floor=rounding_floor(x.dtype))

        kept, ranks = jax.lax.map(majority, (basis, ranks, blocks, fit, columns))
        # Û' = Û T with T = ÛᵀÛ': the coefficients (Û = Σ_k Θ̂_k Z_k) follow.
        coefficients = jnp.einsum("nkqm,nmj->nkqj", coefficients, jnp.einsum("npm,npj->nmj", basis, kept))
        basis = kept
    return basis, ranks, coefficients, used & (ranks > 0)[:, None]
