"""Robust statistics every stage shares: medians over a set, overflow-safe norms, scale.

Detection (:mod:`clair_jax.detect`, :mod:`clair_jax.refit`) and refinement
(:mod:`clair_jax.refine`) read the same few statistics of a client set: a
median over the set (:func:`masked_median`), block norms that neither overflow
nor underflow (:func:`scaled_norms`), the blocks brought to the median client
norm (:func:`robust_units`), and how the set's off-subspace energy grows with an
update's size (:func:`size_exponent`). They live here, below both stages.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["repeated", "COPY_TOL", "masked_median", "scaled_norms", "robust_units", "size_exponent", "rounding_floor", "ENERGY_CAP",
           "SIZE_SPREAD"]

#: Blocks above ENERGY_CAP × the median client norm are scaled down to it before
#: energies are squared (float32 squares overflow near 1e19). Such a block's
#: off-subspace energy is still ~ENERGY_CAP² times a benign one: it is flagged.
ENERGY_CAP = 1e6

#: The refit test reads how honest noise grows with an update's size
#: (:func:`size_exponent`) only where the set's squared norms spread: the median
#: absolute deviation of their logarithms at least this (norms a factor √2 apart).
SIZE_SPREAD = float(np.log(2.0) / 2)


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


def size_exponent(energy, norms2, current, spread=SIZE_SPREAD):
    """β ∈ [0, 1] in e_k ∝ ‖Θ̂_k‖^(2β): how the set's off-subspace energy grows with size.

    Honest updates differ in size (more data, more local steps, another learning
    rate), and their estimation noise may grow with them (β ≈ 1: each is a scaled
    copy of the same kind of estimate) or not (β ≈ 0: additive noise of one level).
    Read from the current set as Siegel's repeated median of the pairwise slopes of
    log e_k against log ‖Θ̂_k‖² (for each client the median slope to the others,
    then the median of those: a minority of contaminated clients in the set
    cannot move it), and only where the set's sizes spread: where the median
    absolute deviation of log ‖Θ̂_k‖² is below ``spread`` the sizes carry no
    information and β = 0, so a federation of similar-sized clients (or one
    with a minority of larger, contaminated ones) is tested on plain energies.

    Example:
        >>> import jax.numpy as jnp, clair_jax as cj
        >>> size2 = jnp.array([1.0, 4.0, 16.0, 64.0, 256.0])
        >>> float(cj.detect.size_exponent(0.1 * size2, size2, jnp.ones(5, bool)))
        1.0
        >>> float(cj.detect.size_exponent(0.1 * jnp.ones(5), size2, jnp.ones(5, bool)))
        0.0
    """
    tiny = jnp.finfo(energy.dtype).tiny
    log_e = jnp.log(jnp.maximum(energy, tiny))
    log_n = jnp.log(jnp.maximum(norms2, tiny))
    live = current & (norms2 > 0) & (energy > 0)
    mad = masked_median(jnp.abs(log_n - masked_median(log_n, live)), live)
    dn = log_n[:, None] - log_n[None, :]
    # Pairs of clearly different size only: a slope over a tiny size difference is noise.
    pairs = live[:, None] & live[None, :] & (jnp.abs(dn) > spread)
    slopes = (log_e[:, None] - log_e[None, :]) / jnp.where(pairs, dn, 1.0)
    per_client = jax.vmap(masked_median)(slopes, pairs)
    has = jnp.any(pairs, axis=1)
    beta = masked_median(jnp.where(has, per_client, 0.0), has)
    beta = jnp.where((mad >= spread) & jnp.any(has) & jnp.isfinite(beta), beta, 0.0)
    return jnp.clip(beta, 0.0, 1.0).astype(energy.dtype)



def rounding_floor(dtype):
    """Share of a block's energy below which an off-subspace residual is rounding error."""
    return 1e-10 if jnp.dtype(dtype) == jnp.float64 else 1e-5


#: Off-subspace residual entries are winsorised at ENTRY_CLIP robust standard
#: deviations (of the current set's pooled residual entries) before energies are
#: summed: heavy-tailed noise (Student-t) then gives energies with a finite spread,
#: while dense contamination keeps nearly all its energy.
ENTRY_CLIP = 4.0

