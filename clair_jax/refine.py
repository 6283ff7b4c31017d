"""Stages 5–6: the shared subspace from the benign clients, then refined updates.

Û = leading r̂ left singular vectors of the stacked benign blocks [Θ̂_k : k ∈ Ŝ]
(pooling every benign client is where the averaging gain comes from), and each
benign client gets Θ̃_k = Û Ûᵀ Θ̂_k: its error off the subspace is removed, its
own coefficients inside the subspace are kept. Contaminated clients keep Θ̂_k.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from clair_jax.stack import to_stacked
from clair_jax.tuning import marchenko_pastur_median, pad_spectrum

__all__ = ["benign_spectrum", "select_rank", "shared_basis", "subspace", "project"]


def benign_spectrum(blocks, benign):
    """SVD of the stacked benign blocks (contaminated blocks zeroed): (U, s)."""
    masked = jnp.where(benign[:, None, None], blocks, 0.0)
    u, s, _ = jnp.linalg.svd(to_stacked(masked), full_matrices=False)
    return u, s


def select_rank(singular_values, benign, p, q, margin=1.2):
    """r̂ = number of singular values above the noise edge of the benign stack.

    The benign stack is p × |Ŝ|q; its noise σ̂ comes from the median singular value
    (Gavish–Donoho, valid while r < min(p, |Ŝ|q)/2), and a singular value is signal
    when it exceeds ``margin``·σ̂(√p + √(|Ŝ|q)), the largest a pure-noise one reaches.
    A relative floor of √eps·max(p, Kq)·s_1 stands in for the noise edge in
    noiseless data. Zero columns (the contaminated blocks) are excluded from the
    median.
    """
    singular_values = pad_spectrum(singular_values, min(p, benign.shape[0] * q))
    n_benign = jnp.maximum(jnp.sum(benign), 1)
    n_cols = n_benign * q
    rank_limit = jnp.minimum(p, n_cols)
    # Median of the first min(p, |Ŝ|q) singular values (the others are structural zeros).
    idx = jnp.arange(singular_values.shape[-1])
    live = idx < rank_limit
    ordered = jnp.sort(jnp.where(live, singular_values, jnp.inf))
    median = ordered[(rank_limit - 1) // 2]
    m_small = jnp.minimum(p, n_cols).astype(singular_values.dtype)
    n_large = jnp.maximum(p, n_cols).astype(singular_values.dtype)
    # μ_β depends on the (traced) number of benign clients: interpolate a table.
    betas = np.linspace(0.01, 1.0, 100)
    table = jnp.asarray([marchenko_pastur_median(b) for b in betas], singular_values.dtype)
    mp = jnp.interp(m_small / n_large, jnp.asarray(betas, singular_values.dtype), table)
    sigma = median / jnp.sqrt(n_large * mp)
    edge = margin * sigma * (jnp.sqrt(jnp.asarray(p, singular_values.dtype)) + jnp.sqrt(n_cols.astype(singular_values.dtype)))
    eps = jnp.finfo(singular_values.dtype).eps
    floor = jnp.sqrt(eps) * singular_values[0]
    rank = jnp.sum(live & (singular_values > jnp.maximum(edge, floor)))
    return jnp.maximum(rank, jnp.where(singular_values[0] > 0, 1, 0)), sigma


def shared_basis(u, rank, blocks, benign, max_share=0.5):
    """The first ``rank`` columns of u that are *shared*, compacted to the front.

    A direction carrying more than ``max_share`` of its energy from a single
    benign client is that client's own (an absorbed rank-one attack, an
    outlier) rather than a shared one: it is dropped, so it cannot shelter its
    owner from detection nor enter everyone's refinement.

    Returns:
        (basis with kept columns first and the rest zero, number kept).
    """
    masked = jnp.where(benign[:, None, None], blocks, 0.0)
    per_client = jnp.square(jnp.einsum("pm,kpq->kmq", u, masked)).sum(-1)   # (K, m)
    total = jnp.maximum(jnp.sum(per_client, axis=0), jnp.finfo(u.dtype).tiny)
    keep = (jnp.arange(u.shape[-1]) < rank) & (jnp.max(per_client, axis=0) <= max_share * total)
    order = jnp.argsort(~keep, stable=True)                                # kept columns first
    kept = jnp.sum(keep).astype(jnp.int32)
    return subspace(u[:, order], kept), kept


def subspace(u, rank):
    """First ``rank`` columns of u, the rest zeroed (a fixed-shape basis)."""
    keep = jnp.arange(u.shape[-1]) < rank
    return jnp.where(keep, u, 0.0)


def project(basis, blocks, benign):
    """Θ̃_k = Û Ûᵀ Θ̂_k for benign k, Θ̂_k otherwise. basis: (p, r), blocks: (K, p, q)."""
    projected = basis @ jnp.einsum("pr,kpq->krq", basis, blocks)
    return jnp.where(benign[:, None, None], projected, blocks)
