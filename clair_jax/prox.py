"""Proximal maps of the two CLAIR penalties.

Both maps act on the trailing two axes and broadcast over any leading ones, are
exact (zeros are exact zeros, not small numbers) and have finite gradients at zero.

* ``svt(x, tau)``            = argmin_Z ½‖Z − X‖_F² + τ‖Z‖_*
* ``block_soft_threshold``   = argmin_C ½‖C − X‖_F² + τ Σ_k ‖C_k‖_F
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["svt", "svt_with_spectrum", "block_soft_threshold", "safe_frobenius_norm"]


def safe_frobenius_norm(x, axis=(-2, -1)):
    """‖x‖_F over ``axis`` with a finite (zero) gradient at x = 0."""
    sumsq = jnp.sum(jnp.square(x), axis=axis)
    positive = sumsq > 0
    # Double-where: the sqrt never sees 0, so its gradient never sees 1/0.
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sumsq, 1.0)), 0.0)


@jax.custom_jvp
def _tall_svd(x):
    return jnp.linalg.svd(x, full_matrices=False)


@_tall_svd.defjvp
def _tall_svd_jvp(primals, tangents):
    """JAX's SVD derivative with its 1/(s_i² − s_j²) and 1/s_i terms set to 0 where they
    divide by (numerically) zero: repeated or zero singular values. Those terms only move
    the basis inside a degenerate (or null) singular space, which SVT maps to zero
    whenever the singular values are below the threshold; JAX's own rule gives inf·0 = NaN."""
    (x,), (dx,) = primals, tangents
    u, s, vt = _tall_svd(x)
    v, ut = jnp.swapaxes(vt, -1, -2), jnp.swapaxes(u, -1, -2)
    tiny = jnp.finfo(s.dtype).eps * jnp.max(s, axis=-1, keepdims=True)
    ds_mat = ut @ dx @ v
    ds = jnp.diagonal(ds_mat, axis1=-2, axis2=-1)
    col, row = s[..., None, :], s[..., :, None]
    gap = (col + row) * (col - row)
    safe = jnp.abs(gap) > tiny[..., None] * (col + row + tiny[..., None])
    f = jnp.where(safe, 1.0 / jnp.where(safe, gap, 1.0), 0.0)
    ds_s, s_ds = col * ds_mat, row * ds_mat
    du = u @ (f * (ds_s + jnp.swapaxes(ds_s, -1, -2)))
    dv = v @ (f * (s_ds + jnp.swapaxes(s_ds, -1, -2)))
    nonzero = s > tiny
    inv_s = jnp.where(nonzero, 1.0 / jnp.where(nonzero, s, 1.0), 0.0)
    dxv = dx @ v
    du = du + (dxv - u @ (ut @ dxv)) * inv_s[..., None, :]
    return (u, s, vt), (du, ds, jnp.swapaxes(dv, -1, -2))


def singular_values(x):
    """Singular values of the trailing (m, n) matrices, descending.

    ``jnp.linalg.svd(x, compute_uv=False)`` alone makes XLA:CPU's LAPACK call allocate
    the full m × m U it never fills (a (32, 512, 16) batch of LoRA blocks: 33 MiB of
    scratch instead of 2 MiB, fresh memory on every call); ``full_matrices=False``
    gives the same values without it.
    """
    return jnp.linalg.svd(x, compute_uv=False, full_matrices=False)


def thin_svd(x):
    """``jnp.linalg.svd(x, full_matrices=False)``, computed on the tall orientation.

    Same factors; for a wide x the SVD of xᵀ is taken and transposed back, because
    XLA:CPU's LAPACK SVD of a wide matrix is about 1.8× slower than of its transpose
    (64 × 512: 36 ms vs 20 ms for a batch of 32, ``benchmarks/bench_svt.py``). Its
    derivative is finite at repeated and zero singular values (see ``_tall_svd_jvp``).
    """
    m, n = x.shape[-2:]
    if m < n:
        v, s, ut = _tall_svd(jnp.swapaxes(x, -1, -2))
        return jnp.swapaxes(ut, -1, -2), s, jnp.swapaxes(v, -1, -2)
    return _tall_svd(x)


def svt_with_spectrum(x, tau):
    """SVT that also returns the shrunk singular values (used by the solvers).

    Returns:
        (svt(x, tau), shrunk singular values of shape (..., min(m, n))).
    """
    tau = jnp.asarray(tau, x.dtype)
    # ‖X‖_2 ≤ ‖X‖_F ≤ τ means the answer is exactly 0. Feeding the SVD a fixed,
    # well-conditioned matrix there keeps its derivative (1/(s_i² − s_j²) terms)
    # away from the degenerate spectrum of X = 0: no NaN gradients at zero.
    below = safe_frobenius_norm(x) <= tau
    m, n = x.shape[-2:]
    anchor = jnp.eye(m, n, dtype=x.dtype) * (1.0 + jnp.arange(n, dtype=x.dtype))
    x_safe = jnp.where(below[..., None, None], anchor, x)
    u, s, vt = thin_svd(x_safe)
    s_shrunk = jnp.maximum(s - tau[..., None], 0.0)
    s_shrunk = jnp.where(below[..., None], 0.0, s_shrunk)
    return (u * s_shrunk[..., None, :]) @ vt, s_shrunk


def svt(x, tau):
    r"""Singular-value soft-thresholding, the proximal map of τ‖·‖_*.

    .. math:: \operatorname{svt}(X, τ) = U \max(Σ − τ, 0) V^T
              = \arg\min_Z \tfrac12\|Z − X\|_F^2 + τ\|Z\|_*

    Args:
        x: array of shape (..., m, n).
        tau: threshold τ ≥ 0, a scalar or an array broadcasting to x.shape[:-2].

    Returns:
        Array of the shape and dtype of ``x``; singular values ≤ τ become exact zeros.

    Example:
        >>> import jax.numpy as jnp, clair_jax as cj
        >>> cj.prox.svt(jnp.diag(jnp.array([3.0, 1.0], dtype=jnp.float32)), 2.0)
        Array([[1., 0.],
               [0., 0.]], dtype=float32)
    """
    return svt_with_spectrum(x, tau)[0]


def block_soft_threshold(blocks, tau):
    r"""Group soft-thresholding of each block by its Frobenius norm.

    .. math:: C_k = \max(0, 1 − τ/\|X_k\|_F)\, X_k
              = \arg\min_C \tfrac12\|C − X\|_F^2 + τ\sum_k \|C_k\|_F

    Args:
        blocks: array of shape (..., K, p, q); each trailing (p, q) matrix is a block.
        tau: threshold τ ≥ 0, a scalar or an array broadcasting to blocks.shape[:-2].

    Returns:
        Array like ``blocks``; blocks with ‖X_k‖_F ≤ τ are exact zeros. The
        gradient is finite everywhere, including at a zero block.

    Example:
        >>> import jax.numpy as jnp, clair_jax as cj
        >>> x = jnp.stack([jnp.full((2, 2), 1.0), jnp.full((2, 2), 0.1)]).astype(jnp.float32)
        >>> cj.prox.block_soft_threshold(x, 1.0)[:, 0, 0]
        Array([0.5, 0. ], dtype=float32)
    """
    norms = safe_frobenius_norm(blocks)
    tau = jnp.asarray(tau, blocks.dtype)
    keep = norms > tau
    scale = jnp.where(keep, 1.0 - tau / jnp.where(keep, norms, 1.0), 0.0)
    return blocks * scale[..., None, None]
