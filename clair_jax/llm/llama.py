"""A Llama-architecture decoder in JAX with LoRA on chosen projections of chosen layers.

Weights are kept as llama.cpp's GGUF files lay them out: (out, in) matrices, the
q and k rows of each head in *interleaved* RoPE order (pairs (2i, 2i + 1)), so
RoPE rotates adjacent pairs here. Hugging Face checkpoints (and PEFT adapters
meant for them) use the rotate-half order; :func:`clair_jax.llm.hf_rows` converts.

One layer is written once and scanned over the stacked layers; LoRA adds
``scale · (x Aᵀ) Bᵀ`` to a projection ``x Wᵀ`` (PEFT's ΔW = scale · B A,
scale = alpha / r). Norms, softmax and logits are computed in float32 whatever
the parameters' dtype.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from clair_jax import llm
    >>> cfg = llm.LlamaConfig(vocab_size=50, hidden=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8,
    ...                       ffn=32, rms_eps=1e-5, rope_base=1e4)
    >>> params = llm.random_params(jax.random.key(0), cfg)
    >>> spec = llm.LoRASpec(layers=(1,), modules=("q", "v"), rank=2, alpha=4.0)
    >>> lora = llm.init_lora(jax.random.key(1), cfg, spec)     # B = 0: the base model
    >>> tokens = jnp.arange(6)[None]
    >>> with_lora = llm.forward(params, tokens, cfg, lora, spec)                # (1, 6, 50) float32 logits
    >>> float(jnp.abs(with_lora - llm.forward(params, tokens, cfg)).max()) < 1e-4
    True
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "LlamaConfig", "LoRASpec", "MODULES", "module_shape", "random_params", "init_lora", "lora_deltas",
    "hidden_states", "forward_from", "forward", "token_nll", "greedy_generate",
]

#: Projections LoRA can adapt: attention q, k, v, o and the SwiGLU MLP's gate, up, down.
MODULES = ("q", "k", "v", "o", "gate", "up", "down")


class LlamaConfig(NamedTuple):
    """Architecture of a Llama decoder (grouped-query attention, SwiGLU, RMSNorm, RoPE)."""

    vocab_size: int
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    rms_eps: float
    rope_base: float


class LoRASpec(NamedTuple):
    """Where LoRA sits: ``layers`` (ascending indices), ``modules`` (of :data:`MODULES`), rank r, lora_alpha."""

    layers: tuple
    modules: tuple
    rank: int
    alpha: float

    @property
    def scale(self) -> float:
        """PEFT's scaling alpha / r."""
        return self.alpha / self.rank


def module_shape(cfg: LlamaConfig, module: str) -> tuple:
    """(out, in) of a projection."""
    h, q, kv = cfg.hidden, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "gate": (cfg.ffn, h), "up": (cfg.ffn, h),
              "down": (h, cfg.ffn)}
    if module not in shapes:
        raise ValueError(f"module must be one of {MODULES}, got {module!r}")
    return shapes[module]


def _check_spec(cfg: LlamaConfig, spec: LoRASpec, start: int = 0) -> None:
    layers = tuple(spec.layers)
    if not layers or list(layers) != sorted(set(layers)):
        raise ValueError(f"spec.layers must be ascending, distinct and non-empty, got {layers}")
    if layers[0] < start or layers[-1] >= cfg.n_layers:
        raise ValueError(f"spec.layers {layers} must lie in [{start}, {cfg.n_layers}) (start = {start})")
    for m in spec.modules:
        module_shape(cfg, m)
    if spec.rank < 1:
        raise ValueError(f"spec.rank must be >= 1, got {spec.rank}")


def random_params(key: jax.Array, cfg: LlamaConfig, dtype=jnp.float32) -> dict:
    """Random weights of the right shapes (tests and examples; a real model comes from :func:`load_model`)."""
    keys = iter(jax.random.split(key, 2 + len(MODULES)))
    layers = {m: jax.random.normal(next(keys), (cfg.n_layers,) + module_shape(cfg, m), dtype)
              / jnp.sqrt(module_shape(cfg, m)[1]).astype(dtype) for m in MODULES}
    layers["attn_norm"] = jnp.ones((cfg.n_layers, cfg.hidden), dtype)
    layers["ffn_norm"] = jnp.ones((cfg.n_layers, cfg.hidden), dtype)
    return {"embed": jax.random.normal(next(keys), (cfg.vocab_size, cfg.hidden), dtype),
            "final_norm": jnp.ones((cfg.hidden,), dtype), "layers": layers}


