"""Stage 4 of the pipeline: name the contaminated clients.

The score of client k is the share of its update that the decomposition could
not explain by the shared low-rank part, s_k = ‖Ĉ_k‖_F / ‖Θ̂_k‖_F ∈ [0, 1]. Benign
blocks have Ĉ_k = 0 (exactly in the noiseless program, up to noise otherwise);
contaminated blocks keep a large share.

The collaborative set Ŝ = {k : s_k ≤ τ}. With no τ given, τ is put in the widest
gap of the sorted scores that leaves a benign majority; a gap narrower than
``min_gap`` means "no contamination" (every score is in one cluster). Across a λ
grid the λ whose scores split most clearly wins.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from clair_jax.prox import safe_frobenius_norm

__all__ = ["block_scores", "Split", "split_scores", "collaborative_set", "MIN_GAP"]

#: Smallest score gap read as a real split. Benign scores spread in small steps
#: (a K-sized sample of one distribution); a contaminated cluster sits a clear
#: step above them.
MIN_GAP = 0.1


def block_scores(sparse, blocks, usable):
    """s_k = ‖Ĉ_k‖_F/‖Θ̂_k‖_F; clients that are not ``usable`` (non-finite) score 1."""
    norms = safe_frobenius_norm(blocks)
    score = safe_frobenius_norm(sparse) / jnp.where(norms > 0, norms, 1.0)
    return jnp.where(usable & (norms > 0), jnp.clip(score, 0.0, 1.0), 1.0)


class Split(NamedTuple):
    benign: jax.Array      # (K,) bool
    threshold: jax.Array   # τ used
    gap: jax.Array         # width of the gap τ sits in (0 if no split)


def split_scores(scores, usable, min_gap=MIN_GAP):
    """Widest-gap split of one (K,) score vector, keeping a benign majority.

    Clients that are not ``usable`` are contaminated regardless and do not vote.
    """
    k = scores.shape[-1]
    s = jnp.where(usable, scores, jnp.inf)
    ordered = jnp.sort(s)
    n_usable = jnp.sum(usable)
    gaps = ordered[1:] - ordered[:-1]              # gap after the (i+1)-th smallest
    idx = jnp.arange(k - 1)
    # Benign majority: at least half of the usable clients stay on the low side;
    # gaps into the +inf padding are not gaps.
    valid = (2 * (idx + 1) >= n_usable) & (idx + 1 < n_usable)
    gaps = jnp.where(valid, gaps, -jnp.inf)
    best = jnp.argmax(gaps)
    gap = jnp.maximum(gaps[best], 0.0)
    split = gap >= min_gap
    threshold = jnp.where(split, 0.5 * (ordered[best] + ordered[jnp.minimum(best + 1, k - 1)]), jnp.inf)
    return Split(benign=usable & (scores <= threshold), threshold=threshold, gap=jnp.where(split, gap, 0.0))


def collaborative_set(scores, usable=None, threshold=None, min_gap=MIN_GAP):
    """Ŝ for one (K,) score vector: fixed ``threshold`` if given, else the widest-gap rule.

    Example:
        >>> import jax.numpy as jnp, clair_jax as cj
        >>> cj.detect.collaborative_set(jnp.array([0.0, 0.01, 0.0, 0.9, 0.02]))
        Array([ True,  True,  True, False,  True], dtype=bool)
    """
    usable = jnp.ones(scores.shape, bool) if usable is None else usable
    if threshold is not None:
        return usable & (scores <= threshold)
    return split_scores(scores, usable, min_gap).benign
