"""Partial pooling inside Û: each benign client's coordinates shrunk toward the benign centre.

V_k = ÛᵀΘ̂_k is shrunk toward a robust centre V̄ by an empirical-Bayes factor
Λ_k (:func:`partial_pool`), so homogeneous clients pool their estimation noise
away (FedAvg-like) and heterogeneous ones keep their own coordinates; clients
whose coordinates the model cannot explain stay out (:func:`pool_members`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["POOLING", "HUBER", "CENTRE_Z", "CENTRE_PASSES", "centre_cut", "partial_pool", "pool_members"]

#: Pooling modes of :func:`partial_pool`: empirical Bayes, none (Λ = 1), full (Λ = 0).
POOLING = ("auto", "none", "full")



#: The pooled centre V̄ weighs a client farther than HUBER × the set's median distance
#: from it by HUBER·median/distance (:func:`partial_pool`); closer clients weigh 1.
HUBER = 2.0


def _robust_centre(coords, benign, iterations=10, huber=HUBER):
    """Huber-weighted mean of the benign coordinate matrices (K, r, q) → (r, q).

    Starts at the coordinate-wise median, then reweights: a client farther than
    ``huber`` × the median distance gets weight huber·median/distance. Clients at
    ordinary distances all weigh 1 (the centre is their mean); a minority far away
    (a contaminated client that slipped into Ŝ) is down-weighted.
    """
    k = coords.shape[0]
    flat = coords.reshape(k, -1)
    big = jnp.finfo(coords.dtype).max
    lower = jnp.sort(jnp.where(benign[:, None], flat, big), axis=0)
    upper = jnp.sort(jnp.where(benign[:, None], flat, -big), axis=0)[::-1]
    n = jnp.maximum(jnp.sum(benign), 1)
    # Median of the benign rows: mean of the lower and upper median.
    centre = 0.5 * (lower[(n - 1) // 2] + upper[(n - 1) // 2])
    def step(centre, _):
        dist = jnp.sqrt(jnp.sum(jnp.square(flat - centre), axis=-1))
        scale = jnp.sort(jnp.where(benign, dist, jnp.inf))[(n - 1) // 2]
        w = jnp.where(dist > huber * scale, huber * scale / jnp.maximum(dist, jnp.finfo(dist.dtype).tiny), 1.0)
        w = jnp.where(benign, w, 0.0)
        new = jnp.einsum("k,kd->d", w, flat) / jnp.maximum(jnp.sum(w), jnp.finfo(dist.dtype).tiny)
        return new, None

    centre, _ = jax.lax.scan(step, centre, None, length=iterations)
    return centre.reshape(coords.shape[1:])


#: A benign client whose coordinates inside Û lie farther from the centre than this many
#: standard deviations of a χ² with q·r̂ degrees of freedom (its distance in units of its
#: own expected spread τ_j² + ν_kj, read against the set's median) is kept out of the
#: pooled centre and keeps its own coordinates (:func:`partial_pool`).
CENTRE_Z = 5.0
#: Rounds of that exclusion (each on the previous round's set).
CENTRE_PASSES = 3


def centre_cut(dof, z=CENTRE_Z):
    """Upper z-quantile over the median of χ²_dof (Wilson–Hilferty): the ratio to the set's
    median distance above which :func:`partial_pool` stops pooling a client.

    Example:
        >>> round(float(centre_cut(90.0)), 2), round(float(centre_cut(8.0)), 2)
        (1.95, 6.41)
    """
    a = 2.0 / (9.0 * jnp.maximum(dof, 1.0))
    return jnp.power((1.0 - a + z * jnp.sqrt(a)) / (1.0 - a), 3)


def partial_pool(basis, blocks, benign, noise_level, columns=None, *, pooling="auto", coordinate_noise=None):
    r"""Partial pooling of the benign clients' coordinates inside the subspace.

    Θ̃_k = Û(V̄ + Λ_k(V_k − V̄)) for benign k (Θ̂_k otherwise), with V_k = ÛᵀΘ̂_k,
    V̄ a robust (Huber-weighted) centre of the benign V_k and Λ_k = diag(λ_k1 … λ_kr)
    an empirical-Bayes shrinkage per direction j of Û:

        λ_kj = τ_j² / (τ_j² + ν_kj),   ν_kj = σ_k² c_k (or as reported),
        τ_j² = max(0, median_{k∈Ŝ}(‖V_kj − V̄_j‖² − ν_kj)),

    where V_kj is row j of V_k (q coefficients), ν_kj the estimation noise a
    client's row carries and τ_j² the spread of the true rows between clients.
    Read from the updates alone, ν_kj = σ_k² c_k (σ_k the per-entry noise level,
    c_k its noise columns: q for a full-rank block, the LoRA rank for a factored
    one) assumes the noise is as large along Û as off it; where the clients can
    measure it on their own data (:func:`clair_jax.estimators.coordinate_noise`)
    ``coordinate_noise`` gives ν_kj directly.

    Only the clients whose coordinates the model explains are pooled
    (:func:`pool_members`): one whose distance from V̄ is far beyond its own noise
    and the spread between clients (a relabelled client, or one of another task,
    whose update lies inside Û) stays out of V̄ and τ² and keeps its own
    coordinates (Λ_k = I), so it does not pull the benign clients toward it.

    No spread beyond the noise: every benign client gets ÛV̄ (the benign FedAvg
    projected on Û); spread far above the noise: Λ_k → I and Θ̃_k → ÛÛᵀΘ̂_k
    (:func:`clair_jax.refine.project`). Contaminated clients never enter V̄ nor τ².

    Args:
        basis: (p, r) Û, orthonormal columns; all-zero columns (beyond r̂) are ignored.
        blocks: (K, p, q) local updates Θ̂_k.
        benign: (K,) bool collaborative set.
        noise_level: σ̂ per entry, a scalar or (K,) per client (input units).
        columns: (K,) noise columns per block (default q each).
        pooling: ``"auto"`` (empirical Bayes), ``"none"`` (Λ = I: the projection)
            or ``"full"`` (Λ = 0: every benign client gets ÛV̄).
        coordinate_noise: optional (K, r) ν_kj, the variance of client k's row j of
            V_k summed over its q entries (input units squared), for ``"auto"``.

    Returns:
        (refined (K, p, q), shrinkage (K, r)): Λ's diagonal per client (1 for
        contaminated clients and for the zero columns of ``basis``).

    Example:
        >>> import jax.numpy as jnp, clair_jax as cj
        >>> u = jnp.eye(4)[:, :1]
        >>> blocks = jnp.stack([jnp.outer(u[:, 0], jnp.array([1.0, 2.0])) + e
        ...                     for e in (0.0, 1e-3, -1e-3)])
        >>> refined, lam = cj.refine.partial_pool(u, blocks, jnp.ones(3, bool), 0.5)
        >>> lam.ravel().tolist()   # noise far above the spread: pooled fully
        [0.0, 0.0, 0.0]
    """
    if pooling not in POOLING:
        raise ValueError(f"pooling must be one of {POOLING}, got {pooling!r}")
    k = blocks.shape[0]
    coords, live, nu = _coordinates(basis, blocks, noise_level, columns, coordinate_noise)
    if pooling == "auto":
        members = pool_members(basis, blocks, benign, noise_level, columns, coordinate_noise=coordinate_noise)
        centre, tau2, expected, _ = _centre_fit(coords, members, nu, live)
        shrink = jnp.where(expected > 0, tau2[None, :] / jnp.where(expected > 0, expected, 1.0), 1.0)
    else:
        members = benign
        centre = _robust_centre(coords, benign)
        shrink = jnp.full((k, basis.shape[-1]), 1.0 if pooling == "none" else 0.0, blocks.dtype)
    shrink = jnp.where(members[:, None] & live[None, :], shrink, 1.0).astype(blocks.dtype)
    pooled = centre + shrink[..., None] * (coords - centre)                 # (K, r, q)
    refined = jnp.einsum("pr,krq->kpq", basis, pooled)
    return jnp.where(benign[:, None, None], refined, blocks), shrink


def _coordinates(basis, blocks, noise_level, columns, coordinate_noise):
    """V_k = ÛᵀΘ̂_k (K, r, q), the live columns of Û (r,) and ν_kj ((K, 1) from σ̂, or (K, r) as reported)."""
    k, _, q = blocks.shape
    dtype = blocks.dtype
    coords = jnp.einsum("pr,kpq->krq", basis, blocks)
    live = jnp.sum(jnp.square(basis), axis=0) > 0
    cols = jnp.full((k,), q) if columns is None else jnp.asarray(columns)
    sigma2 = jnp.broadcast_to(jnp.square(jnp.asarray(noise_level, dtype)), (k,))
    nu = (sigma2 * cols.astype(dtype))[:, None]
    if coordinate_noise is not None:
        nu = jnp.asarray(coordinate_noise, dtype)
    return coords, live, nu


def _centre_fit(coords, members, nu, live):
    """V̄, τ², each client's expected spread τ_j² + ν_kj and its distance d_k, from ``members``."""
    centre = _robust_centre(coords, members)
    spread = jnp.sum(jnp.square(coords - centre), axis=-1)                  # (K, r)
    excess = jnp.where(members[:, None], spread - nu, jnp.inf)
    tau2 = jnp.maximum(jnp.sort(excess, axis=0)[(jnp.maximum(jnp.sum(members), 1) - 1) // 2], 0.0)
    expected = tau2[None, :] + nu                                            # E‖V_kj − V̄_j‖² under the model
    ratio = jnp.where(expected > 0, spread / jnp.where(expected > 0, expected, 1.0),
                      jnp.where(spread > 0, jnp.inf, 0.0))
    distance = jnp.sum(jnp.where(live[None, :], ratio, 0.0), axis=-1) / jnp.maximum(jnp.sum(live), 1)
    return centre, tau2, expected, distance


def pool_members(basis, blocks, benign, noise_level, columns=None, *, coordinate_noise=None):
    """(K,) the benign clients whose coordinates inside Û the pooling model explains.

    d_k = mean_j ‖V_kj − V̄_j‖²/(τ_j² + ν_kj) is about 1 for an honest client; a
    client with d_k above :func:`centre_cut` (q·r̂) × the median d of the set is
    left out, and V̄, τ² and d are read again without it (:data:`CENTRE_PASSES`
    rounds). :func:`partial_pool` pools only these clients; with the noise reported
    by the clients, :func:`clair_jax.refine.refine` also fits Û again without the others.

    Example:
        >>> import jax.numpy as jnp, clair_jax as cj
        >>> u = jnp.eye(6)[:, :1]
        >>> rows = jnp.array([[1.0, 1.1, 0.9, 1.05, 0.95, 9.0]]).T        # client 5 far off
        >>> blocks = jnp.einsum("pr,kr->kp", u, rows)[..., None]
        >>> cj.refine.pool_members(u, blocks, jnp.ones(6, bool), 0.05).tolist()
        [True, True, True, True, True, False]
    """
    q = blocks.shape[-1]
    coords, live, nu = _coordinates(basis, blocks, noise_level, columns, coordinate_noise)
    cut = centre_cut(q * jnp.sum(live).astype(blocks.dtype))
    members = benign
    for _ in range(CENTRE_PASSES):
        _, _, _, distance = _centre_fit(coords, members, nu, live)
        typical = jnp.sort(jnp.where(members, distance, jnp.inf))[(jnp.maximum(jnp.sum(members), 1) - 1) // 2]
        members = benign & (distance <= cut * typical)
    return members
