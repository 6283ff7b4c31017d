"""Stage 2 of the pipeline: put client updates side by side.

CLAIR works on K blocks Θ̂_k ∈ R^{p×q} of one problem. The *stacked* matrix is
M = [Θ̂_1 … Θ̂_K] ∈ R^{p×Kq}; its column space is the shared subspace. A shared
row space (``side="right"``) is the same problem on the transposed blocks.
Functions here take one problem; callers vmap over leading axes.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["to_stacked", "from_stacked", "orient", "SIDES"]

SIDES = ("left", "right")


def to_stacked(blocks):
    """(K, p, q) blocks → (p, K·q) matrix [Θ_1 … Θ_K]."""
    k, p, q = blocks.shape
    return jnp.transpose(blocks, (1, 0, 2)).reshape(p, k * q)


def from_stacked(matrix, num_clients):
    """(p, K·q) matrix → (K, p, q) blocks; inverse of :func:`to_stacked`."""
    p, kq = matrix.shape
    return jnp.transpose(matrix.reshape(p, num_clients, kq // num_clients), (1, 0, 2))


def orient(blocks, side):
    """Blocks whose *column* space is the shared one: Θ_k for "left", Θ_kᵀ for "right".

    The map is its own inverse, so it also brings results back to the user's side.
    """
    return blocks if side == "left" else jnp.swapaxes(blocks, -1, -2)