#: The set's noise is heavy-tailed when its median off-subspace energy loses more
#: than this factor to winsorising (Gaussian noise loses ~0.1 % at ENTRY_CLIP;
#: Student-t with df = 2 about 45 %).
HEAVY_TAIL_RATIO = 1.2


def winsorised_energies(resid, current, clip=ENTRY_CLIP):
    """(K,) plain and (K,) winsorised energies of residual blocks (K, p, q), and the limit.

    The limit is ``clip`` robust standard deviations of the ``current`` set's
    residual entries (their median mean |entry|, times √(π/2)).
    """
    abs_mean = jnp.mean(jnp.abs(resid), axis=(-2, -1))
    spread = masked_median(abs_mean, current) * jnp.sqrt(jnp.pi / 2).astype(resid.dtype)
    limit = jnp.where(spread > 0, clip * spread, jnp.inf)
    energy = jnp.sum(jnp.square(resid), axis=(-2, -1))
    clipped = jnp.sum(jnp.square(jnp.clip(resid, -limit, limit)), axis=(-2, -1))
    return energy, clipped, limit


def heavy_tailed(energy, clipped, current, ratio=HEAVY_TAIL_RATIO):
    """The set's noise is heavy-tailed: its median energy loses more than ``ratio`` to winsorising."""
    return masked_median(energy, current) > ratio * masked_median(clipped, current)


#: A client's update repeats another's when their squared distance is below
#: COPY_TOL × the smaller of the two squared norms (both taken from the clients'
#: mean): independent estimates never come that close (their own noise and
#: coefficients keep them apart), copies do.
COPY_TOL = 1e-2


def repeated(blocks, usable, tol=COPY_TOL):
    """(K,) bool: clients whose update repeats a lower-numbered client's.

    Copies add no evidence: 40 % of clients sending one honest update make its
    noise look shared (r̂ 8 for a true 3 in the zoo) and outvote the rest. So a
    repeated update counts once: the first client of each group of (near-)equal
    updates stays, the others are flagged. "Near" is a squared distance below
    :data:`COPY_TOL` × the smaller squared norm of the two, both measured from
    the clients' mean update: homogeneous honest clients with little noise
    differ by about their whole centred size, and clients of very different
    size are never near, while a copy plus a perturbation of a few percent of
    its norm is. Zero and non-finite blocks are never copies here (they are
    handled elsewhere).

    Example:
        >>> import jax.numpy as jnp, clair_jax as cj
        >>> x = jnp.stack([jnp.eye(3), 2 * jnp.eye(3), jnp.eye(3), -jnp.eye(3)])
        >>> cj.detect.repeated(x, jnp.ones(4, bool)).tolist()
        [False, False, True, False]
    """
    k = blocks.shape[0]
    flat = blocks.reshape(k, -1)
    live = usable & (jnp.sum(jnp.square(flat), axis=-1) > 0)
    # Distances from a Gram matrix, centred first: what they share cancels exactly,
    # so homogeneous clients' small differences are not lost to rounding.
    centre = jnp.sum(jnp.where(live[:, None], flat, 0.0), axis=0) / jnp.maximum(jnp.sum(live), 1)
    flat = jnp.where(live[:, None], flat - centre, 0.0)
    norms2 = jnp.sum(jnp.square(flat), axis=-1)
    d2 = jnp.maximum(norms2[:, None] + norms2[None, :] - 2.0 * flat @ flat.T, 0.0)
    order = jnp.arange(k)
    pairs = live[:, None] & live[None, :] & (order[:, None] > order[None, :])   # (i, j) with j < i
    # Relative to the smaller of the two (centred) updates: clients of very
    # different size are never copies of each other, small ones included.
    size = jnp.minimum(norms2[:, None], norms2[None, :])
    rounding = 64 * jnp.finfo(blocks.dtype).eps * (norms2[:, None] + norms2[None, :])
    return jnp.any(pairs & (d2 <= tol * size + rounding), axis=1)
