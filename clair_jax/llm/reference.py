"""An independent NumPy forward of a Llama GGUF model, the reference the JAX forward is tested against.

Written apart from :mod:`clair_jax.llm.llama` (its own RoPE, attention and norms,
one token sequence at a time, float64): the two agreeing is evidence that both
read the file as llama.cpp does.
"""

from __future__ import annotations

import numpy as np

__all__ = ["numpy_logits", "perplexity"]


def _norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rotate_pairs(x, base):
    """x (T, heads, d): rotate (x[2i], x[2i+1]) by angle t·base^(−2i/d)."""
    t, _, d = x.shape
    theta = np.outer(np.arange(t), base ** (-np.arange(0, d, 2) / d))[:, None, :]
    c, s = np.cos(theta), np.sin(theta)
    y = np.empty_like(x)
    y[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
    y[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
    return y


def numpy_logits(params, cfg, tokens, deltas=None):
    """Logits (T, V) for one sequence of token ids; ``deltas[(layer, module)]`` (out, in) are added to W."""
    p = {k: np.asarray(v, np.float64) for k, v in params["layers"].items()}
    x = np.asarray(params["embed"], np.float64)[np.asarray(tokens)]
    t = len(tokens)
    mask = np.triu(np.full((t, t), -np.inf), 1)
    rep = cfg.n_heads // cfg.n_kv_heads
    for i in range(cfg.n_layers):
        def w(name):
            extra = 0.0 if deltas is None else np.asarray(deltas.get((i, name), 0.0), np.float64)
            return p[name][i] + extra

        h = _norm(x, p["attn_norm"][i], cfg.rms_eps)
        q = _rotate_pairs((h @ w("q").T).reshape(t, cfg.n_heads, cfg.head_dim), cfg.rope_base)
        k = _rotate_pairs((h @ w("k").T).reshape(t, cfg.n_kv_heads, cfg.head_dim), cfg.rope_base)
        v = (h @ w("v").T).reshape(t, cfg.n_kv_heads, cfg.head_dim)
        heads = []
        for head in range(cfg.n_heads):
            kv = head // rep
            a = q[:, head] @ k[:, kv].T / np.sqrt(cfg.head_dim) + mask
            a = np.exp(a - a.max(-1, keepdims=True))
            heads.append((a / a.sum(-1, keepdims=True)) @ v[:, kv])
        x = x + np.concatenate(heads, axis=-1) @ w("o").T
        h = _norm(x, p["ffn_norm"][i], cfg.rms_eps)
        g = h @ w("gate").T
        x = x + ((g / (1 + np.exp(-g))) * (h @ w("up").T)) @ w("down").T
    head = np.asarray(params.get("lm_head", params["embed"]), np.float64)
    return _norm(x, np.asarray(params["final_norm"], np.float64), cfg.rms_eps) @ head.T


def perplexity(logits, tokens):
    """exp of the mean next-token NLL of tokens[1:] under logits[:-1]."""
    z = logits[:-1] - logits[:-1].max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(np.exp(-np.mean(logp[np.arange(len(tokens) - 1), np.asarray(tokens)[1:]])))
