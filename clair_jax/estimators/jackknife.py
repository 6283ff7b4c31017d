"""A client's own estimate of the noise its coordinates carry along the shared subspace.

Partial pooling (:func:`clair_jax.refine.partial_pool`) shrinks each benign
client's coordinates V_k = ÛᵀΘ̂_k toward the benign centre by how much of their
spread between clients is estimation noise. The updates alone show the noise
off Û, not along it, and the two differ: a ridge classifier's error on the
digits is about 1.4× larger per entry along Û than off it
(``docs/real_data.md``). A client holding its data can measure it: refit
without each group of its samples and see how much the coordinates move (the
delete-a-group jackknife). Only r numbers per client leave the client.
"""

from __future__ import annotations

import numpy as np

__all__ = ["coordinate_noise"]


def coordinate_noise(fit, x, y, basis, *, groups=None, side="left"):
    """(r,) jackknife variance of a client's coordinates along each direction of Û.

    With the client's samples cut into G interleaved groups (sample i in group
    i mod G) and Θ̂_(g) = ``fit`` on all samples but group g,

        ν_j = (G − 1)/G · Σ_g ‖u_jᵀΘ̂_(g) − mean_g u_jᵀΘ̂_(g)‖²,

    the delete-a-group jackknife estimate of Var(u_jᵀΘ̂) summed over the q
    entries of the row: what ``coordinate_noise`` of :func:`clair_jax.clair`
    returns for this client (input units squared).

    Args:
        fit: (x, y) → Θ̂ (p, q), the client's own estimator (numpy or JAX).
        x: (n, ...) the client's inputs. y: (n, ...) its targets (first axis: samples).
        basis: (p, r) Û as the server sends it (``ClairResult.subspace`` of one problem;
            its zero columns give zero).
        groups: G, at most n (default n: leave one sample out).
        side: ``"left"`` (coordinates ÛᵀΘ̂) or ``"right"`` (ÛᵀΘ̂ᵀ), as in :func:`clair_jax.clair`.

    Returns:
        (r,) numpy array, ν_j ≥ 0.

    Example:
        >>> import numpy as np
        >>> from clair_jax.estimators import coordinate_noise
        >>> rng = np.random.default_rng(0)
        >>> x = rng.standard_normal((200, 4)); y = x @ np.ones((4, 2)) + 0.5 * rng.standard_normal((200, 2))
        >>> ols = lambda a, b: np.linalg.lstsq(a, b, rcond=None)[0]
        >>> nu = coordinate_noise(ols, x, y, np.eye(4)[:, :1])
        >>> bool(0.001 < nu[0] < 0.005)   # σ² q / n = 0.25 · 2 / 200 = 0.0025
        True
    """
    x, y, basis = np.asarray(x), np.asarray(y), np.asarray(basis)
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if basis.ndim != 2:
        raise ValueError(f"basis must be a (p, r) matrix (one problem's Û), got shape {basis.shape}")
    n = x.shape[0] if x.ndim else 0
    if y.ndim == 0 or y.shape[0] != n:
        raise ValueError(f"x and y must hold the same samples on their first axis, got {x.shape} and {y.shape}")
    g = n if groups is None else groups
    if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or not 2 <= g <= n:
        raise ValueError(f"groups must be an integer in [2, n = {n}] (and the client needs at least 2 samples), "
                         f"got {groups!r}")
    coords = []
    for j in range(g):
        keep = np.arange(n) % g != j
        theta = np.asarray(fit(x[keep], y[keep]), np.float64)
        theta = theta.T if side == "right" else theta
        if theta.ndim != 2 or theta.shape[0] != basis.shape[0]:
            raise ValueError(f"fit must return a matrix with {basis.shape[0]} rows to match basis "
                             f"{basis.shape} (side={side!r}), got shape {theta.shape}")
        coords.append(basis.T.astype(np.float64) @ theta)                 # (r, q)
    coords = np.stack(coords)
    return (g - 1) / g * np.sum(np.square(coords - coords.mean(axis=0)), axis=(0, 2))
