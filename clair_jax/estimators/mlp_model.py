"""The MLP of :mod:`clair_jax.estimators.mlp` and its training: the base model, then every client's fine-tuning.

A small tanh MLP whose first layer is made of L *modules*, one per input group
(see :mod:`clair_jax.estimators.mlp` for the model and why modules sit side by
side). :func:`train_base` trains it once with optax on a base task;
:func:`fine_tune` fine-tunes every client's module deltas (full matrices or LoRA
factors) in one vmapped, jitted ``lax.scan`` loop, unequal sample sizes padded
and masked out of the loss.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clair_jax._compile import program

__all__ = ["init_mlp", "mlp_apply", "train_base", "fine_tune", "client_loss", "FineTuneResult"]


# --------------------------------------------------------------------------- model


def init_mlp(key, module_dim, num_modules, width, out_dim, dtype=jnp.float32):
    """Initialises the MLP (orthogonal weights, zero biases).

    Args:
        key: PRNG key.
        module_dim: input dimension d of each module (p of its delta).
        num_modules: number L ≥ 1 of adaptable first-layer modules.
        width: hidden width (q of each module's delta).
        out_dim: output dimension.
        dtype: parameter dtype.

    Returns:
        dict with "w" (L, d, width) module weights, "b" (width,), "w_hidden"
        (width, width), "b_hidden" (width,), "w_out" (width, out_dim), "b_out" (out_dim,).

    Example:
        >>> import jax
        >>> params = init_mlp(jax.random.key(0), 16, 2, 16, 4)
        >>> params["w"].shape
        (2, 16, 16)
    """
    for name, value in (
        ("module_dim", module_dim), ("num_modules", num_modules), ("width", width), ("out_dim", out_dim)
    ):
        if int(value) < 1:
            raise ValueError(f"{name} must be ≥ 1; got {value}")
    return _init_mlp(key, int(module_dim), int(num_modules), int(width), int(out_dim), jnp.dtype(dtype))


@program(static_argnums=(1, 2, 3, 4, 5))
def _init_mlp(key, module_dim, num_modules, width, out_dim, dtype):
    k1, k2, k3 = jax.random.split(key, 3)
    orthogonal = jax.nn.initializers.orthogonal()
    modules = jax.vmap(lambda kk: orthogonal(kk, (module_dim, width), dtype))(jax.random.split(k1, num_modules))
    return {
        "w": modules / np.sqrt(num_modules),  # keeps Σ_l x_l W_l at unit variance
        "b": jnp.zeros((width,), dtype),
        "w_hidden": orthogonal(k2, (width, width), dtype),
        "b_hidden": jnp.zeros((width,), dtype),
        "w_out": jax.random.normal(k3, (width, out_dim), dtype) / np.sqrt(width),
        "b_out": jnp.zeros((out_dim,), dtype),
    }


def mlp_apply(params, x, deltas=None):
    """Forward pass f(x) of the MLP with optional module deltas.

    Args:
        params: dict from :func:`init_mlp`.
        x: (n, L·d) inputs (the L groups side by side).
        deltas: optional (L, d, width) ΔW_l added to the module weights.

    Returns:
        (n, out_dim) outputs.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> params = init_mlp(jax.random.key(0), 8, 2, 16, 4)
        >>> mlp_apply(params, jnp.ones((5, 16))).shape
        (5, 4)
    """
    w = params["w"] if deltas is None else params["w"] + deltas
    num_modules, d, _ = w.shape
    groups = x.reshape(x.shape[0], num_modules, d)
    h = jnp.tanh(jnp.einsum("nld,ldw->nw", groups, w) + params["b"])
    h = jnp.tanh(h @ params["w_hidden"] + params["b_hidden"])
    return h @ params["w_out"] + params["b_out"]


def _masked_mse(pred, y, mask):
    m = mask.astype(pred.dtype)
    return jnp.sum(jnp.sum(jnp.square(pred - y), -1) * m) / (jnp.maximum(jnp.sum(m), 1.0) * y.shape[-1])


def client_loss(params, deltas, x, y, mask=None):
    """Per-client masked mean squared error of base + delta models.

    Args:
        params: base parameters (shared).
        deltas: (L, K, p, q) per-layer, per-client deltas (layer axis leading).
        x: (K, n, d) inputs.
        y: (K, n, out_dim) targets.
        mask: optional (K, n) bool, True on real rows.

    Returns:
        (K,) mean squared error per client.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> params = init_mlp(jax.random.key(0), 8, 2, 16, 4)
        >>> client_loss(params, jnp.zeros((2, 3, 8, 16)), jnp.ones((3, 5, 16)), jnp.zeros((3, 5, 4))).shape
        (3,)
    """
    deltas = jnp.asarray(deltas)
    if deltas.ndim != 4:
        raise ValueError(f"deltas must have shape (L, K, p, q); got {deltas.shape}")
    if mask is None:
        mask = jnp.ones(x.shape[:2], bool)
    return _client_loss(params, jnp.swapaxes(deltas, 0, 1), x, y, mask)


@program
def _client_loss(params, deltas_k_first, x, y, mask):
    return jax.vmap(lambda d, xk, yk, mk: _masked_mse(mlp_apply(params, xk, d), yk, mk))(
        deltas_k_first, x, y, mask
    )


# --------------------------------------------------------------------------- base training


def train_base(key, x, y, *, num_modules=2, width=16, steps=1000, learning_rate=1e-2):
    """Trains the base ("pretrained") model once with optax Adam, full batch.

    Args:
        key: PRNG key for the initialisation.
        x: (n, L·d) base-task inputs.
        y: (n, out_dim) base-task targets.
        num_modules: L, the number of input modules (must divide x.shape[1]).
        width: hidden width.
        steps: Adam steps.
        learning_rate: Adam learning rate (cosine-decayed to 0).

    Returns:
        (params, losses): trained parameters and the (steps,) training-loss curve.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x = jax.random.normal(jax.random.key(1), (64, 16))
        >>> params, losses = train_base(jax.random.key(0), x, jnp.sin(x[:, :2]), steps=50)
        >>> bool(losses[-1] < losses[0])
        True
    """
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x, y must have shapes (n, d), (n, out_dim); got {x.shape}, {y.shape}")
    if x.shape[1] % num_modules:
        raise ValueError(f"num_modules={num_modules} must divide the number of features {x.shape[1]}")
    params = init_mlp(key, x.shape[1] // num_modules, num_modules, width, y.shape[1], x.dtype)
    opt = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
    return _train_base(params, x, y, opt, steps)


def _train_base(params, x, y, opt, steps):
    mask = jnp.ones(x.shape[:1], bool)

    def loss_fn(p):
        return _masked_mse(mlp_apply(p, x), y, mask)

    @program
    def run(params):
        return _optimise(loss_fn, params, opt, steps)

    return run(params)


def _optimise(loss_fn, theta0, opt, steps):
    """``steps`` optax steps on ``loss_fn`` from ``theta0`` (one scan): (theta, losses per step)."""
    def step(carry, _):
        theta, state = carry
        loss, g = jax.value_and_grad(loss_fn)(theta)
        upd, state = opt.update(g, state, theta)
        return (optax.apply_updates(theta, upd), state), loss

    (theta, _), losses = jax.lax.scan(step, (theta0, opt.init(theta0)), None, length=steps)
    return theta, losses


# --------------------------------------------------------------------------- fine-tuning


class FineTuneResult(NamedTuple):
    """Output of :func:`fine_tune`.

    Attributes:
        deltas: (L, K, p, q) fine-tuned ΔW per layer and client (layer axis leading).
        lora_b: (L, K, p, r) LoRA B factors (already scaled by s), or None for "full".
        lora_a: (L, K, r, q) LoRA A factors, or None for "full".
        initial_loss: (K,) training loss of the base model on each client's data.
        final_loss: (K,) training loss after fine-tuning.
        losses: (steps, K) training-loss curves.
    """

    deltas: jax.Array
    lora_b: jax.Array | None
    lora_a: jax.Array | None
    initial_loss: jax.Array
    final_loss: jax.Array
    losses: jax.Array


def fine_tune(
    key,
    params,
    x,
    y,
    mask=None,
    *,
    mode="full",
    lora_rank=4,
    lora_alpha=None,
    steps=1000,
    learning_rate=0.2,
    weight_decay=0.0,
    optimizer="sgd",
):
    """Fine-tunes the hidden-layer deltas of every client, all in one vmapped loop.

    Client k minimises its masked MSE over ΔW_{1..L} (base parameters frozen) with
    ``steps`` full-batch optax steps: SGD with momentum 0.9 (default) or Adam.
    Plain gradient descent from ΔW = 0 is the better local estimator here: Adam
    rescales every coordinate, so poorly identified directions drift as fast as
    well identified ones and the local error becomes large and anisotropic.

    Args:
        key: PRNG key (LoRA A initialisation).
        params: base parameters from :func:`train_base` / :func:`init_mlp`.
        x: (K, n, d) client inputs (padded rows are ignored where ``mask`` is False).
        y: (K, n, out_dim) client targets.
        mask: optional (K, n) bool, True on real rows.
        mode: "full" (ΔW_l trained directly, from 0) or "lora" (ΔW_l = s B_l A_l).
        lora_rank: r of the LoRA factors.
        lora_alpha: LoRA scale numerator (s = alpha / r); default r, i.e. s = 1.
        steps: optimisation steps.
        learning_rate: step size.
        weight_decay: decoupled weight decay on the deltas.
        optimizer: "sgd" (with momentum 0.9) or "adam".

    Returns:
        :class:`FineTuneResult`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> params = init_mlp(jax.random.key(0), 8, 2, 16, 4)
        >>> x = jax.random.normal(jax.random.key(1), (3, 32, 16))
        >>> y = jax.random.normal(jax.random.key(2), (3, 32, 4))
        >>> out = fine_tune(jax.random.key(3), params, x, y, steps=20)
        >>> out.deltas.shape, bool(jnp.all(out.final_loss < out.initial_loss))
        ((2, 3, 8, 16), True)
    """
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam'; got {optimizer!r}")
    if mode not in ("full", "lora"):
        raise ValueError(f"mode must be 'full' or 'lora'; got {mode!r}")
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    if x.ndim != 3 or y.ndim != 3 or x.shape[:2] != y.shape[:2]:
        raise ValueError(f"x, y must have shapes (K, n, d), (K, n, out_dim); got {x.shape}, {y.shape}")
    depth, module_dim, width = params["w"].shape
    if x.shape[2] != depth * module_dim:
        raise ValueError(f"x must have L·d = {depth * module_dim} features; got {x.shape[2]}")
    if y.shape[2] != params["w_out"].shape[1]:
        raise ValueError(f"y must have out_dim = {params['w_out'].shape[1]}; got {y.shape[2]}")
    if mask is None:
        mask = jnp.ones(x.shape[:2], bool)
    mask = jnp.asarray(mask, bool)
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask must have shape (K, n) = {x.shape[:2]}; got {mask.shape}")
    if int(steps) < 1:
        raise ValueError(f"steps must be ≥ 1; got {steps}")
    if mode == "lora" and int(lora_rank) < 1:
        raise ValueError(f"lora_rank must be ≥ 1; got {lora_rank}")
    k = x.shape[0]
    dtype = params["w"].dtype
    scale = (float(lora_alpha) if lora_alpha is not None else float(lora_rank)) / float(lora_rank)
    if mode == "full":
        init = {"delta": jnp.zeros((k, depth, module_dim, width), dtype)}
    else:
        a0 = jax.random.normal(key, (k, depth, lora_rank, width), dtype) / np.sqrt(width)
        init = {"b": jnp.zeros((k, depth, module_dim, lora_rank), dtype), "a": a0}
    if optimizer == "adam":
        opt = optax.adamw(learning_rate, weight_decay=weight_decay) if weight_decay else optax.adam(learning_rate)
    else:
        opt = optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=0.9))
    trained, losses = _fine_tune(params, init, x, y, mask, opt, int(steps), mode, scale)
    if mode == "full":
        deltas_k = trained["delta"]
        lora_b = lora_a = None
    else:
        b = scale * trained["b"]
        deltas_k = b @ trained["a"]
        lora_b = jnp.swapaxes(b, 0, 1)
        lora_a = jnp.swapaxes(trained["a"], 0, 1)
    deltas = jnp.swapaxes(deltas_k, 0, 1)  # (L, K, p, q)
    zero = jnp.zeros_like(deltas)
    initial = client_loss(params, zero, x, y, mask)
    final = client_loss(params, deltas, x, y, mask)
    return FineTuneResult(deltas, lora_b, lora_a, initial, final, losses)


def _delta(theta, mode, scale):
    return theta["delta"] if mode == "full" else scale * theta["b"] @ theta["a"]


@program(static_argnums=(5, 6, 7, 8))
def _fine_tune(params, init, x, y, mask, opt, steps, mode, scale):
    def train_one(theta0, xk, yk, mk):
        def loss_fn(theta):
            return _masked_mse(mlp_apply(params, xk, _delta(theta, mode, scale)), yk, mk)

        return _optimise(loss_fn, theta0, opt, steps)

    theta, losses = jax.vmap(train_one)(init, x, y, mask)
    return theta, losses.T