def init_lora(key: jax.Array, cfg: LlamaConfig, spec: LoRASpec, dtype=jnp.float32) -> dict:
    """PEFT's initialisation: A ~ U(−1/√in, 1/√in) (Kaiming-uniform, a = √5), B = 0.

    Returns:
        module → {"A": (len(layers), r, in), "B": (len(layers), out, r)}.
    """
    _check_spec(cfg, spec)
    out = {}
    for m, k in zip(spec.modules, jax.random.split(key, len(spec.modules))):
        o, i = module_shape(cfg, m)
        bound = 1.0 / jnp.sqrt(i)
        out[m] = {"A": jax.random.uniform(k, (len(spec.layers), spec.rank, i), dtype, -bound, bound),
                  "B": jnp.zeros((len(spec.layers), o, spec.rank), dtype)}
    return out


def lora_deltas(lora: dict, spec: LoRASpec) -> dict:
    """Dense ΔW = scale · B A per module: (len(layers), out, in)."""
    return {m: spec.scale * jnp.einsum("lor,lri->loi", lora[m]["B"], lora[m]["A"]) for m in spec.modules}


# ---------------------------------------------------------------------------
# the layer


def _rms_norm(x, weight, eps):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def _rope(x, base):
    """Rotate adjacent pairs (2i, 2i + 1) of each head by position · base^(−2i/d): x (..., T, heads, d)."""
    t, d = x.shape[-3], x.shape[-1]
    freq = base ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angle = jnp.arange(t, dtype=jnp.float32)[:, None] * freq  # (T, d/2)
    cos, sin = jnp.cos(angle)[:, None, :], jnp.sin(angle)[:, None, :]
    x32 = x.astype(jnp.float32)
    even, odd = x32[..., 0::2], x32[..., 1::2]
    out = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def _project(x, w, name, adapter, scale):
    y = x @ w[name].T
    if adapter is not None and name in adapter:
        a, b = adapter[name]
        y = y + scale * ((x @ a.T) @ b.T)
    return y


def _layer(x, w, cfg: LlamaConfig, adapter=None, scale=1.0):
    """One decoder block on x (B, T, H); ``adapter`` maps module → (A, B) of this layer."""
    bsz, t, _ = x.shape
    h = _rms_norm(x, w["attn_norm"], cfg.rms_eps)
    q = _project(h, w, "q", adapter, scale).reshape(bsz, t, cfg.n_heads, cfg.head_dim)
    k = _project(h, w, "k", adapter, scale).reshape(bsz, t, cfg.n_kv_heads, cfg.head_dim)
    v = _project(h, w, "v", adapter, scale).reshape(bsz, t, cfg.n_kv_heads, cfg.head_dim)
    q, k = _rope(q, cfg.rope_base), _rope(k, cfg.rope_base)
    group = cfg.n_heads // cfg.n_kv_heads
    q = q.reshape(bsz, t, cfg.n_kv_heads, group, cfg.head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / jnp.sqrt(float(cfg.head_dim))
    causal = jnp.tril(jnp.ones((t, t), bool))
    probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1).astype(x.dtype)
    attn = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(bsz, t, cfg.n_heads * cfg.head_dim)
    x = x + _project(attn, w, "o", adapter, scale)
    h = _rms_norm(x, w["ffn_norm"], cfg.rms_eps)
    gated = jax.nn.silu(_project(h, w, "gate", adapter, scale)) * _project(h, w, "up", adapter, scale)
    return x + _project(gated, w, "down", adapter, scale)


def _scan_layers(x, layers, cfg, adapters=None, scale=1.0):
    def body(x, inputs):
        w, adapter = inputs
        return _layer(x, w, cfg, adapter, scale), None

    x, _ = jax.lax.scan(body, x, (layers, adapters))
    return x


def _slice_layers(params, lo, hi):
    return {name: value[lo:hi] for name, value in params["layers"].items()}


def _batched(tokens_or_hidden, core_rank):
    """Flatten leading batch axes to one: returns (flat, restore)."""
    lead = tokens_or_hidden.shape[:tokens_or_hidden.ndim - core_rank]
    flat = tokens_or_hidden.reshape((-1,) + tokens_or_hidden.shape[len(lead):])
    return flat, lambda y: y.reshape(lead + y.shape[1:])


