"""LoRA factors and the exact factored reduction (DESIGN.md §3).

If Θ̂_k = B_k A_k (B_k: p × r, A_k: r × q), every iterate of the solvers stays in
span[B_1 … B_K] on the left and in span(A_kᵀ) on block k's right. With
orthonormal bases Q (p × d, d = min(p, Kr)) and R_k (q × r),

    X_k = (Qᵀ B_k)(A_k R_k) ∈ R^{d×r}

is the *same* problem: the nuclear norm of the stack and every block norm are
unchanged. A 4096 × 4096 module with K = 32, r = 16 becomes a 512 × (32·16)
problem. No dense ΔW is formed, and Q is never formed either: QᵀB_k are the
column blocks of the R factor of [B_1 … B_K], and a subspace Ũ found in the
reduced space maps back as Û = QŨ through Q X_k = B_k (A_k R_k)
(:func:`lift`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["LoRAFactors", "Reduction", "reduce_factors", "lift", "dense"]


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
    blocks: jax.Array   # (K, d, r') reduced blocks X_k = (QᵀB_k)(A_k R_k)
    right: jax.Array    # (K, r, r') A_k R_k: Q X_k = B_k (A_k R_k), so reduced bases lift without Q


def reduce_factors(b, a):
    """Exact reduction of one problem: b (K, p, r), a (K, r, q) → Reduction.

    R of the QR of [B_1 … B_K] is Qᵀ[B_1 … B_K]: its column blocks are QᵀB_k.
    LAPACK's QR without forming Q costs half of one that forms it, and QᵀB_k
    costs nothing more.
    """
    k, p, r = b.shape
    stacked_b = jnp.transpose(b, (1, 0, 2)).reshape(p, k * r)
    r_factor = jnp.linalg.qr(stacked_b, mode="r")                     # (d, K r), d = min(p, K r)
    left = jnp.transpose(r_factor.reshape(-1, k, r), (1, 0, 2))       # (K, d, r): QᵀB_k
    r_bases, _ = jnp.linalg.qr(jnp.swapaxes(a, -1, -2))               # (K, q, min(q, r))
    right = a @ r_bases                                               # (K, r, min(q, r))
    return Reduction(blocks=left @ right, right=right)


def lift(coefficients, b, right):
    """Û = QŨ for a reduced basis written as Ũ = Σ_k X_k Z_k, without Q.

    Q X_k = B_k (A_k R_k), so QŨ = Σ_k B_k (A_k R_k) Z_k: (K·p·r·m) work for m
    columns. The columns are orthonormalised once more (a p × m QR, signs kept)
    to remove the rounding the coefficients carry; zero columns stay zero.

    Args:
        coefficients: (K, r', m) Z_k. b: (K, p, r). right: (K, r, r') A_k R_k.
    """
    raw = jnp.einsum("kpr,krm->pm", b, right @ coefficients)
    q, r = jnp.linalg.qr(raw)
    diag = jnp.diagonal(r)
    live = jnp.sum(jnp.square(coefficients), axis=(0, 1)) > 0
    return jnp.where(live, q * jnp.where(diag < 0, -1.0, 1.0).astype(q.dtype), 0.0)
