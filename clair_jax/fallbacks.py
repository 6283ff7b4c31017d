"""Never worse than local: how much of its own update a refined client keeps.

Three rules guard the projection Θ̃_k = ÛÛᵀΘ̂_k where the model's evidence is
thin: a client keeps the share α_k of its off-subspace part that noise at σ̂
cannot explain (:func:`local_share`); a flagged client whose update looks like
an honest one under heavier noise is projected anyway (:func:`noise_like`); and
where r̂ is so large that the median singular value, which σ̂ is read from, may
be signal (:func:`crowded`), σ̂ is read again from the spectrum's bulk past r̂
and the shared directions are shrunk by how far each stands above the noise
(:func:`bulk_shrinkage`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clair_jax._compile import program
from clair_jax.prox import singular_values
from clair_jax.robust import masked_median, robust_units, scaled_norms, size_exponent
from clair_jax.tuning import bulk_noise_level, optimal_shrinkage, stack_noise_level

__all__ = ["local_share", "noise_like", "crowded", "bulk_shrinkage", "LOCAL_SLACK", "NOISY_FLAT", "NOISY_Z",
           "CROWDED_SHARE", "BULK_PASSES"]

def _off_subspace(basis, blocks):
    """Blocks in robust units (:func:`clair_jax.detect.robust_units`), the unit, their
    coordinates ÛᵀΘ̂_k, residuals (I − ÛÛᵀ)Θ̂_k and residual energies."""
    x, unit = robust_units(blocks, jnp.ones(blocks.shape[0], bool))
    inside = jnp.einsum("pr,kpq->krq", basis, x)
    resid = x - basis @ inside
    return x, unit, inside, resid, jnp.sum(jnp.square(resid), axis=(-2, -1))



#: A refined client keeps none of its off-subspace part while that part is within
#: LOCAL_SLACK χ² standard deviations of what noise at σ̂ leaves there (:func:`local_share`).
LOCAL_SLACK = 3.0


def local_share(basis, blocks, rank, sigma, columns, p, used=None, slack=LOCAL_SLACK):
    """(K,) share α_k of its off-subspace part each client keeps: 0 = projected, 1 = local.

    The rule that makes refinement never worse than the local update by more
    than the estimation noise. Client k's off-subspace energy
    e_k = ‖(I − ÛÛᵀ)Θ̂_k‖² is compared with what noise alone would leave there,
    N_k = σ̂²(p − r̂)·n_k (n_k its noise columns):

        α_k = clip(1 − c·N_k/e_k, 0, 1),  c = 1 + ``slack``·√(2/((p − r̂)n_k)).

    Pure noise off the subspace (e_k ≈ N_k, within ``slack`` χ² standard
    deviations) gives α_k = 0: the plain projection. Signal the client clearly
    carries outside Û (a true direction Û missed, with few clients or a rank
    near Kq/2; its own heterogeneity) gives α_k → 1, so that part is kept, as
    in James–Stein shrinkage toward the subspace. On noiseless data (σ̂ = 0)
    every client keeps its exact update. Scale free (blocks are brought to the
    median client norm first). Where the ``used`` set's noise grows with the
    updates' sizes (:func:`clair_jax.detect.size_exponent` β > 0), σ̂ is read as a
    median-sized client's level and N_k grows by (‖Θ̂_k‖²/m)^β, so a large
    client's larger noise is projected away rather than kept as missed signal.

    Args:
        basis: (p', r_max) Û (columns past r̂ zero). blocks: (K, p', q').
        rank: r̂. sigma: σ̂ per entry, in the blocks' units. columns: (K,) noise columns.
        p: the dense row count (p' may be a reduction's).
        used: (K,) the set Û was fitted on (default: every client).
    """
    x, unit, _, _, energy = _off_subspace(basis, blocks)
    dof = jnp.maximum((p - rank) * columns, 1).astype(x.dtype)
    # Where the set's noise grows with its updates' sizes (detect.size_exponent),
    # σ̂ is the level of a typical-sized client and a larger one's noise is larger.
    used = jnp.ones(x.shape[0], bool) if used is None else used
    norms2 = jnp.square(scaled_norms(x))
    beta = size_exponent(energy, norms2, used)
    size = jnp.where(norms2 > 0, norms2 / masked_median(norms2, used & (norms2 > 0)), 1.0)
    noise = jnp.square(sigma / unit) * dof * jnp.power(size, beta)
    c = 1.0 + slack * jnp.sqrt(2.0 / dof)
    share = 1.0 - c * noise / jnp.where(energy > 0, energy, 1.0)
    return jnp.where(energy > 0, jnp.clip(share, 0.0, 1.0), 0.0).astype(x.dtype)


#: A residual is noise-like when its top squared singular value is at most
#: NOISY_FLAT × what isotropic noise of the same energy gives, σ_k²(√(p − r̂) + √c_k)².
NOISY_FLAT = 1.5

#: ... and the client carries the shared signal when its energy inside Û exceeds what
#: its own noise level puts there, σ_k² r̂ c_k, by NOISY_Z χ² standard deviations.
NOISY_Z = 5.0


def noise_like(basis, blocks, rank, columns, p, *, flat=NOISY_FLAT, z=NOISY_Z):
    """(K,) clients that look like an honest update under heavier noise.

    Client k's residual R_k = (I − ÛÛᵀ)Θ̂_k gives its own noise level
    σ_k² = ‖R_k‖²/((p − r̂)c_k) (c_k its noise columns). It is noise-like when
    R_k's spectrum is flat (‖R_k‖_2² ≤ ``flat``·σ_k²(√(p − r̂) + √c_k)², as for
    isotropic noise: a wrong task or an attack that leaves the subspace is
    structured and concentrates in a few directions) *and* the client carries the
    shared signal (its energy inside Û exceeds σ_k² r̂ c_k, what that noise puts
    there, by ``z`` χ² standard deviations; a Gaussian update carries none). Such
    a flagged client (a much noisier estimate, an honest client far larger than
    the rest) is still left out of Û, but its update is refined by projection:
    its off-subspace part is its own noise.

    Args:
        basis: (p', r_max) Û (columns past r̂ zero). blocks: (K, p', q'). rank: r̂.
        columns: (K,) noise columns. p: the dense row count (p' may be a reduction's).
    """
    x, _, inside, resid, energy = _off_subspace(basis, blocks)
    cols = jnp.maximum(columns, 1).astype(x.dtype)
    sigma2 = energy / (jnp.maximum(p - rank, 1) * cols)
    top = jnp.square(singular_values(resid)[:, 0])
    is_flat = top <= flat * sigma2 * jnp.square(jnp.sqrt(jnp.maximum(p - rank, 1).astype(x.dtype)) + jnp.sqrt(cols))
    shared = jnp.sum(jnp.square(inside), axis=(-2, -1)) >= sigma2 * rank * cols * (
        1.0 + z * jnp.sqrt(2.0 / jnp.maximum(rank * cols, 1.0)))
    return is_flat & shared & (energy > 0) & (rank > 0)


#: r̂ at this share of min(p, the refined clients' noise columns) or above means
#: the stack's median singular value, from which σ̂ is read, may be signal.
CROWDED_SHARE = 0.2


@program(static_argnames=("p", "share"))
def crowded(ranks, used, columns, p, share=CROWDED_SHARE):
    """(n,) problems whose r̂ is at least ``share`` × min(p, Σ_used noise columns).

    σ̂ comes from the benign stack's median singular value, which is noise only
    while the shared rank stays below half of the stack's short side. A flat
    signal of rank Kq/2 is read as r̂ ≈ 0.23–0.25·Kq with σ̂ 1.5× the true level
    (the zoo's "rank 20 = Kq/2" row): an r̂ past a fifth of the short side says
    the true rank may be near half of it, where σ̂ cannot tell the directions
    Û missed from noise.

    Example:
        >>> import jax.numpy as jnp, clair_jax as cj
        >>> used = jnp.ones((2, 10), bool)
        >>> cj.refine.crowded(jnp.array([3, 9]), used, jnp.full((2, 10), 4), 48).tolist()
        [False, True]
    """
    n = jnp.sum(jnp.where(used, columns, 0), axis=-1)
    return (ranks > 0) & (ranks >= share * jnp.minimum(p, n))


#: The crowded σ̂ and r̂ are read by alternating BULK_PASSES times: r̂ the directions
#: above the noise edge at σ̂, σ̂ the bulk past r̂ (:func:`bulk_shrinkage`).
BULK_PASSES = 20


def bulk_shrinkage(singular_values, p, n_cols, passes=BULK_PASSES):
    """(σ̂, (m,) weights) for a crowded stack: σ̂ from the bulk, optimal shrinkage at it.

    Where the shared rank nears half of the stack's short side, the stack's median
    singular value is signal: σ̂ read from it is too large (1.2–1.8× on a flat
    rank Kq/2), r̂ misses true directions and σ̂ cannot tell them from noise. Here
    σ̂ and r̂ are read together: r̂ counts the singular values above the noise edge
    σ̂(√p + √n), σ̂ is read from the bulk past r̂
    (:func:`clair_jax.tuning.bulk_noise_level`), ``passes`` times from the median's
    σ̂; the stack is then denoised by Gavish and Donoho's optimal shrinker at that
    σ̂ (:func:`clair_jax.tuning.optimal_shrinkage`): a direction just above the
    edge keeps little of itself, a strong one nearly all, so directions near the
    noise cost little when they are noise and give part of their signal when
    they are not.

    Args:
        singular_values: (m,) descending, the stack's, in the input's units.
        p: rows. n_cols: the stack's noise columns (may be traced).
    """
    sigma = stack_noise_level(singular_values, p, n_cols)[0]
    dtype = singular_values.dtype
    edge = jnp.sqrt(jnp.asarray(p, dtype)) + jnp.sqrt(jnp.maximum(n_cols, 1).astype(dtype))

    def reread(_, sigma):
        rank = jnp.sum(singular_values > sigma * edge)
        return bulk_noise_level(singular_values, p, n_cols, rank)[0]

    sigma = jax.lax.fori_loop(0, passes, reread, sigma)
    return sigma, optimal_shrinkage(singular_values, sigma, p, n_cols)
