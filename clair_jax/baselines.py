"""What users would otherwise run, on the same inputs as CLAIR.

Every baseline takes dense updates (..., K, p, q) and returns per-client estimates
of the same shape: client k's estimate of its own Θ_k. Aggregators give every
client the same matrix; ``local`` returns each client's own update; ``oracle``
knows the true subspace and collaborative set. Leading axes are independent
problems (layers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "local", "fedavg", "coordinate_median", "trimmed_mean", "multi_krum",
    "geometric_median", "oracle", "BASELINES",
]


def _broadcast(aggregate, updates):
    return jnp.broadcast_to(aggregate[..., None, :, :], updates.shape)


def local(updates):
    """Each client keeps its own update (local fine-tuning alone)."""
    return updates


def fedavg(updates, weights=None):
    """Federated averaging of the dense updates, Σ_k w_k Θ̂_k (uniform w by default)."""
    if weights is None:
        return _broadcast(jnp.mean(updates, axis=-3), updates)
    w = jnp.asarray(weights, updates.dtype)
    return _broadcast(jnp.einsum("...k,...kpq->...pq", w / w.sum(-1, keepdims=True), updates), updates)


def coordinate_median(updates):
    """Coordinate-wise median over clients (Yin et al., 2018)."""
    return _broadcast(jnp.median(updates, axis=-3), updates)


def trimmed_mean(updates, trim=0.2):
    """Coordinate-wise mean after dropping the ``trim`` fraction at each end."""
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    k = updates.shape[-3]
    cut = int(trim * k)
    ordered = jnp.sort(updates, axis=-3)
    return _broadcast(jnp.mean(ordered[..., cut:k - cut, :, :], axis=-3), updates)


def multi_krum(updates, num_byzantine=None, num_selected=None):
    """Multi-Krum (Blanchard et al., 2017): average the m updates with lowest Krum score.

    The score of client k is the sum of squared distances to its K − f − 2 nearest
    neighbours. ``num_byzantine`` f defaults to ⌊(K − 3)/2⌋ (the most Krum tolerates),
    ``num_selected`` m to K − f.
    """
    k = updates.shape[-3]
    f = (k - 3) // 2 if num_byzantine is None else int(num_byzantine)
    if not 0 <= f <= k - 3:
        raise ValueError(f"num_byzantine must be in [0, K-3] = [0, {k - 3}], got {f}")
    m = k - f if num_selected is None else int(num_selected)
    flat = updates.reshape(*updates.shape[:-2], -1)
    sq = jnp.sum(flat**2, -1)
    d2 = sq[..., :, None] + sq[..., None, :] - 2 * flat @ jnp.swapaxes(flat, -1, -2)
    d2 = jnp.maximum(d2, 0.0)
    nearest = jnp.sort(d2, axis=-1)[..., 1:k - f - 1]  # drop the zero self-distance
    scores = jnp.sum(nearest, axis=-1)
    chosen = jnp.argsort(scores, axis=-1)[..., :m]
    picked = jnp.take_along_axis(updates, chosen[..., None, None], axis=-3)
    return _broadcast(jnp.mean(picked, axis=-3), updates)


def geometric_median(updates, num_iter=100, eps=None):
    """Geometric median of the updates (Weiszfeld iterations; RFA, Pillutla et al.)."""
    eps = jnp.finfo(updates.dtype).eps ** 0.5 if eps is None else eps
    flat = updates.reshape(*updates.shape[:-2], -1)

    def step(z, _):
        dist = jnp.linalg.norm(flat - z[..., None, :], axis=-1)
        w = 1.0 / jnp.maximum(dist, eps * (1.0 + jnp.linalg.norm(z, axis=-1, keepdims=True)))
        return jnp.einsum("...k,...kd->...d", w, flat) / w.sum(-1, keepdims=True), None

    z, _ = jax.lax.scan(step, jnp.median(flat, axis=-2), None, length=num_iter)
    return _broadcast(z.reshape(*updates.shape[:-3], *updates.shape[-2:]), updates)


def oracle(updates, subspace, benign):
    """Knows U and S: benign clients get U Uᵀ Θ̂_k, contaminated keep Θ̂_k.

    Args:
        updates: (..., K, p, q).
        subspace: (..., p, r) the true shared subspace (left side).
        benign: (K,) or (..., K) bool, the true collaborative set.
    """
    projector = subspace @ jnp.swapaxes(subspace, -1, -2)
    projected = projector[..., None, :, :] @ updates
    return jnp.where(jnp.asarray(benign)[..., None, None], projected, updates)


BASELINES = {
    "local": local,
    "fedavg": fedavg,
    "median": coordinate_median,
    "trimmed_mean": trimmed_mean,
    "multi_krum": multi_krum,
    "geometric_median": geometric_median,
}
