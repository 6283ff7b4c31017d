"""Synthetic federations with a known shared subspace and known contaminated clients.

Benign client k:      Θ_k = s_k · U V_kᵀ + H_k,     U ∈ R^{p×r} orthonormal (shared),
                      V_k ~ N(0, 1/(q r)) so that ‖U V_kᵀ‖_F ≈ 1, s_k a client scale,
                      H_k = heterogeneity · (I − UUᵀ) G_k / ‖G_k‖_F   (off the subspace).
Contaminated client:  Θ_k of the chosen ``kind`` (see :data:`CONTAMINATION_KINDS`).
Observed update:      Θ̂_k = scale · (Θ_k + E_k),  E_k iid N(0, σ²),
                      σ = noise · ‖L*‖_2 / (√p + √(Kq)),

so ``noise`` is the noise level relative to the shared signal, the ratio
σ(√p + √(Kq)) / ‖L*‖_2 of the noise's spectral norm to the signal's: ``noise=1/3``
is the "moderate" end of what the default tuning is built for.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Federation", "make_federation", "CONTAMINATION_KINDS"]

CONTAMINATION_KINDS = (
    "full_rank",       # dense Gaussian block of benign-like norm
    "huge",            # dense block with 1000× the benign norm
    "rank_one",        # a random rank-one block (each client its own direction)
    "off_subspace",    # benign-looking U V_kᵀ plus a large off-subspace part
    "other_task",      # a rank-r block in a second subspace shared by the attackers
    "sign_flip",       # −(benign-looking) update pushed off the subspace
    "mixed",           # each contaminated client draws one of the kinds above
)


class Federation(NamedTuple):
    """A synthetic federation; arrays gain a leading layer axis when ``num_layers`` is set.

    Attributes:
        updates: (…, K, p, q) observed updates Θ̂_k (what clients send).
        clean: (…, K, p, q) noise-free Θ_k (times ``scale``).
        subspace: (…, p, r) the true shared subspace U.
        benign: (K,) bool, the true collaborative set S (the same in every layer).
        sigma: (…,) noise standard deviation per entry (times ``scale``).
    """

    updates: jax.Array
    clean: jax.Array
    subspace: jax.Array
    benign: jax.Array
    sigma: jax.Array


def _orthonormal(key, p, r, dtype):
    q, _ = jnp.linalg.qr(jax.random.normal(key, (p, r), dtype))
    return q


def _unit(x):
    return x / jnp.linalg.norm(x)


def _contaminated_block(kind, key, u, other, p, q, r, dtype, separation):
    ks = jax.random.split(key, 4)
    if kind == "full_rank":
        norm = jnp.exp(jax.random.uniform(ks[0], (), dtype, float(np.log(0.5)), float(np.log(2.0))))
        return norm * _unit(jax.random.normal(ks[1], (p, q), dtype))
    if kind == "huge":
        return 1e3 * _unit(jax.random.normal(ks[1], (p, q), dtype))
    if kind == "rank_one":
        a, b = jax.random.normal(ks[1], (p,), dtype), jax.random.normal(ks[2], (q,), dtype)
        return 1.5 * jnp.outer(_unit(a), _unit(b))
    if kind == "other_task":
        v = jax.random.normal(ks[1], (q, r), dtype) / float(np.sqrt(q * r))
        return other @ v.T
    if kind in ("off_subspace", "sign_flip"):
        v = jax.random.normal(ks[1], (q, r), dtype) / float(np.sqrt(q * r))
        g = jax.random.normal(ks[2], (p, q), dtype)
        off = _unit(g - u @ (u.T @ g))
        sign = -1.0 if kind == "sign_flip" else 1.0
        return sign * (u @ v.T) + separation * off
    raise ValueError(f"kind must be one of {CONTAMINATION_KINDS}, got {kind!r}")


def _layer(key, benign, kinds, *, p, q, r, noise, heterogeneity, client_spread, separation, dtype):
    num_clients = benign.shape[0]
    k_u, k_other, k_v, k_s, k_h, k_c, k_e = jax.random.split(key, 7)
    u = _orthonormal(k_u, p, r, dtype)
    other = _orthonormal(k_other, p, r, dtype)
    v = jax.random.normal(k_v, (num_clients, q, r), dtype) / float(np.sqrt(q * r))
    client_scale = jnp.exp(client_spread * jax.random.normal(k_s, (num_clients,), dtype))
    shared = client_scale[:, None, None] * jnp.einsum("pr,kqr->kpq", u, v)
    g = jax.random.normal(k_h, (num_clients, p, q), dtype)
    off = g - u @ (u.T @ g)
    off = off / jnp.linalg.norm(off, axis=(1, 2), keepdims=True)
    blocks = shared + heterogeneity * off
    c_keys = jax.random.split(k_c, num_clients)
    bad = [_contaminated_block(kinds[k], c_keys[k], u, other, p, q, r, dtype, separation)
           if not benign[k] else None for k in range(num_clients)]
    blocks = jnp.stack([blocks[k] if bad[k] is None else bad[k] for k in range(num_clients)])
    signal = jnp.where(jnp.asarray(benign)[:, None, None], shared, 0.0)
    signal_norm = jnp.linalg.norm(jnp.transpose(signal, (1, 0, 2)).reshape(p, -1), ord=2)
    sigma = noise * signal_norm / float(np.sqrt(p) + np.sqrt(num_clients * q))
    noisy = blocks + sigma * jax.random.normal(k_e, blocks.shape, dtype)
    return noisy, blocks, u, sigma


def make_federation(
    seed: int = 0,
    *,
    num_clients: int = 40,
    p: int = 64,
    q: int = 16,
    rank: int = 4,
    contamination: float = 0.3,
    kind: str = "full_rank",
    noise: float = 0.05,
    heterogeneity: float = 0.0,
    client_spread: float = 0.3,
    separation: float = 1.0,
    num_layers: int | None = None,
    scale: float = 1.0,
    dtype=jnp.float32,
) -> Federation:
    """Draw a reproducible federation from the CLAIR model (DESIGN.md §1).

    Args:
        seed: integer seed; the same seed gives the same federation.
        num_clients: K.
        p: rows of each client's update Θ̂_k (p × q).
        q: columns of each client's update Θ̂_k.
        rank: r, dimension of the shared subspace.
        contamination: fraction of contaminated clients, in [0, 1).
        kind: one of :data:`CONTAMINATION_KINDS`.
        noise: relative noise level σ(√p + √(Kq))/‖L*‖_2 (0 = noiseless).
        heterogeneity: Frobenius norm of each benign client's off-subspace part H_k,
            relative to its shared part (≈ 1).
        client_spread: std of the log client scale s_k (heterogeneous benign norms).
        separation: norm of the off-subspace part of ``off_subspace``/``sign_flip`` attacks.
        num_layers: if given, a leading layer axis; every layer has its own U, the
            contaminated clients are the same in all layers.
        scale: global factor on every update (for scale-equivariance checks).
        dtype: float32 or float64.

    Returns:
        :class:`Federation`.

    Example:
        >>> import clair_jax as cj
        >>> fed = cj.data.make_federation(0, num_clients=16, p=12, q=4, rank=2)
        >>> fed.updates.shape, int(fed.benign.sum())
        ((16, 12, 4), 11)
    """
    if kind not in CONTAMINATION_KINDS:
        raise ValueError(f"kind must be one of {CONTAMINATION_KINDS}, got {kind!r}")
    if not 0.0 <= contamination < 1.0:
        raise ValueError(f"contamination must be in [0, 1), got {contamination}")
    if num_clients < 2:
        raise ValueError(f"num_clients must be >= 2, got {num_clients}")
    if not 1 <= rank <= min(p, num_clients * q):
        raise ValueError(f"rank must be in [1, min(p, K q)], got {rank}")
    rng = np.random.default_rng(seed)
    num_bad = int(round(contamination * num_clients))
    benign = np.ones(num_clients, bool)
    benign[rng.choice(num_clients, num_bad, replace=False)] = False
    base = [k for k in CONTAMINATION_KINDS if k not in ("mixed", "other_task")]
    kinds = [str(rng.choice(base)) if kind == "mixed" else kind for _ in range(num_clients)]
    key = jax.random.PRNGKey(seed)
    layer = lambda k: _layer(  # noqa: E731
        k, benign, kinds, p=p, q=q, r=rank, noise=noise, heterogeneity=heterogeneity,
        client_spread=client_spread, separation=separation, dtype=dtype,
    )
    if num_layers is None:
        noisy, clean, u, sigma = layer(key)
    else:
        outs = [layer(k) for k in jax.random.split(key, num_layers)]
        noisy, clean, u, sigma = (jnp.stack(x) for x in zip(*outs))
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731  (numpy scalars promote under x64)
    return Federation(
        updates=cast(noisy * scale), clean=cast(clean * scale), subspace=cast(u),
        benign=jnp.asarray(benign), sigma=jnp.asarray(sigma * scale, dtype),
    )
