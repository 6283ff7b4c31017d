"""Stage 4 of the pipeline: name the contaminated clients.

The score of client k is the share of its update that the decomposition could
not explain by the shared low-rank part, s_k = ‖Ĉ_k‖_F / ‖Θ̂_k‖_F ∈ [0, 1]. Benign
blocks have Ĉ_k = 0 (exactly in the noiseless program, up to noise otherwise);
contaminated blocks keep a large share.

The collaborative set Ŝ = {k : s_k ≤ τ}. With no τ given, τ is put in the widest
gap of the sorted scores that leaves a benign majority; a gap narrower than
``min_gap`` means "no contamination" (every score is in one cluster). Across a λ
grid the λ whose scores split most clearly wins.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from clair_jax.prox import safe_frobenius_norm

__all__ = ["block_scores", "Split", "split_scores", "collaborative_set", "masked_median", "scaled_norms",
           "robust_units", "MIN_GAP", "SUBSPACE_CLIP", "ENERGY_CAP", "ENTRY_CLIP"]

#: Smallest score gap read as a real split. Benign scores spread in small steps
#: (a K-sized sample of one distribution); a contaminated cluster sits a clear
#: step above them.
MIN_GAP = 0.1

#: The refit estimates Û from blocks whose norms are capped at SUBSPACE_CLIP ×
#: the median norm of the current set: a block's column space is kept, but a few
#: aligned huge blocks can no longer choose Û or r̂ on their own.
SUBSPACE_CLIP = 2.0

#: Blocks above ENERGY_CAP × the median client norm are scaled down to it before
#: energies are squared (float32 squares overflow near 1e19). Such a block's
#: off-subspace energy is still ~ENERGY_CAP² times a benign one: it is flagged.
ENERGY_CAP = 1e6

#: Off-subspace residual entries are winsorised at ENTRY_CLIP robust standard
#: deviations (of the current set's pooled residual entries) before energies are
#: summed: heavy-tailed noise (Student-t) then gives energies with a finite spread,
#: while dense contamination keeps nearly all its energy.
ENTRY_CLIP = 4.0


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


def masked_median(values, mask):
    """Median of ``values[mask]`` (lower median; +inf padding keeps shapes static)."""
    ordered = jnp.sort(jnp.where(mask, values, jnp.inf))
    return ordered[(jnp.maximum(jnp.sum(mask), 1) - 1) // 2]


def scaled_norms(blocks):
    """(K,) Frobenius norms that neither overflow nor underflow for any finite input.

    Each block is divided by its largest |entry| before squaring, then multiplied back.
    """
    peak = jnp.max(jnp.abs(blocks), axis=(-2, -1))
    unit = blocks / jnp.where(peak > 0, peak, 1.0)[..., None, None]
    return peak * jnp.sqrt(jnp.sum(jnp.square(unit), axis=(-2, -1)))


def robust_units(blocks, usable, cap=ENERGY_CAP):
    """Blocks in units of the median usable client norm, norms capped at ``cap``.

    Returns (scaled blocks, the unit): every statistic of the refit test is then
    computed on numbers near 1, whatever the input's scale (1e-20 or 1e30).
    """
    norms = scaled_norms(blocks)
    positive = usable & (norms > 0)
    unit = masked_median(norms, positive)
    unit = jnp.where(jnp.any(positive) & jnp.isfinite(unit) & (unit > 0), unit, 1.0)
    rel = norms / unit
    shrink = jnp.where(rel > cap, cap / jnp.where(rel > 0, rel, 1.0), 1.0)
    return blocks * (shrink / unit)[:, None, None], unit


class ResidualTest(NamedTuple):
    benign: jax.Array      # (K,) bool
    z: jax.Array           # (K,) standardised excess off-subspace energy
    rank: jax.Array        # r̂ used for the subspace
    spectrum: jax.Array    # singular values of the stack the last round fitted on
    stable: jax.Array      # the last round kept its set (then ``spectrum`` is the final set's)
    rounds: jax.Array      # rounds run


def residual_test(blocks, benign, usable, rank_fn, *, z_crit, rel_floor, rounds=2, dims=None, columns=None):
    """Refit check of a collaborative set (stage 4b).

    Û from the current set, then every client's off-subspace energy
    e_k = ‖(I − ÛÛᵀ)Θ̂_k‖_F². Benign energies are one population (noise plus small
    heterogeneity); a client is kept when e_k ≤ m + z_crit·s, with m and s the
    median and MAD-scale of the current set (s at least the χ² spread
    m·√(2/((p − r̂)q)) of isotropic noise) plus ``rel_floor``·‖Θ̂_k‖_F² for
    rounding in noiseless data. Squared energies with the noise level removed
    carry far more power than the norm shares of the convex scores when
    contamination hides in noise; the convex decomposition supplies the
    robust starting set the refit needs.

    Args:
        blocks: (K, p, q) with unusable clients zeroed.
        benign: (K,) starting set. usable: (K,) finite clients.
        rank_fn: (singular values, benign) → r̂.
        z_crit: standard deviations above the median read as contamination.
        rel_floor: relative energy below which a residual is rounding.
        rounds: at most this many refits, each on the previous round's set (a round
            that keeps its set ends the test).
        dims: dense (p, q) when ``blocks`` is an exact LoRA reduction.
        columns: (K,) noise columns per block (:func:`clair_jax.tuning.effective_columns`);
            default q each.
    """
    k, p, q = blocks.shape
    p, q = (p, q) if dims is None else dims
    # Scale first: every energy below is a number near 1 (overflow/underflow safe).
    blocks, unit = robust_units(blocks, usable)
    norms = scaled_norms(blocks)
    norms2 = jnp.square(norms)
    cols = jnp.full((k,), q) if columns is None else columns
    from clair_jax import refine  # local import: refine imports tuning, not detect

    def one_round(state):
        current = state.benign
        # Û from blocks capped at SUBSPACE_CLIP × the set's median norm (refine.capped).
        u, sv = refine.benign_spectrum(blocks, current)
        basis, r = refine.shared_basis(u, rank_fn(sv, current), blocks, current)
        resid = blocks - basis @ jnp.einsum("pr,kpq->krq", basis, blocks)
        # Two energies: plain, and with residual entries winsorised at ENTRY_CLIP
        # robust sd. Heavy-tailed noise inflates only the plain one, so a client is
        # flagged when both are out of the set's range.
        abs_mean = jnp.mean(jnp.abs(resid), axis=(-2, -1))
        spread = masked_median(abs_mean, current) * jnp.sqrt(jnp.pi / 2).astype(blocks.dtype)
        limit = jnp.where(spread > 0, ENTRY_CLIP * spread, jnp.inf)
        energy = jnp.sum(jnp.square(resid), axis=(-2, -1))
        clipped = jnp.sum(jnp.square(jnp.clip(resid, -limit, limit)), axis=(-2, -1))
        dof = jnp.maximum((p - r) * masked_median(cols, current), 1).astype(blocks.dtype)

        def standardise(e, size2):
            m = masked_median(e, current)
            mad = masked_median(jnp.abs(e - m), current)
            s = jnp.maximum(1.4826 * mad, m * jnp.sqrt(2.0 / dof))
            z = (e - m) / jnp.maximum(s, jnp.finfo(blocks.dtype).tiny)
            return z, e <= m + z_crit * s + rel_floor * size2

        z_plain, ok_plain = standardise(energy, norms2)
        z_clip, ok_clip = standardise(clipped, jnp.sum(jnp.square(jnp.clip(blocks, -limit, limit)), axis=(-2, -1)))
        z = jnp.minimum(z_plain, z_clip)
        keep = usable & (ok_plain | ok_clip)
        # A refit never hands the majority to the other side.
        keep = jnp.where(2 * jnp.sum(keep) >= jnp.sum(usable), keep, current)
        return ResidualTest(keep, z, r, sv * unit, jnp.all(keep == current), state.rounds + 1)

    # A round that keeps its set would repeat itself: stop there (one SVD instead
    # of ``rounds`` in the common case).
    def more(state):
        return (state.rounds < rounds) & ~state.stable

    init = ResidualTest(benign, jnp.zeros((k,), blocks.dtype), jnp.asarray(0, jnp.int32),
                        jnp.zeros((min(blocks.shape[1], k * blocks.shape[2]),), blocks.dtype),
                        jnp.asarray(False), jnp.asarray(0, jnp.int32))
    return jax.lax.while_loop(more, one_round, init)
