"""LoRA factors and the exact factored reduction (DESIGN.md §3).

If Θ̂_k = B_k A_k (B_k: p × r, A_k: r × q), every iterate of the solvers stays in
span[B_1 … B_K] on the left and in span(A_kᵀ) on block k's right. With
orthonormal bases Q (p × d, d = min(p, Kr)) and R_k (q × r),

    X_k = (Qᵀ B_k)(A_k R_k) ∈ R^{d×r}

is the *same* problem: the nuclear norm of the stack and every block norm are
unchanged. A 4096 × 4096 module with K = 32, r = 16 becomes a 512 × (32·16)
problem, and a subspace Ũ found there maps back as Û = Q Ũ. No dense ΔW is formed.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["LoRAFactors", "Reduction", "reduce_factors", "dense"]


class LoRAFactors(NamedTuple):
    """Client LoRA updates ΔW_k = B_k A_k (fold the alpha/r scaling into B).

    Attributes:
        B: (..., K, p, r).
        A: (..., K, r, q).
    """

    B: jax.Array
    A: jax.Array

    def transpose(self) -> "LoRAFactors":
        """Factors of ΔW_kᵀ = A_kᵀ B_kᵀ (used for ``side="right"``)."""
        return LoRAFactors(jnp.swapaxes(self.A, -1, -2), jnp.swapaxes(self.B, -1, -2))


def dense(factors: LoRAFactors):
    """ΔW_k = B_k A_k, (..., K, p, q). For tests and small problems only."""
    return factors.B @ factors.A


class Reduction(NamedTuple):
    blocks: jax.Array   # (K, d, r) reduced blocks X_k
    basis: jax.Array    # (p, d) Q


def reduce_factors(b, a):
    """Exact reduction of one problem: b (K, p, r), a (K, r, q) → Reduction."""
    k, p, r = b.shape
    stacked_b = jnp.transpose(b, (1, 0, 2)).reshape(p, k * r)
    q_basis, _ = jnp.linalg.qr(stacked_b)                 # (p, min(p, Kr))
    r_bases, _ = jnp.linalg.qr(jnp.swapaxes(a, -1, -2))   # (K, q, min(q, r))
    left = jnp.einsum("pd,kpr->kdr", q_basis, b)
    right = a @ r_bases                                   # (K, r, min(q, r))
    return Reduction(blocks=left @ right, basis=q_basis)