@partial(jax.jit, static_argnames=("cfg", "upto"))
def hidden_states(params: dict, tokens: jax.Array, cfg: LlamaConfig, upto: int) -> jax.Array:
    """The residual stream entering layer ``upto``: embedding, then layers [0, upto); no LoRA.

    Args:
        params: the model's weights (see :func:`clair_jax.llm.load_model`).
        tokens: (..., T) int token ids.
        cfg: the architecture.
        upto: 0 ≤ upto ≤ n_layers.

    Returns:
        (..., T, hidden) in the parameters' dtype.
    """
    if not 0 <= upto <= cfg.n_layers:
        raise ValueError(f"upto must be in [0, {cfg.n_layers}], got {upto}")
    flat, restore = _batched(jnp.asarray(tokens), 1)
    x = params["embed"][flat]
    if upto:
        x = _scan_layers(x, _slice_layers(params, 0, upto), cfg)
    return restore(x)


@partial(jax.jit, static_argnames=("cfg", "start", "spec"))
def forward_from(params: dict, hidden: jax.Array, cfg: LlamaConfig, start: int, lora: dict | None = None,
                 spec: LoRASpec | None = None) -> jax.Array:
    """Layers [start, n_layers) on ``hidden``, the final norm and the tied head: float32 logits.

    Args:
        params: the model's weights.
        hidden: (..., T, hidden), e.g. from :func:`hidden_states` with ``upto = start``.
        cfg: the architecture.
        start: first layer to run.
        lora: LoRA factors (:func:`init_lora`'s layout) on ``spec``, or None.
        spec: where the factors sit; every adapted layer must be ≥ ``start``.

    Returns:
        (..., T, vocab_size) float32 logits.
    """
    x, restore = _batched(jnp.asarray(hidden), 2)
    end = cfg.n_layers
    if lora is None:
        x = _scan_layers(x, _slice_layers(params, start, end), cfg)
    else:
        if spec is None:
            raise ValueError("spec is required with lora")
        _check_spec(cfg, spec, start)
        first = spec.layers[0]
        if first > start:
            x = _scan_layers(x, _slice_layers(params, start, first), cfg)
        rows = jnp.asarray(spec.layers) - first
        adapters = {}
        for m in spec.modules:
            a, b = lora[m]["A"], lora[m]["B"]
            full_a = jnp.zeros((end - first,) + a.shape[1:], a.dtype).at[rows].set(a)
            full_b = jnp.zeros((end - first,) + b.shape[1:], b.dtype).at[rows].set(b)
            adapters[m] = (full_a.astype(x.dtype), full_b.astype(x.dtype))
        x = _scan_layers(x, _slice_layers(params, first, end), cfg, adapters, spec.scale)
    x = _rms_norm(x, params["final_norm"], cfg.rms_eps)
    head = params.get("lm_head", params["embed"])
    return restore((x @ head.T).astype(jnp.float32))


def forward(params: dict, tokens: jax.Array, cfg: LlamaConfig, lora: dict | None = None,
            spec: LoRASpec | None = None) -> jax.Array:
    """Logits (..., T, vocab_size) of the whole model for tokens (..., T)."""
    return forward_from(params, hidden_states(params, tokens, cfg, 0), cfg, 0, lora, spec)


def token_nll(logits: jax.Array, tokens: jax.Array, mask: jax.Array | None = None):
    """Next-token negative log-likelihood: logits[..., t, :] predicts tokens[..., t + 1].

    Args:
        logits: (..., T, V).
        tokens: (..., T) ints.
        mask: (..., T) bool of real tokens; a target position counts where mask is True.

    Returns:
        (sum of NLL over counted targets, number of counted targets), float32 scalars.
    """
    logp = jax.nn.log_softmax(logits[..., :-1, :].astype(jnp.float32), axis=-1)
    target = jnp.asarray(tokens)[..., 1:]
    nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    weight = jnp.ones_like(nll) if mask is None else jnp.asarray(mask)[..., 1:].astype(jnp.float32)
    return jnp.sum(nll * weight), jnp.sum(weight)


def greedy_generate(params: dict, cfg: LlamaConfig, prompt_ids, n_new: int, lora: dict | None = None,
                    spec: LoRASpec | None = None) -> list:
    """Greedy continuation of ``prompt_ids`` by ``n_new`` tokens (one full forward a token: short outputs)."""
    ids = [int(i) for i in prompt_ids]
    if not ids:
        raise ValueError("prompt_ids must hold at least one token")
    for _ in range(int(n_new)):
        logits = forward(params, jnp.asarray(ids, jnp.int32)[None], cfg, lora, spec)
        ids.append(int(jnp.argmax(logits[0, -1])))
    return ids[len(prompt_ids):]
