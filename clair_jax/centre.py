r"""Stage 6b: pooling toward the benign centre in the whole space (``pooling="centre"``).

The projection Û Ûᵀ Θ̂_k removes a client's error off the shared subspace but
keeps all of its error inside it, and it drops what the honest clients share
outside Û. On the LoRA updates of a real LLM, where the honest stacks are far
from low-rank (q and k projections), that is most of what averaging gains.
Pooling toward the centre keeps both:

    Θ̃_k = C + λ_k (Θ̂_k − C),    λ_k = (1 − ν_k / ‖Θ̂_k − C‖²_F)₊,

per problem (module), with λ_k kept at or above ``floor`` (:data:`OWN_FLOOR`, ½), where

* C = Σ_j w_j Θ̂_j is the geometric median of the collaborative set's refined
  updates (Weiszfeld weights w_j ∝ 1/‖Θ̂_j − C‖ over Ŝ): a contaminated client
  the verdict let in pulls the centre by a bounded amount, not by its norm;
* ν_k = E‖E_k‖²_F is the energy of client k's estimation noise, and λ_k the
  positive-part James–Stein weight: a client whose distance from the centre is
  all noise gets the centre, one far from it beyond its noise keeps most of its
  own update.

Why the floor. For squared error the risk of λ is (1 − λ)²‖S_k‖² + λ²ν_k (S_k
the client's true distance from the centre); at λ = ½ it is (‖S_k‖² + ν_k)/4,
below local's ν_k whenever ‖S_k‖² < 3ν_k, and the James–Stein λ takes over
above ½ (‖S_k‖² > ν_k). Below ½ the gain is small and rests entirely on ν_k
being right and on the centre being the client's: on the LoRA updates of a real
LLM (docs/llm.md) the measured noise is about the whole distance to the centre,
James–Stein then pools nearly fully, and the clients with the most distinctive
data lose perplexity against their own adapter, while λ = ½ gains on every
honest client. So a client is never pulled more than halfway.

ν_k comes from one of two reports a LoRA client can afford (without either,
every served client gets λ = ``floor``):

* ``update_noise``: measured — :func:`noise_from_halves` reads it from two
  trainings on the halves of the client's data (each half-data update carries
  twice the full-data variance, so (Θ̂^a − Θ̂^b)/2 carries it once): one more
  training, no jackknife;
* ``client_sizes``: the number of training examples n_k (what FedAvg weights
  by). The server fits ‖Θ̂_k − C‖² = τ² + c / n_k over Ŝ by least squares (the
  spread between honest clients plus noise that falls as 1/n) and uses
  ν_k = ĉ / n_k. Needs clients of different sizes; with all sizes equal ĉ is not
  identified and the clients are pooled as without a report (a warning says so).

Contaminated clients never enter C and keep their update. Nothing is formed
densely for LoRA input: the clients' Gram matrix ⟨Θ̂_i, Θ̂_j⟩ = tr(B_iᵀB_j A_jA_iᵀ)
gives the weights and every distance, and C is truncated to rank r_c from the
weighted factors (QR of the stacked factors, SVD of the small core);
B̃_k = [λ_k B_k, (1 − λ_k) B_C], Ã_k = [A_k; A_C] has rank r + r_c.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clair_jax.lora import LoRAFactors

__all__ = ["CentrePooling", "noise_from_halves", "gram", "geometric_median_weights", "centre_factors",
           "james_stein", "size_noise", "pool_toward_centre", "CENTRE_RANK", "OWN_FLOOR", "WEISZFELD_STEPS"]

#: Default rank of the truncated centre for LoRA input, in units of the clients' largest LoRA rank.
CENTRE_RANK = 2
#: The least weight a served client's own update keeps (see the module docstring: never more than halfway).
OWN_FLOOR = 0.5
#: Weiszfeld iterations for the geometric median (each is a K × K product).
WEISZFELD_STEPS = 64


class CentrePooling(NamedTuple):
    """What :func:`pool_toward_centre` did, per problem.

    Attributes:
        refined: the pooled updates (array, or LoRAFactors of rank r + r_c).
        weight: (..., K) λ_k, the weight each client's own update keeps (1 for
            clients not pooled: they keep Θ̂_k).
        centre_weights: (..., K) w_j, each client's weight in the centre C.
        deviation: (..., K) ‖Θ̂_k − C‖²_F.
        noise: (..., K) ν_k used.
    """

    refined: object
    weight: jax.Array
    centre_weights: jax.Array
    deviation: jax.Array
    noise: jax.Array


def james_stein(deviation, noise):
    """λ = (1 − ν / d)₊ (1 where d = 0)."""
    safe = jnp.where(deviation > 0, deviation, 1.0)
    return jnp.where(deviation > 0, jnp.clip(1.0 - noise / safe, 0.0, 1.0), 1.0)


def _factored_inner(b1, a1, b2, a2):
    """⟨B1 A1, B2 A2⟩_F = tr((B1ᵀB2)(A2A1ᵀ)) over the last two axes."""
    return jnp.einsum("...rs,...sr->...", jnp.swapaxes(b1, -1, -2) @ b2, a2 @ jnp.swapaxes(a1, -1, -2))


def noise_from_halves(half_a, half_b):
    """ν_k = ‖(Θ̂_k^a − Θ̂_k^b) / 2‖²_F from two trainings on disjoint halves of each client's data.

    Args:
        half_a: (..., K, p, q) array or :class:`~clair_jax.LoRAFactors`, the updates
            trained on the first half of each client's data.
        half_b: the same on the second half (the same kind and rank).

    Returns:
        (..., K) the noise energy of a full-data update, in the updates' units squared.

    Example:
        >>> import jax.numpy as jnp, clair_jax as cj
        >>> a = jnp.zeros((3, 4, 2)); b = a.at[:, 0, 0].set(2.0)
        >>> cj.centre.noise_from_halves(a, b).tolist()
        [1.0, 1.0, 1.0]
    """
    if isinstance(half_a, LoRAFactors) != isinstance(half_b, LoRAFactors):
        raise TypeError("half_a and half_b must both be arrays or both LoRAFactors")
    if isinstance(half_a, LoRAFactors):
        b = jnp.concatenate([jnp.asarray(half_a.B), -jnp.asarray(half_b.B)], axis=-1) / 2.0
        a = jnp.concatenate([jnp.asarray(half_a.A), jnp.asarray(half_b.A)], axis=-2)
        return _factored_inner(b, a, b, a)
    diff = (jnp.asarray(half_a) - jnp.asarray(half_b)) / 2.0
    return jnp.sum(diff * diff, axis=(-2, -1))


def gram(updates):
    """(..., K, K) ⟨Θ̂_i, Θ̂_j⟩_F, from dense updates or from LoRA factors (no p × q matrix)."""
    if isinstance(updates, LoRAFactors):
        b, a = updates.B, updates.A
        bb = jnp.einsum("...ipr,...jps->...ijrs", b, b)
        aa = jnp.einsum("...jsq,...irq->...ijsr", a, a)
        return jnp.einsum("...ijrs,...ijsr->...ij", bb, aa)
    x = jnp.asarray(updates)
    return jnp.einsum("...ipq,...jpq->...ij", x, x)


def _distances(g, w):
    """‖Θ̂_k − Σ_j w_j Θ̂_j‖² for every k from the Gram matrix."""
    gw = g @ w
    return jnp.maximum(jnp.diagonal(g) - 2.0 * gw + w @ gw, 0.0)


def geometric_median_weights(g, members, steps=WEISZFELD_STEPS):
    """Weiszfeld weights of the geometric median of the ``members``' updates, from their Gram matrix.

    Args:
        g: (K, K) Gram matrix; members: (K,) bool.

    Returns:
        (K,) w ≥ 0, Σw = 1, zero outside ``members``; C = Σ_j w_j Θ̂_j.

    Example:
        >>> import jax.numpy as jnp, clair_jax as cj
        >>> x = jnp.array([[0.0], [1.0], [2.0], [3.0], [100.0]])[:, :, None]   # five 1 × 1 updates
        >>> w = cj.centre.geometric_median_weights(cj.centre.gram(x), jnp.ones(5, bool))
        >>> round(float(w @ x[:, 0, 0]), 1)   # the median, not the mean (21.2)
        2.0
    """
    m = members.astype(g.dtype)
    scale = jnp.maximum(jnp.max(jnp.abs(jnp.diagonal(g))), jnp.finfo(g.dtype).tiny)

    def step(w, _):
        d = jnp.sqrt(_distances(g, w))
        floor = 1e-6 * jnp.sqrt(scale)
        inv = m / jnp.maximum(d, floor)
        return inv / jnp.maximum(jnp.sum(inv), jnp.finfo(g.dtype).tiny), None

    w0 = m / jnp.maximum(jnp.sum(m), 1.0)
    w, _ = jax.lax.scan(step, w0, None, length=steps)
    return w


def centre_factors(b, a, w, rank):
    """Rank-``rank`` truncation of C = Σ_j w_j B_j A_j for one problem, from the factors.

    With P = [w_1 B_1 … w_K B_K] and Q = [A_1; …; A_K], C = PQ; P = Q₁R₁ and
    Qᵀ = Q₂R₂ give C = Q₁(R₁R₂ᵀ)Q₂ᵀ, and the SVD of the Kr × Kr core gives the
    truncation (√σ on each side).

    Args:
        b: (K, p, r), a: (K, r, q), w: (K,) weights, rank: r_c.

    Returns:
        (B_C (p, r_c), A_C (r_c, q)); columns beyond C's rank are zero.
    """
    k, p, r = b.shape
    left = jnp.moveaxis(b * w[:, None, None], 0, 1).reshape(p, k * r)
    right = a.reshape(k * r, a.shape[-1])
    q1, r1 = jnp.linalg.qr(left)
    q2, r2 = jnp.linalg.qr(right.T)
    u, s, vt = jnp.linalg.svd(r1 @ r2.T)
    keep = min(rank, s.shape[0])
    root = jnp.sqrt(s[:keep])
    b_c = jnp.zeros((p, rank), b.dtype).at[:, :keep].set((q1 @ u[:, :keep]) * root)
    a_c = jnp.zeros((rank, a.shape[-1]), a.dtype).at[:keep].set(root[:, None] * (vt[:keep] @ q2.T))
    return b_c, a_c


def size_noise(deviation, members, sizes):
    """ν_k = ĉ / n_k from the fit ‖Θ̂_k − C‖² = τ² + c / n_k over ``members`` (least squares, ĉ ≥ 0).

    Args:
        deviation: (n, K) distances to the centre per problem; members: (K,) bool;
            sizes: (K,) training examples per client (> 0).

    Returns:
        (ν (n, K), identified (n,) bool): where the members' sizes do not differ ĉ
        is not identified (ν is 0 there; :func:`pool_toward_centre` then pools as without a report).
    """
    inv = 1.0 / sizes
    m = members.astype(deviation.dtype)
    cnt = jnp.maximum(jnp.sum(m), 1.0)
    mean_x = jnp.sum(m * inv) / cnt
    var_x = jnp.sum(m * (inv - mean_x) ** 2) / cnt
    mean_y = jnp.sum(m * deviation, axis=-1, keepdims=True) / cnt
    cov = jnp.sum(m * (inv - mean_x) * (deviation - mean_y), axis=-1) / cnt
    identified = var_x > 1e-6 * mean_x ** 2
    slope = jnp.where(identified, jnp.maximum(cov / jnp.where(identified, var_x, 1.0), 0.0), 0.0)
    return slope[..., None] * inv, jnp.broadcast_to(identified, slope.shape)


def _check_per_client(value, name, lead, k, *, positive=False):
    x = np.asarray(value, dtype=np.float64)
    if x.shape == (k,) and lead:
        x = np.broadcast_to(x, lead + (k,))
    if x.shape != lead + (k,):
        raise ValueError(f"{name} must have shape {lead + (k,)} (leading axes, K clients) or ({k},), got {x.shape}")
    bad = ~(np.isfinite(x) & ((x > 0) if positive else (x >= 0)))
    if bad.any():
        client = int(np.argwhere(bad)[0][-1])
        want = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be finite and {want}, got {x[bad].ravel()[0]!r} for client {client}")
    return x


def pool_toward_centre(updates, members, served, *, update_noise=None, client_sizes=None, rank=None,
                       floor=OWN_FLOOR) -> CentrePooling:
    """Θ̃_k = C + λ_k(Θ̂_k − C) for the ``served`` clients (see the module docstring).

    Args:
        updates: (..., K, p, q) array or :class:`~clair_jax.LoRAFactors` (..., K, p, r) /
            (..., K, r, q): the updates to pool (CLAIR's refined ones).
        members: (K,) bool, the clients the centre is the geometric median of (Ŝ).
        served: (K,) bool, the clients that are pooled (Ŝ and the honest-but-noisy).
        update_noise: (..., K) or (K,) ν_k ≥ 0, measured by each client
            (:func:`noise_from_halves`), in the updates' units squared.
        client_sizes: (K,) training examples n_k > 0 (used when ``update_noise`` is None).
        rank: r_c, the centre's rank for LoRA input (default :data:`CENTRE_RANK` × r).
        floor: the least λ_k (:data:`OWN_FLOOR`); with neither report every served
            client gets λ_k = floor.

    Returns:
        :class:`CentrePooling`.

    Example:
        >>> import jax.numpy as jnp, clair_jax as cj
        >>> x = jnp.stack([jnp.full((2, 2), v) for v in (1.0, 3.0, 2.0)])
        >>> out = cj.centre.pool_toward_centre(x, jnp.ones(3, bool), jnp.ones(3, bool),
        ...                                    update_noise=jnp.array([4.0, 4.0, 0.0]))
        >>> out.refined[:, 0, 0].tolist(), out.weight.tolist()   # all noise: halfway to the centre
        ([1.5, 2.5, 2.0], [0.5, 0.5, 1.0])
    """
    factored = isinstance(updates, LoRAFactors)
    lead_shape = (updates.B if factored else jnp.asarray(updates)).shape
    lead, k = lead_shape[:-3], lead_shape[-3]
    members = jnp.asarray(members, bool)
    served = jnp.asarray(served, bool)
    if members.shape != (k,) or served.shape != (k,):
        raise ValueError(f"members and served must be ({k},) bool, got {members.shape} and {served.shape}")
    if not bool(jnp.any(members)):
        raise ValueError("pooling toward the centre needs at least one client in the collaborative set")
    floor = float(floor)
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must be in [0, 1] (the least weight a client's own update keeps), got {floor!r}")
    nu = None if update_noise is None else _check_per_client(update_noise, "update_noise", lead, k)
    sizes = None if client_sizes is None else _check_per_client(client_sizes, "client_sizes", (), k, positive=True)

    n = int(np.prod(lead)) if lead else 1
    if factored:
        b = jnp.asarray(updates.B).reshape((n,) + lead_shape[-3:])
        a = jnp.asarray(updates.A).reshape((n,) + updates.A.shape[-3:])
        dtype = b.dtype
        g = jax.lax.map(gram, LoRAFactors(b, a))
    else:
        x = jnp.asarray(updates).reshape((n,) + lead_shape[-3:])
        dtype = x.dtype
        g = gram(x)
    g64 = g.astype(jnp.float64) if jax.config.jax_enable_x64 else g
    w = jax.vmap(lambda gg: geometric_median_weights(gg, members))(g64)
    dev = jax.vmap(_distances)(g64, w)
    if nu is not None:
        noise = jnp.asarray(nu.reshape(n, k), dev.dtype)
    elif sizes is None:
        noise = dev   # no report: the whole distance may be noise, λ = floor
    else:
        noise, identified = size_noise(dev, members, jnp.asarray(sizes, dev.dtype))
        noise = jnp.where(identified[:, None], noise, dev)   # not identified: as without a report
        if not bool(jnp.all(identified)):
            warnings.warn("pooling='centre': the collaborative set's client_sizes do not differ, so the noise "
                          "cannot be told from the spread between clients; every served client is pooled as "
                          "without a report (λ = floor; pass update_noise= to say more)", RuntimeWarning,
                          stacklevel=3)
    lam = jnp.where(served, jnp.maximum(james_stein(dev, noise), floor), 1.0)
    w_c, lam_c = w.astype(dtype), lam.astype(dtype)
    if factored:
        r_c = int(rank) if rank is not None else CENTRE_RANK * b.shape[-1]
        b_c, a_c = jax.lax.map(lambda args: centre_factors(*args, r_c), (b, a, w_c))
        lf = lam_c[..., None, None]
        new_b = jnp.concatenate([lf * b, (1.0 - lf) * b_c[:, None]], axis=-1)
        new_a = jnp.concatenate([a, jnp.broadcast_to(a_c[:, None], (n, k) + a_c.shape[-2:])], axis=-2)
        refined = LoRAFactors(new_b.reshape(lead + new_b.shape[-3:]), new_a.reshape(lead + new_a.shape[-3:]))
    else:
        centre = jnp.einsum("nk,nkpq->npq", w_c, x)[:, None]
        refined = (centre + lam_c[..., None, None] * (x - centre)).reshape(lead_shape)
    shape = lead + (k,)
    return CentrePooling(refined, lam.reshape(shape), w.reshape(shape), dev.reshape(shape), noise.reshape(shape))
