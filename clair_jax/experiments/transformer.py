"""A small decoder-only Transformer with LoRA adapters, in plain JAX.

Parameters are a plain dict of arrays (a pytree), so the model composes with
``jax.vmap`` over clients and ``optax`` without any NN library. Weight matrices
follow the (d_out, d_in) convention of the LoRA paper: a projection computes
``h = x Wᵀ`` and a LoRA update is ``ΔW = (alpha / r) · B A`` with
B: (d_out, r), A: (r, d_in).

The four attention projections of every layer (query, key, value, output; all
d×d) are stored stacked as one array ``attn`` of shape (n_layers, 4, d, d), so
that the adapted modules of the whole model are a single (n_layers, 4, ...)
array — exactly the leading "module" axes CLAIR vmaps over.

Example:
    >>> import jax
    >>> cfg = TransformerConfig(vocab_size=17, max_len=33)
    >>> params = init_params(jax.random.key(0), cfg)
    >>> logits = forward(params, jnp.zeros((2, 10), jnp.int32), cfg)
    >>> logits.shape
    (2, 10, 17)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "TransformerConfig",
    "LoRAConfig",
    "ATTENTION_PROJECTIONS",
    "init_params",
    "forward",
    "init_lora",
    "lora_deltas",
]

ATTENTION_PROJECTIONS = ("query", "key", "value", "output")


class TransformerConfig(NamedTuple):
    """Shape of the model.

    Attributes:
        vocab_size: number of token ids V.
        max_len: longest sequence the learned positional embedding covers.
        d_model: residual width d.
        n_heads: attention heads (d must be divisible by it).
        n_layers: Transformer blocks.
        d_mlp: hidden width of the MLP.
    """

    vocab_size: int
    max_len: int
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    d_mlp: int = 128


class LoRAConfig(NamedTuple):
    """LoRA adapters on the four attention projections of every layer.

    Attributes:
        rank: adapter rank r.
        alpha: scaling numerator; ΔW = (alpha / r) B A.
    """

    rank: int = 4
    alpha: float = 4.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _check_config(cfg: TransformerConfig) -> None:
    if cfg.d_model % cfg.n_heads:
        raise ValueError(f"d_model={cfg.d_model} must be divisible by n_heads={cfg.n_heads}")
    for name in ("vocab_size", "max_len", "d_model", "n_heads", "n_layers", "d_mlp"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"TransformerConfig.{name} must be >= 1, got {getattr(cfg, name)}")


def init_params(key: jax.Array, cfg: TransformerConfig, dtype=jnp.float32) -> dict:
    """Random base-model parameters.

    Args:
        key: PRNG key.
        cfg: model shape.
        dtype: parameter dtype.

    Returns:
        dict with ``embed`` (V, d), ``pos`` (max_len, d), ``attn`` (L, 4, d, d),
        ``ln1``/``ln2`` (L, 2, d) (scale, bias), ``mlp_in`` (L, d_mlp, d),
        ``mlp_in_bias`` (L, d_mlp), ``mlp_out`` (L, d, d_mlp), ``mlp_out_bias``
        (L, d), ``ln_final`` (2, d) and ``unembed`` (V, d).
    """
    _check_config(cfg)
    d, L, m = cfg.d_model, cfg.n_layers, cfg.d_mlp
    keys = jax.random.split(key, 6)

    def normal(k, shape, std):
        return (std * jax.random.normal(k, shape)).astype(dtype)

    ln = jnp.stack([jnp.ones((L, d)), jnp.zeros((L, d))], axis=1).astype(dtype)
    return {
        "embed": normal(keys[0], (cfg.vocab_size, d), 1.0),
        "pos": normal(keys[1], (cfg.max_len, d), 1.0),
        "attn": normal(keys[2], (L, 4, d, d), d**-0.5),
        "ln1": ln,
        "ln2": ln,
        "mlp_in": normal(keys[3], (L, m, d), d**-0.5),
        "mlp_in_bias": jnp.zeros((L, m), dtype),
        "mlp_out": normal(keys[4], (L, d, m), m**-0.5 / L),
        "mlp_out_bias": jnp.zeros((L, d), dtype),
        "ln_final": jnp.stack([jnp.ones(d), jnp.zeros(d)]).astype(dtype),
        "unembed": normal(keys[5], (cfg.vocab_size, d), d**-0.5),
    }


def _layer_norm(x, scale_bias, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale_bias[0] + scale_bias[1]


def _attention(x, w, n_heads):
    """Causal multi-head self-attention. x: (..., T, d); w: (4, d, d)."""
    *lead, t, d = x.shape
    dh = d // n_heads

    def heads(y):  # (..., T, d) -> (..., H, T, dh)
        return jnp.swapaxes(y.reshape(*lead, t, n_heads, dh), -2, -3)

    q, k, v = (heads(x @ w[i].T) for i in range(3))
    logits = (q @ jnp.swapaxes(k, -1, -2)) * dh**-0.5
    causal = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
    mixed = jax.nn.softmax(logits, axis=-1) @ v  # (..., H, T, dh)
    mixed = jnp.swapaxes(mixed, -2, -3).reshape(*lead, t, d)
    return mixed @ w[3].T


def forward(params: dict, tokens: jax.Array, cfg: TransformerConfig, attn_delta=None) -> jax.Array:
    """Next-token logits.

    Args:
        params: base parameters from :func:`init_params`.
        tokens: (..., T) int token ids, T <= cfg.max_len.
        cfg: model shape.
        attn_delta: optional (L, 4, d, d) dense update added to the attention
            projections (a merged LoRA update, FedAvg of ΔW, ...).

    Returns:
        (..., T, V) logits.
    """
    t = tokens.shape[-1]
    attn = params["attn"] if attn_delta is None else params["attn"] + attn_delta
    x = jnp.take(params["embed"], tokens, axis=0) + jnp.asarray(params["pos"])[:t]
    for layer in range(cfg.n_layers):
        x = x + _attention(_layer_norm(x, params["ln1"][layer]), attn[layer], cfg.n_heads)
        h = _layer_norm(x, params["ln2"][layer])
        h = jax.nn.gelu(h @ params["mlp_in"][layer].T + params["mlp_in_bias"][layer])
        x = x + h @ params["mlp_out"][layer].T + params["mlp_out_bias"][layer]
    x = _layer_norm(x, params["ln_final"])
    return x @ params["unembed"].T


def init_lora(key: jax.Array, cfg: TransformerConfig, lora: LoRAConfig, dtype=jnp.float32) -> dict:
    """LoRA adapters with the standard initialisation: B = 0, A ~ N(0, 1/d).

    Args:
        key: PRNG key (federated clients share it, so every client starts from
            the same broadcast adapter).
        cfg: model shape.
        lora: adapter rank and scaling.
        dtype: parameter dtype.

    Returns:
        dict with ``B`` (L, 4, d, r) zeros and ``A`` (L, 4, r, d).
    """
    if lora.rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {lora.rank}")
    d, L = cfg.d_model, cfg.n_layers
    a = (d**-0.5 * jax.random.normal(key, (L, 4, lora.rank, d))).astype(dtype)
    return {"B": jnp.zeros((L, 4, d, lora.rank), dtype), "A": a}


def lora_deltas(adapter: dict, lora: LoRAConfig) -> jax.Array:
    """Dense attention update ΔW = (alpha/r) B A.

    Args:
        adapter: dict with ``B`` (..., L, 4, d, r) and ``A`` (..., L, 4, r, d).
        lora: adapter scaling.

    Returns:
        (..., L, 4, d, d).
    """
    return lora.scale * adapter["B"] @ adapter["A"]
