"""Scale-free defaults: noise level from the spectrum, the λ grid, the μ rule.

Everything here works on one problem already scaled to ‖M‖_2 = 1 with block norms
equalised (see :func:`clair_jax.pipeline.clair`), so the numbers below are
dimensionless.

Why these rules (DESIGN.md §2):

* Noise. For an m × n matrix of iid N(0, σ²) entries the squared singular values
  divided by n follow the Marchenko–Pastur law with ratio β = m/n, so the median
  singular value is √(n μ_β) σ (Gavish & Donoho, 2014). Taking it per client block and
  then the median over clients is insensitive to contamination (fewer than half
  the clients) and to a shared rank below half the block's smaller side.
* μ = σ̂ (√p + √(Kq)) is the spectral norm of the noise: singular values of M
  below it are noise and SVT removes them. For rank-deficient blocks (LoRA
  updates) Kq becomes the number of noise columns Σ_k rank_k
  (:func:`effective_columns`), and σ̂ is read off the benign stack
  (:func:`stack_noise_level`), since each block alone looks noiseless.
* λ. A benign block leaves C exactly when its residual ‖E_k‖_F ≈ σ√(pq) is below
  μλ, i.e. λ ≳ √(pq)/(√p + √(Kq)); a contaminated block stays out of L while λ is
  below its nuclear-to-Frobenius ratio (1 for rank one, up to √q for full rank).
  The window moves with the data, so rather than trusting one formula we solve a
  geometric grid around the noise floor in one vmapped call and let the block
  scores choose (:mod:`clair_jax.detect`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from clair_jax import _marchenko_pastur, prox
from clair_jax._marchenko_pastur import BULK_LEVELS

__all__ = [
    "marchenko_pastur_median", "marchenko_pastur_quantile", "bulk_noise_level", "optimal_shrinkage", "BULK_LEVELS",
    "noise_level", "effective_columns", "stack_noise_level",
    "lambda_grid", "noise_lambda", "pad_spectrum",
]


def marchenko_pastur_quantile(beta: float, level: float) -> float:
    """``level`` quantile of the Marchenko–Pastur law with ratio β = m/n ∈ (0, 1] (variance 1):
    squared singular values of an m × n noise matrix over n."""
    return _marchenko_pastur.quantile(beta, level)


def marchenko_pastur_median(beta: float) -> float:
    """Median of the Marchenko–Pastur law with ratio β = m/n ∈ (0, 1] (variance 1)."""
    return marchenko_pastur_quantile(beta, 0.5)


def _gavish_donoho(singular_values, m, n):
    """σ̂ from the median singular value of an m × n matrix (m ≤ n after sorting)."""
    m, n = min(m, n), max(m, n)
    return jnp.median(singular_values, axis=-1) / float(np.sqrt(n * marchenko_pastur_median(m / n)))


def noise_level(blocks, usable=None, dims=None, singular_values=None):
    """Robust per-entry noise level σ̂ of one (K, p, q) problem.

    Per-client Gavish–Donoho estimates, then the median over ``usable`` clients.
    Blocks whose smaller side is below 4 carry no usable noise spectrum; the whole
    stacked matrix is used instead.

    Args:
        blocks: (K, p, q).
        usable: optional (K,) bool, clients to pool (e.g. those with finite updates).
        dims: (p, q) of the original blocks when ``blocks`` is an exact reduction
            (LoRA factors): the missing singular values are zeros, and padding
            them back makes the estimate the same as on the dense blocks.
        singular_values: (K, min(p, q)) per-block singular values, if already computed.

    Returns:
        scalar σ̂ ≥ 0.
    """
    k, p_red, q_red = blocks.shape
    p, q = (p_red, q_red) if dims is None else dims
    if min(p, q) >= 4:
        sv = prox.singular_values(blocks) if singular_values is None else singular_values
        sv = pad_spectrum(sv, min(p, q))
        per_client = _gavish_donoho(sv, p, q)
        if usable is None:
            return jnp.median(per_client)
        # Median over usable clients: push the others to +inf and take the
        # median of the lower ⌈n/2⌉ order statistics.
        masked = jnp.sort(jnp.where(usable, per_client, jnp.inf))
        count = jnp.maximum(jnp.sum(usable), 1)
        return masked[(count - 1) // 2]
    stacked = jnp.transpose(blocks, (1, 0, 2)).reshape(p_red, k * q_red)
    sv = pad_spectrum(prox.singular_values(stacked), min(p, k * q))
    return _gavish_donoho(sv, p, k * q)


def effective_columns(blocks, dims=None, singular_values=None):
    """(K,) columns each block adds to the stacked matrix, for the noise model.

    A full-rank block carries isotropic noise in all its q columns. A block of
    rank c < min(p, q) (a LoRA update B_k A_k) is a p × c matrix in disguise:
    its estimation error lives in its own c directions, so it adds c columns of
    noise to the stack, not q. Noiseless low-rank blocks are rank-deficient too;
    the stacked estimate tells the two apart (shared directions vs a bulk).
    A zero block adds nothing. ``singular_values``: the (K, ·) per-block spectra,
    if already computed.
    """
    k, p_red, q_red = blocks.shape
    p, q = (p_red, q_red) if dims is None else dims
    sv = prox.singular_values(blocks) if singular_values is None else singular_values
    rtol = 1e3 * jnp.finfo(blocks.dtype).eps
    rank = jnp.sum(sv > rtol * sv[:, :1], axis=-1)
    return jnp.where(rank >= min(p, q), q, rank).astype(jnp.int32)


def stack_noise_level(singular_values, p, n_cols):
    """σ̂ of a p × ``n_cols`` stack (n_cols may be traced) from its median singular value.

    Gavish–Donoho on the stack: the median of the first min(p, n_cols) singular
    values (the rest are structural zeros) over √(n μ_β). Valid while the signal
    rank is below half of min(p, n_cols). Returns (σ̂, edge factor √p + √n_cols).
    """
    dtype = singular_values.dtype
    n_cols = jnp.maximum(n_cols, 1)
    rank_limit = jnp.minimum(p, n_cols)
    live = jnp.arange(singular_values.shape[-1]) < rank_limit
    ordered = jnp.sort(jnp.where(live, singular_values, jnp.inf))
    median = ordered[(rank_limit - 1) // 2]
    m_small = jnp.minimum(p, n_cols).astype(dtype)
    n_large = jnp.maximum(p, n_cols).astype(dtype)
    # μ_β depends on a traced shape: interpolate a table (marchenko_pastur_median's values, stored).
    betas = np.linspace(*_marchenko_pastur.MEDIAN_GRID)
    mp = jnp.interp(m_small / n_large, jnp.asarray(betas, dtype), jnp.asarray(_marchenko_pastur.MEDIAN, dtype))
    sigma = median / jnp.sqrt(n_large * mp)
    return sigma, jnp.sqrt(jnp.asarray(p, dtype)) + jnp.sqrt(n_cols.astype(dtype))


def pad_spectrum(singular_values, length):
    """Append zeros to a (..., m) spectrum up to ``length`` (no-op if already that long)."""
    extra = length - singular_values.shape[-1]
    if extra <= 0:
        return singular_values
    return jnp.concatenate([singular_values, jnp.zeros(singular_values.shape[:-1] + (extra,), singular_values.dtype)], -1)


def noise_lambda(num_clients, p, q):
    """λ at which a pure-noise block is exactly at the block threshold μλ: √(pq)/(√p + √(Kq))."""
    return float(np.sqrt(p * q) / float(np.sqrt(p) + np.sqrt(num_clients * q)))


def lambda_grid(num_clients, p, q, num=9):
    """Geometric λ grid covering the window of DESIGN.md §2 for a (K, p, q) problem.

    From 0.3 (below it the low-rank part empties) to max(3, 2·noise λ) (above it
    every block is absorbed into L), dimensionless after normalisation.
    """
    top = max(3.0, 2.0 * noise_lambda(num_clients, p, q))
    return np.geomspace(0.3, top, num)


_BULK_BETAS = np.linspace(*_marchenko_pastur.BULK_GRID)


def _bulk_table():
    """(betas, levels) singular-value quantiles of an m × n noise matrix over √n, β = m/n
    (marchenko_pastur_quantile's values, stored)."""
    return np.sqrt(np.asarray(_marchenko_pastur.BULK))


def bulk_noise_level(singular_values, p, n_cols, rank):
    """σ̂ of a p × ``n_cols`` stack from its bulk, the singular values past ``rank``.

    Where the shared rank nears half of the stack's short side the median singular
    value is signal and :func:`stack_noise_level` reads σ̂ too large. Past r̂ the
    rest is the spectrum of a (p − r̂) × (n − r̂) noise matrix (plus directions too
    weak to pass the edge, which mostly lift its upper half): its quantiles at
    :data:`BULK_LEVELS` over the Marchenko–Pastur law's give one σ̂ each, and their
    median is returned with the misfit, the largest relative departure of any
    level's σ̂ from it (a few percent for Gaussian noise; a bulk of another shape,
    structured or coloured noise, departs further).

    Args:
        singular_values: (m,) descending, every one of the stack's (``rank``, ``n_cols`` may be traced).

    Returns:
        (σ̂, misfit).
    """
    dtype = singular_values.dtype
    n_cols = jnp.maximum(n_cols, 1)
    short = jnp.minimum(p, n_cols)
    rest = jnp.maximum(short - rank, 1)
    rows, cols = jnp.maximum(p - rank, 1).astype(dtype), jnp.maximum(n_cols - rank, 1).astype(dtype)
    wide, beta = jnp.maximum(rows, cols), jnp.minimum(rows, cols) / jnp.maximum(rows, cols)
    levels = jnp.asarray(BULK_LEVELS, dtype)
    # The ascending quantile at level l of the rest is the descending value short − 1 − ⌊l·rest⌋.
    at = short - 1 - jnp.clip(jnp.floor(levels * rest).astype(jnp.int32), 0, rest - 1)
    observed = singular_values[at]
    table = jnp.asarray(_bulk_table(), dtype)
    expected = jnp.stack([jnp.interp(beta, jnp.asarray(_BULK_BETAS, dtype), table[:, j])
                          for j in range(len(BULK_LEVELS))]) * jnp.sqrt(wide)
    sigmas = observed / expected
    sigma = jnp.median(sigmas)
    misfit = jnp.max(jnp.abs(sigmas / jnp.where(sigma > 0, sigma, 1.0) - 1.0))
    return sigma, misfit


def optimal_shrinkage(singular_values, sigma, p, n_cols):
    """(m,) weights w_j that denoise a p × n stack as Σ_j w_j s_j u_j v_jᵀ at noise σ.

    Gavish and Donoho's optimal shrinker for Frobenius loss: with y = s/(σ√N),
    β = min(p, n)/N and N = max(p, n), w = √((y² − β − 1)² − 4β)/y² above the
    edge 1 + √β and 0 below it. A direction just above the noise keeps little of
    itself, a strong one nearly all; per client, Θ̃_k = Σ_j w_j u_j u_jᵀ Θ̂_k.
    """
    dtype = singular_values.dtype
    n_cols = jnp.maximum(n_cols, 1)
    wide = jnp.maximum(p, n_cols).astype(dtype)
    beta = jnp.minimum(p, n_cols).astype(dtype) / wide
    y = singular_values / jnp.maximum(sigma * jnp.sqrt(wide), jnp.finfo(dtype).tiny)
    safe = jnp.where(y > 0, y, 1.0)
    eta = jnp.sqrt(jnp.maximum(jnp.square(jnp.square(y) - beta - 1.0) - 4.0 * beta, 0.0))
    return jnp.where(y > 1.0 + jnp.sqrt(beta), eta / jnp.square(safe), 0.0).astype(dtype)
