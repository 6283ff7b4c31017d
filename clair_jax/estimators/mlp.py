"""Stage 1 of the pipeline for neural networks: per-client fine-tuning of an MLP.

A small tanh MLP whose first layer is made of L *modules*, one per input group
x = (x_1, …, x_L), x_l ∈ R^d:

    h_0 = tanh(Σ_l x_l (W_l + ΔW_l) + b_0),   h_1 = tanh(h_0 W_h + b_h),
    f(x) = h_1 W_out + b_out,

is trained once with optax on a base task (the "pretrained model"). Each client
then fine-tunes only the module deltas ΔW_l ∈ R^{p×q} (p = d, q = width) on its
own data, as full matrices or as LoRA factors ΔW_l = s · B_l A_l (B_l: p×r,
A_l: r×q, s = alpha / r, B_l initialised at 0). All K clients train in one
vmapped, jitted ``lax.scan`` loop; unequal sample sizes are padded and masked out
of the loss.

The per-module deltas come back with the layer axis leading, (L, K, p, q) — the
layout :func:`clair_jax.clair` takes (one independent problem per layer, a
client verdict pooled over layers). With LoRA, B and A are also returned.

Why modules side by side rather than stacked hidden layers: CLAIR refines each
layer by projecting it onto a shared subspace, which removes estimation error
when that error is roughly isotropic on the shared side. Two *consecutive*
adapted layers have near-degenerate directions (in the near-linear regime of
tanh, ΔW_1 and ΔW_2 can trade off), along which local errors are large but
cancel in the output; projecting each layer separately breaks the cancellation
and can make the refined model worse than the local one (measured: test excess
×2–3 with two stacked 16×16 hidden layers). Modules that read independent,
isotropic input groups have a block-diagonal, input-isotropic Fisher, the
setting of the theory; orthogonal initial weights keep the activations
well-conditioned (condition number ≈ 1.2 rather than 50–300).

:func:`make_mlp_federation` builds the client tasks: benign client k's task is
the base model with ΔW_{l,k} = U_l V_{l,k}ᵀ (a subspace U_l shared by all benign
clients, a client-specific V_{l,k}); contaminated clients train on poisoned data
(shuffled labels, another task, heavy noise, negated labels).

The model and its training live in :mod:`clair_jax.estimators.mlp_model`; their
public names are re-exported here.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clair_jax._compile import program
from clair_jax.estimators.mlp_model import FineTuneResult, client_loss, fine_tune, init_mlp, mlp_apply, train_base

__all__ = [
    "init_mlp",
    "mlp_apply",
    "train_base",
    "fine_tune",
    "client_loss",
    "MLPFederation",
    "FineTuneResult",
    "make_mlp_federation",
    "MLP_POISON_KINDS",
]

#: Data-poisoning kinds understood by :func:`make_mlp_federation`.
MLP_POISON_KINDS = ("shuffled", "other_task", "heavy_noise", "sign_flip")


# --------------------------------------------------------------------------- federation


class MLPFederation(NamedTuple):
    """Client tasks on top of a trained base MLP.

    Attributes:
        params: base parameters (trained on the base task).
        true_deltas: (L, K, p, q) ΔW of each client's true task (contaminated
            clients: the task their *clean* test data comes from).
        subspace: (L, p, r) shared subspaces U_l (module-input side).
        benign: (K,) bool, the collaborative set.
        x_train, y_train, mask_train: (K, n_max, d), (K, n_max, out), (K, n_max)
            training data (poisoned for contaminated clients).
        x_test, y_test: (K, n_test, d), (K, n_test, out) clean held-out data.
        noise: label-noise standard deviation.
        base_losses: training-loss curve of the base model.
        poison_kinds: (K,) tuple, the poisoning kind of each client ("none" for
            benign clients, else one of :data:`MLP_POISON_KINDS`).
    """

    params: dict
    true_deltas: jax.Array
    subspace: jax.Array
    benign: jax.Array
    x_train: jax.Array
    y_train: jax.Array
    mask_train: jax.Array
    x_test: jax.Array
    y_test: jax.Array
    noise: float
    base_losses: jax.Array
    poison_kinds: tuple = ()


def make_mlp_federation(
    seed,
    *,
    num_clients=40,
    contamination=0.3,
    num_modules=2,
    module_dim=16,
    width=16,
    out_dim=16,
    rank=2,
    num_samples=200,
    num_test=500,
    noise=0.3,
    task_scale=0.3,
    heterogeneity=0.0,
    poison="mixed",
    base_samples=2000,
    base_steps=1000,
):
    """Trains a base MLP and draws a federation of fine-tuning tasks with poisoned clients.

    Benign client k: ΔW_{l,k} = c_l (U_l V_{l,k}ᵀ / ‖U_l V_{l,k}ᵀ‖_F + heterogeneity ·
    G⊥_{l,k} / ‖G⊥_{l,k}‖_F), c_l = task_scale · ‖W_l‖_F, with G⊥ a Gaussian
    matrix projected off span(U_l); targets y = f_{base+ΔW_k}(x) + N(0, noise²).
    Contaminated clients (round(contamination · K) of them, at random) train on
    poisoned data of one of :data:`MLP_POISON_KINDS` ("mixed": cycle through them):
    "shuffled" labels, "other_task" (a full-rank Gaussian delta of the same size),
    "heavy_noise" (10× noise), "sign_flip" (negated labels). Test data is clean
    data of each client's true task.

    Args:
        seed: int seed.
        num_clients: K.
        contamination: fraction of contaminated clients in [0, 1).
        num_modules, module_dim, width, out_dim: MLP shape; deltas are module_dim × width.
        rank: r of the shared subspaces (on the module-input side, ``side="left"``).
        num_samples: int or (K,) training sizes n_k.
        num_test: clean test rows per client.
        noise: label-noise standard deviation.
        task_scale: size of the task deltas relative to the module weights.
        heterogeneity: relative size of the off-subspace part of benign tasks.
        poison: a kind of :data:`MLP_POISON_KINDS` or "mixed".
        base_samples, base_steps: base-task data size and Adam steps.

    Returns:
        :class:`MLPFederation`.

    Example:
        >>> fed = make_mlp_federation(0, num_clients=6, num_samples=20, num_test=10, base_steps=10)
        >>> fed.true_deltas.shape, int(fed.benign.sum())
        ((2, 6, 16, 16), 4)
    """
    if num_clients < 2:
        raise ValueError(f"num_clients must be ≥ 2; got {num_clients}")
    if not 0.0 <= contamination < 1.0:
        raise ValueError(f"contamination must be in [0, 1); got {contamination}")
    if not 1 <= rank <= module_dim:
        raise ValueError(f"rank must be in [1, module_dim={module_dim}]; got {rank}")
    if poison not in MLP_POISON_KINDS + ("mixed",):
        raise ValueError(f"poison must be one of {MLP_POISON_KINDS + ('mixed',)}; got {poison!r}")
    k = num_clients
    n = np.broadcast_to(np.asarray(num_samples), (k,)).astype(int)
    if np.any(n < 1):
        raise ValueError(f"num_samples must be ≥ 1; got {n.tolist()}")
    # Sampling is done in NumPy: dozens of small eager JAX ops would each compile.
    rng = np.random.default_rng(seed)
    in_dim = num_modules * module_dim
    depth = num_modules
    f32 = np.float32

    # Base task: a random teacher MLP; the base model is trained on it once.
    kteach, kinit = jax.random.split(jax.random.key(seed))
    teacher = init_mlp(kteach, module_dim, num_modules, width, out_dim)
    xb = jnp.asarray(rng.standard_normal((base_samples, in_dim), f32))
    params, base_losses = train_base(
        kinit, xb, _apply(teacher, xb), num_modules=num_modules, width=width, steps=base_steps
    )

    # Client tasks relative to the trained base model.
    u = np.linalg.qr(rng.standard_normal((depth, module_dim, rank)))[0]
    v = rng.standard_normal((depth, k, width, rank))
    shared = np.einsum("lpr,lkqr->lkpq", u, v)
    norm = lambda a: np.sqrt(np.sum(np.square(a), (-2, -1), keepdims=True))
    size = task_scale * norm(np.asarray(params["w"], np.float64))[:, None]  # (L, 1, 1, 1)
    g = rng.standard_normal((depth, k, module_dim, width))
    g_perp = g - np.einsum("lpr,lsr,lksq->lkpq", u, u, g)  # (I − U Uᵀ) G
    true = size * (shared / norm(shared) + heterogeneity * g_perp / norm(g_perp))

    num_bad = int(round(contamination * k))
    perm = rng.permutation(k)
    benign = np.ones(k, bool)
    benign[perm[:num_bad]] = False
    kinds = MLP_POISON_KINDS if poison == "mixed" else (poison,)
    kind_of = {int(c): kinds[i % len(kinds)] for i, c in enumerate(perm[:num_bad])}
    is_kind = lambda name: np.asarray([kind_of.get(i) == name for i in range(k)])

    n_max = int(n.max())
    mask = np.arange(n_max)[None] < n[:, None]
    x = rng.standard_normal((k, n_max, in_dim))
    other = size * rng.standard_normal(true.shape) / np.sqrt(module_dim * width)  # full-rank other task
    train_deltas = np.where(is_kind("other_task")[None, :, None, None], other, true)
    y = np.asarray(client_forward(params, jnp.asarray(train_deltas, f32), jnp.asarray(x, f32)), np.float64)
    sigma = np.where(is_kind("heavy_noise"), 10.0, 1.0)[:, None, None] * noise
    y = y + sigma * rng.standard_normal(y.shape)
    y = np.where(is_kind("sign_flip")[:, None, None], -y, y)
    for i in np.flatnonzero(is_kind("shuffled")):
        y[i, : n[i]] = y[i, rng.permutation(n[i])]
    m = mask[..., None]
    xt = rng.standard_normal((k, num_test, in_dim))
    yt = np.asarray(client_forward(params, jnp.asarray(true, f32), jnp.asarray(xt, f32)), np.float64)
    yt = yt + noise * rng.standard_normal(yt.shape)
    as32 = lambda a: jnp.asarray(a, f32)
    return MLPFederation(
        params=params,
        true_deltas=as32(true),
        subspace=as32(u),
        benign=jnp.asarray(benign),
        x_train=as32(x * m),
        y_train=as32(y * m),
        mask_train=jnp.asarray(mask),
        x_test=as32(xt),
        y_test=as32(yt),
        noise=float(noise),
        base_losses=base_losses,
        poison_kinds=tuple(kind_of.get(i, "none") for i in range(k)),
    )


_apply = program(mlp_apply)


@program
def client_forward(params, deltas, x):
    """Outputs of every client's model: (L, K, p, q) deltas, (K, n, d) inputs → (K, n, out)."""
    return jax.vmap(lambda d, xk: mlp_apply(params, xk, d))(jnp.swapaxes(deltas, 0, 1), x)
