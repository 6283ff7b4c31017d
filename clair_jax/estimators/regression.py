"""Stage 1 of the pipeline for linear models: preliminary local estimators.

Client k holds (X_k, Y_k) with X_k ∈ R^{n_k×p}, Y_k ∈ R^{n_k×q} and

    Y_k = X_k Θ_k + ε_k,   ε_k iid N(0, σ²).

Its preliminary estimate Θ̂_k ∈ R^{p×q} is the OLS or ridge fit on its own data.
All K clients are fitted in one jitted, vmapped call. Unequal sample sizes are
handled by padding every client to n_max = max_k n_k rows and carrying a
(K, n_max) mask: padded rows are zeroed before the fit, so they contribute
nothing to XᵀX or XᵀY and the result equals the fit on the unpadded data.

With q = 1 (one response per client, ordinary multi-task regression) pass Y as
(K, n) and get (K, p) coefficient vectors back, or as (K, n, 1) and get (K, p, 1)
blocks ready for :func:`clair_jax.clair`.

The module also simulates federations of regression clients, including the
data-poisoning kinds of contamination (shuffled responses, another task, heavy
noise, sign-flipped responses) on top of any coefficient matrices Θ_k.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clair_jax._compile import program

__all__ = [
    "RegressionData",
    "pad_clients",
    "fit_ols",
    "fit_ridge",
    "ols",
    "ridge",
    "simulate_regression",
    "prediction_mse",
    "POISON_KINDS",
]

#: Data-poisoning kinds understood by :func:`simulate_regression`.
POISON_KINDS = ("none", "shuffled", "other_task", "heavy_noise", "sign_flip")


class RegressionData(NamedTuple):
    """Padded per-client regression data.

    Attributes:
        x: (K, n_max, p) design matrices, zero on padded rows.
        y: (K, n_max, q) responses (or (K, n_max) for q = 1), zero on padded rows.
        mask: (K, n_max) bool, True on real rows.
    """

    x: jax.Array
    y: jax.Array
    mask: jax.Array

    @property
    def num_samples(self):
        """(K,) int: n_k, the number of real rows of each client."""
        return jnp.sum(self.mask, axis=-1)


# --------------------------------------------------------------------------- checks


def _check_xy(x, y, mask):
    """Validates shapes; returns (x, y, mask, squeeze) with y always (K, n, q)."""
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    if x.ndim != 3:
        raise ValueError(f"x must have shape (K, n, p); got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a floating array; got dtype {x.dtype}")
    squeeze = y.ndim == 2
    if squeeze:
        y = y[..., None]
    if y.ndim != 3:
        raise ValueError(f"y must have shape (K, n, q) or (K, n); got shape {y.shape}")
    if y.shape[:2] != x.shape[:2]:
        raise ValueError(
            f"y must have the same (K, n) leading axes as x {x.shape[:2]}; got {y.shape[:2]}"
        )
    y = y.astype(x.dtype)
    if mask is None:
        mask = jnp.ones(x.shape[:2], dtype=bool)
    else:
        mask = jnp.asarray(mask)
        if mask.shape != x.shape[:2]:
            raise ValueError(f"mask must have shape (K, n) = {x.shape[:2]}; got {mask.shape}")
        mask = mask.astype(bool)
    return x, y, mask, squeeze


def pad_clients(xs: Sequence, ys: Sequence, dtype=None) -> RegressionData:
    """Pads per-client arrays of unequal length into one batch with a mask.

    Args:
        xs: K arrays, xs[k] of shape (n_k, p).
        ys: K arrays, ys[k] of shape (n_k, q) or (n_k,).
        dtype: dtype of the padded arrays (default: that of xs[0]).

    Returns:
        :class:`RegressionData` with x (K, n_max, p), y (K, n_max, q) (or
        (K, n_max) when the ys are vectors) and mask (K, n_max).

    Example:
        >>> import numpy as np
        >>> data = pad_clients([np.ones((3, 2)), np.ones((5, 2))],
        ...                    [np.ones((3, 1)), np.ones((5, 1))])
        >>> data.x.shape, data.num_samples.tolist()
        ((2, 5, 2), [3, 5])
    """
    if len(xs) != len(ys):
        raise ValueError(f"xs and ys must hold one array per client; got {len(xs)} and {len(ys)}")
    if len(xs) == 0:
        raise ValueError("xs must hold at least one client")
    xs = [np.asarray(a) for a in xs]
    ys = [np.asarray(a) for a in ys]
    p = xs[0].shape[-1]
    vector = ys[0].ndim == 1
    for k, (a, b) in enumerate(zip(xs, ys)):
        if a.ndim != 2 or a.shape[1] != p:
            raise ValueError(f"xs[{k}] must have shape (n_k, {p}); got {a.shape}")
        if b.ndim != (1 if vector else 2) or b.shape[0] != a.shape[0]:
            raise ValueError(f"ys[{k}] must have {a.shape[0]} rows like xs[{k}]; got shape {b.shape}")
        if not vector and b.shape[1] != ys[0].shape[1]:
            raise ValueError(f"ys[{k}] must have q = {ys[0].shape[1]} columns; got {b.shape[1]}")
    dtype = dtype or (xs[0].dtype if np.issubdtype(xs[0].dtype, np.floating) else np.float32)
    n_max = max(a.shape[0] for a in xs)
    k = len(xs)
    x = np.zeros((k, n_max, p), dtype)
    y = np.zeros((k, n_max) + ys[0].shape[1:], dtype)
    mask = np.zeros((k, n_max), bool)
    for i, (a, b) in enumerate(zip(xs, ys)):
        x[i, : a.shape[0]] = a
        y[i, : a.shape[0]] = b
        mask[i, : a.shape[0]] = True
    return RegressionData(jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask))


# --------------------------------------------------------------------------- one client


def ols(x, y, mask):
    """OLS fit of one client: argmin_Θ ‖W(Y − XΘ)‖_F², W = diag(mask).

    Minimum-norm solution (via an SVD-based least squares) when XᵀWX is singular.

    Args:
        x: (n, p) design.
        y: (n, q) responses.
        mask: (n,) bool, True on real rows.

    Returns:
        (p, q) coefficients.
    """
    w = mask.astype(x.dtype)[:, None]
    theta, *_ = jnp.linalg.lstsq(x * w, y * w)
    return theta


def ridge(x, y, mask, alpha):
    """Ridge fit of one client: argmin_Θ ½‖W(Y − XΘ)‖_F² + ½ α ‖Θ‖_F².

    Closed form (XᵀWX + αI)⁻¹ XᵀWY through a Cholesky factorisation.

    Args:
        x: (n, p) design.
        y: (n, q) responses.
        mask: (n,) bool, True on real rows.
        alpha: scalar ridge strength, > 0.

    Returns:
        (p, q) coefficients.
    """
    w = mask.astype(x.dtype)[:, None]
    xw = x * w
    gram = xw.T @ xw + alpha * jnp.eye(x.shape[1], dtype=x.dtype)
    chol = jax.scipy.linalg.cho_factor(gram, lower=True)
    return jax.scipy.linalg.cho_solve(chol, xw.T @ (y * w))


_fit_ols = program(jax.vmap(ols))
_fit_ridge = program(jax.vmap(ridge))


# --------------------------------------------------------------------------- all clients


def fit_ols(x, y, mask=None):
    """Local OLS estimates of all K clients in one vmapped, jitted call.

    Θ̂_k = argmin_Θ Σ_{i ≤ n_k} ‖y_{k,i} − Θᵀx_{k,i}‖², minimum-norm if n_k < p.

    Args:
        x: (K, n_max, p) designs (padded rows are ignored where ``mask`` is False).
        y: (K, n_max, q) responses, or (K, n_max) for q = 1.
        mask: optional (K, n_max) bool, True on real rows (default: all real).

    Returns:
        (K, p, q) coefficient blocks, or (K, p) when y is (K, n_max).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x = jax.random.normal(jax.random.key(0), (3, 20, 4))
        >>> theta = jnp.ones((3, 4, 2))
        >>> est = fit_ols(x, x @ theta)
        >>> bool(jnp.allclose(est, theta, atol=1e-4))
        True
    """
    x, y, mask, squeeze = _check_xy(x, y, mask)
    theta = _fit_ols(x, y, mask)
    return theta[..., 0] if squeeze else theta


def fit_ridge(x, y, mask=None, *, alpha=1.0):
    """Local ridge estimates of all K clients in one vmapped, jitted call.

    Θ̂_k = argmin_Θ ½ Σ_{i ≤ n_k} ‖y_{k,i} − Θᵀx_{k,i}‖² + ½ α_k ‖Θ‖_F².

    Args:
        x: (K, n_max, p) designs.
        y: (K, n_max, q) responses, or (K, n_max) for q = 1.
        mask: optional (K, n_max) bool, True on real rows.
        alpha: ridge strength, a positive scalar or a (K,) array (one per client).

    Returns:
        (K, p, q) coefficient blocks, or (K, p) when y is (K, n_max).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x = jax.random.normal(jax.random.key(0), (3, 20, 4))
        >>> fit_ridge(x, x @ jnp.ones((3, 4, 2)), alpha=0.1).shape
        (3, 4, 2)
    """
    x, y, mask, squeeze = _check_xy(x, y, mask)
    alpha = jnp.asarray(alpha, x.dtype)
    if alpha.ndim == 0:
        alpha = jnp.broadcast_to(alpha, x.shape[:1])
    if alpha.shape != x.shape[:1]:
        raise ValueError(f"alpha must be a scalar or have shape (K,) = {x.shape[:1]}; got {alpha.shape}")
    if not bool(jnp.all(alpha > 0)):
        raise ValueError("alpha must be > 0 (use fit_ols for the unpenalised fit)")
    theta = _fit_ridge(x, y, mask, alpha)
    return theta[..., 0] if squeeze else theta


# --------------------------------------------------------------------------- simulation


def simulate_regression(
    key,
    theta,
    num_samples,
    *,
    noise=1.0,
    poisoned=None,
    poison="shuffled",
    heavy_noise_factor=10.0,
    num_test=0,
):
    """Draws per-client regression data Y_k = X_k Θ_k + ε_k, with data poisoning.

    X_k has iid N(0, 1) entries (isotropic design) and ε_k iid N(0, noise²).
    Clients marked in ``poisoned`` get corrupted *training* data:

    * ``"shuffled"``: responses permuted across rows (the X–Y link is broken);
    * ``"other_task"``: responses from another task, Θ'_k with iid N(0, s²)
      entries, s matching the scale of Θ_k;
    * ``"heavy_noise"``: noise ``heavy_noise_factor`` times larger;
    * ``"sign_flip"``: responses negated.

    Test data (if ``num_test`` > 0) is always clean: it measures how well each
    client's *true* task is learned.

    Args:
        key: PRNG key.
        theta: (K, p, q) true coefficients.
        num_samples: int, or (K,) ints n_k (unequal sizes are padded + masked).
        noise: noise standard deviation σ.
        poisoned: optional (K,) bool, True for clients whose data is poisoned.
        poison: one of :data:`POISON_KINDS`, or a length-K sequence of them.
        heavy_noise_factor: noise multiplier of ``"heavy_noise"`` clients.
        num_test: rows of clean held-out data per client.

    Returns:
        (train, test): :class:`RegressionData`; test is None when num_test = 0.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> train, _ = simulate_regression(jax.random.key(0), jnp.zeros((4, 3, 2)), [5, 6, 7, 8])
        >>> train.x.shape, train.num_samples.tolist()
        ((4, 8, 3), [5, 6, 7, 8])
    """
    theta = jnp.asarray(theta)
    if theta.ndim != 3:
        raise ValueError(f"theta must have shape (K, p, q); got {theta.shape}")
    k, p, q = theta.shape
    dtype = theta.dtype if jnp.issubdtype(theta.dtype, jnp.floating) else jnp.float32
    n = np.broadcast_to(np.asarray(num_samples), (k,)).astype(int)
    if np.any(n < 1):
        raise ValueError(f"num_samples must be ≥ 1 for every client; got {n.tolist()}")
    n_max = int(n.max())
    theta = theta.astype(dtype)
    if poisoned is None:
        poisoned = np.zeros(k, bool)
    poisoned = np.asarray(poisoned, bool)
    if poisoned.shape != (k,):
        raise ValueError(f"poisoned must have shape (K,) = ({k},); got {poisoned.shape}")
    kinds = [poison] * k if isinstance(poison, str) else list(poison)
    if len(kinds) != k or any(kd not in POISON_KINDS for kd in kinds):
        raise ValueError(f"poison must be one of {POISON_KINDS} or K of them; got {poison!r}")
    kinds = [kd if bad else "none" for kd, bad in zip(kinds, poisoned)]
    code = jnp.asarray([POISON_KINDS.index(kd) for kd in kinds])

    return _simulate(key, theta, jnp.asarray(n), code, noise, heavy_noise_factor, n_max, int(num_test))


@program(static_argnums=(6, 7))
def _simulate(key, theta, n, code, noise, heavy_noise_factor, n_max, num_test):
    k, p, q = theta.shape
    dtype = theta.dtype
    mask = jnp.arange(n_max)[None, :] < n[:, None]
    kx, ke, kp, ko, kt = jax.random.split(key, 5)
    x = jax.random.normal(kx, (k, n_max, p), dtype)
    eps = noise * jax.random.normal(ke, (k, n_max, q), dtype)
    scale = jnp.sqrt(jnp.mean(jnp.square(theta), axis=(1, 2), keepdims=True))
    other = scale * jax.random.normal(ko, theta.shape, dtype)
    task = jnp.where((code == POISON_KINDS.index("other_task"))[:, None, None], other, theta)
    sigma = jnp.where(code == POISON_KINDS.index("heavy_noise"), heavy_noise_factor, 1.0)
    y = jnp.einsum("knp,kpq->knq", x, task) + sigma[:, None, None].astype(dtype) * eps
    y = jnp.where((code == POISON_KINDS.index("sign_flip"))[:, None, None], -y, y)

    # Shuffle real rows only: a random permutation of the first n_k indices.
    def permute(kk, yk, nk):
        keys = jax.random.uniform(kk, (n_max,))
        keys = jnp.where(jnp.arange(n_max) < nk, keys, 2.0 + jnp.arange(n_max))
        return yk[jnp.argsort(keys)]

    shuffled = jax.vmap(permute)(jax.random.split(kp, k), y, n)
    y = jnp.where((code == POISON_KINDS.index("shuffled"))[:, None, None], shuffled, y)
    m = mask[..., None].astype(dtype)
    train = RegressionData(x * m, y * m, mask)
    test = None
    if num_test:
        k1, k2 = jax.random.split(kt)
        xt = jax.random.normal(k1, (k, num_test, p), dtype)
        yt = jnp.einsum("knp,kpq->knq", xt, theta) + noise * jax.random.normal(k2, (k, num_test, q), dtype)
        test = RegressionData(xt, yt, jnp.ones((k, num_test), bool))
    return train, test


def prediction_mse(theta_hat, data: RegressionData):
    """Per-client mean squared prediction error on (held-out) data.

    MSE_k = Σ_i mask_ki ‖y_ki − Θ̂_kᵀ x_ki‖² / (n_k q).

    Args:
        theta_hat: (K, p, q) estimates (or (K, p) for q = 1).
        data: :class:`RegressionData` with y of matching q.

    Returns:
        (K,) per-client MSE.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> _, test = simulate_regression(jax.random.key(0), jnp.ones((2, 3, 1)), 5, noise=0.0, num_test=10)
        >>> prediction_mse(jnp.ones((2, 3, 1)), test).tolist()
        [0.0, 0.0]
    """
    theta_hat = jnp.asarray(theta_hat)
    y = data.y if data.y.ndim == 3 else data.y[..., None]
    if theta_hat.ndim == 2:
        theta_hat = theta_hat[..., None]
    if theta_hat.shape[0] != data.x.shape[0] or theta_hat.shape[1] != data.x.shape[2]:
        raise ValueError(
            f"theta_hat must have shape (K, p, q) = ({data.x.shape[0]}, {data.x.shape[2]}, q); got {theta_hat.shape}"
        )
    resid = y - jnp.einsum("knp,kpq->knq", data.x, theta_hat)
    m = data.mask.astype(resid.dtype)
    return jnp.sum(jnp.sum(jnp.square(resid), -1) * m, -1) / (jnp.sum(m, -1) * y.shape[-1])
