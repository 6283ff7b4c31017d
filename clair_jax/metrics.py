"""How good an answer is: subspace distance, detection rates, estimation error."""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["subspace_error", "detection_rates", "relative_error"]


def subspace_error(estimate, truth):
    r"""Distance between the column spaces of two bases, ‖P̂ − P‖_2 = sin θ_max.

    Columns that are entirely zero (padding beyond the estimated rank) are ignored.
    With different dimensions the error is 1 (some direction is missed or extra).

    Args:
        estimate: (..., p, r̂) basis of the estimated subspace (orthonormal columns or zero).
        truth: (..., p, r) orthonormal basis of the true subspace.

    Returns:
        (...,) array in [0, 1].
    """
    p_hat = estimate @ jnp.swapaxes(estimate, -1, -2)
    p_true = truth @ jnp.swapaxes(truth, -1, -2)
    return jnp.linalg.norm(p_hat - p_true, ord=2, axis=(-2, -1))


def detection_rates(predicted_benign, true_benign):
    """Contamination detection rates; "positive" = flagged contaminated.

    Args:
        predicted_benign: (..., K) bool, the verdicts to score.
        true_benign: (..., K) bool, the ground truth.

    Returns:
        dict with ``tpr`` (recall: share of contaminated clients flagged), ``fpr``
        (share of benign clients flagged), ``precision`` and ``f1``. Rates with an
        empty denominator are reported as their ideal value (1 for tpr/precision, 0 for fpr).
    """
    flagged, bad = ~jnp.asarray(predicted_benign), ~jnp.asarray(true_benign)
    tp = jnp.sum(flagged & bad, axis=-1)
    fp = jnp.sum(flagged & ~bad, axis=-1)
    num_bad, num_good = jnp.sum(bad, axis=-1), jnp.sum(~bad, axis=-1)
    tpr = jnp.where(num_bad > 0, tp / jnp.maximum(num_bad, 1), 1.0)
    fpr = jnp.where(num_good > 0, fp / jnp.maximum(num_good, 1), 0.0)
    precision = jnp.where(tp + fp > 0, tp / jnp.maximum(tp + fp, 1), 1.0)
    f1 = jnp.where(precision + tpr > 0, 2 * precision * tpr / (precision + tpr), 0.0)
    return {"tpr": tpr, "fpr": fpr, "precision": precision, "f1": f1}


def relative_error(estimate, truth, axis=(-2, -1)):
    """‖estimate − truth‖_F / ‖truth‖_F over ``axis`` (per client for (..., K, p, q))."""
    num = jnp.linalg.norm(estimate - truth, axis=axis)
    den = jnp.linalg.norm(truth, axis=axis)
    return num / jnp.maximum(den, jnp.finfo(num.dtype).tiny)
