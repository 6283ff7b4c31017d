"""Writing adapters for ``clair aggregate``: refined and centre-pooled clients, the global adapter.

Each directory is written atomically (a temporary sibling renamed into place), with
the client's own ``adapter_config.json`` byte for byte unless its rank changed
(centre pooling: r = lora_alpha = the new rank, the scaling folded into lora_B).
"""

from __future__ import annotations

import json
import os
import shutil

import ml_dtypes  # noqa: F401  (numpy bfloat16 for safetensors)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from clair_jax.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME, AdapterError

__all__ = ["GLOBAL_NAME", "FILE_MODE", "DIR_MODE", "global_factors", "write_adapter", "copy_adapter", "write_global",
           "centre_adapter", "check_outputs", "np_dtype"]

#: Directory (under the output directory) of the optional global adapter.
GLOBAL_NAME = "global_adapter"
FILE_MODE, DIR_MODE = 0o644, 0o755


def np_dtype(code):
    return {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}[code]


def check_outputs(federation, out_dir, keep_flagged, global_rank):
    """Refuse (before any work) to overwrite existing outputs."""
    out_dir = os.path.abspath(out_dir)
    for c in federation.clients:
        if os.path.abspath(c.path) in (out_dir, os.path.abspath(keep_flagged or out_dir)):
            raise AdapterError(c.path, "is the output directory itself")
        for base in [out_dir] + ([keep_flagged] if keep_flagged else []):
            target = os.path.join(base, c.name)
            if os.path.exists(target):
                raise AdapterError(c.path, f"output {target} already exists (remove it or choose another --out)")
    if global_rank is not None:
        if GLOBAL_NAME in federation.names:
            raise AdapterError(GLOBAL_NAME, f"a client directory is named {GLOBAL_NAME!r}, the global adapter's name")
        if os.path.exists(os.path.join(out_dir, GLOBAL_NAME)):
            raise AdapterError(os.path.join(out_dir, GLOBAL_NAME), "already exists (remove it or choose another --out)")


def write_adapter(target, config_source, tensors, metadata, *, config=None):
    """Write one adapter directory atomically (a temporary sibling renamed into place)."""
    tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    cfg = os.path.join(tmp, CONFIG_NAME)
    if config is None:
        shutil.copyfile(config_source, cfg)   # the client's own config, byte for byte
    else:
        with open(cfg, "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2, sort_keys=True)
    weights = os.path.join(tmp, WEIGHTS_NAME)
    save_file(tensors, weights, metadata=metadata)
    for path in (cfg, weights):
        os.chmod(path, FILE_MODE)
    os.chmod(tmp, DIR_MODE)
    os.replace(tmp, target)


def copy_adapter(client, target):
    os.makedirs(target)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        shutil.copyfile(os.path.join(client.path, name), os.path.join(target, name))
        os.chmod(os.path.join(target, name), FILE_MODE)
    os.chmod(target, DIR_MODE)


def global_factors(b_list, a_list, rank):
    """Rank-``rank`` truncated SVD of mean_k B_k A_k from the factors alone.

    With P = [B_1 … B_n] (p × nr) and Q = [A_1; …; A_n] (nr × q), mean ΔW = PQ/n;
    P = Q₁R₁ and Qᵀ = Q₂R₂ (thin QR), so PQ/n = Q₁ (R₁R₂ᵀ/n) Q₂ᵀ and the SVD of the
    nr × nr core gives the truncation. No p × q matrix is formed.

    Returns:
        (B_g (p, rank), A_g (rank, q)) with B_g A_g the truncation; √σ on each side.
        Columns beyond the mean's rank are zero.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> bs = [rng.standard_normal((6, 2)) for _ in range(3)]
        >>> as_ = [rng.standard_normal((2, 5)) for _ in range(3)]
        >>> bg, ag = global_factors(bs, as_, 5)
        >>> mean = sum(b @ a for b, a in zip(bs, as_)) / 3
        >>> bool(np.allclose(bg @ ag, mean))
        True
    """
    p_mat = np.concatenate([np.asarray(b, np.float64) for b in b_list], axis=1)
    q_mat = np.concatenate([np.asarray(a, np.float64) for a in a_list], axis=0)
    q1, r1 = np.linalg.qr(p_mat)
    q2, r2 = np.linalg.qr(q_mat.T)
    u, s, vt = np.linalg.svd(r1 @ r2.T / len(b_list))
    keep = min(rank, s.shape[0])
    root = np.sqrt(s[:keep])
    b_g = np.zeros((p_mat.shape[0], rank))
    a_g = np.zeros((rank, q_mat.shape[1]))
    b_g[:, :keep] = (q1 @ u[:, :keep]) * root
    a_g[:keep] = root[:, None] * (vt[:keep] @ q2.T)
    return b_g, a_g


def write_global(federation, benign, store, out_dir, rank):
    """The global adapter: rank-``rank`` truncation of the mean refined benign ΔW per module."""
    members = np.flatnonzero(benign)
    ref = federation.clients[int(members[0])]
    dtypes = [e.dtype for j in members for e in federation.clients[j].modules.values()]
    dtype = np_dtype(max(set(dtypes), key=dtypes.count))
    tensors = {}
    handles = [safe_open(federation.clients[j].weights_path, framework="numpy") for j in members]
    try:
        for name, entry in ref.modules.items():
            bs, as_ = [], []
            for j, fh in zip(members, handles):
                e = federation.clients[j].modules[name]
                if (j, e.key_a) in store:   # centre pooling: a new rank, scaling folded into B
                    bs.append(store[(j, e.key_b)].astype(np.float64))
                    as_.append(store[(j, e.key_a)].astype(np.float64))
                else:
                    bs.append(store[(j, e.key_b)].astype(np.float64) * e.scaling)
                    as_.append(fh.get_tensor(e.key_a).astype(np.float64))
            b_g, a_g = global_factors(bs, as_, rank)
            tensors[entry.key_b] = b_g.astype(dtype)
            tensors[entry.key_a] = a_g.astype(dtype)
    finally:
        for fh in handles:
            fh.__exit__(None, None, None)
    config = dict(ref.config)
    config.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={},
                  modules_to_save=None, lora_bias=False)
    target = os.path.join(out_dir, GLOBAL_NAME)
    write_adapter(target, None, tensors, ref.metadata, config=config)
    return target


def centre_adapter(client, tensors):
    """A centre-pooled client's tensors padded to one rank R, and its config (r = lora_alpha = R)."""
    rank = max(tensors[e.key_a].shape[0] for e in client.modules.values())
    out = dict(tensors)
    for e in client.modules.values():
        b, a = tensors[e.key_b], tensors[e.key_a]
        pad = rank - a.shape[0]
        if pad:
            out[e.key_b] = np.concatenate([b, np.zeros((b.shape[0], pad), b.dtype)], axis=1)
            out[e.key_a] = np.concatenate([a, np.zeros((pad, a.shape[1]), a.dtype)], axis=0)
    config = dict(client.config)
    config.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={})
    return out, config
