"""Build PEFT-layout adapter directories with safetensors alone (no torch)."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

PREFIX = "base_model.model."
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def module_names(layers=2, kinds=("q_proj", "k_proj", "v_proj", "o_proj")):
    return [f"model.layers.{i}.self_attn.{kind}" for i in range(layers) for kind in kinds]


def shapes_for(names, d=16, kv=8):
    """(out, in) per module: k/v project d → kv (grouped-query attention)."""
    return {m: ((kv, d) if m.endswith(("k_proj", "v_proj")) else (d, d)) for m in names}


def config_for(r=4, alpha=8, **extra):
    cfg = dict(peft_type="LORA", r=r, lora_alpha=alpha, use_rslora=False, rank_pattern={}, alpha_pattern={},
               fan_in_fan_out=False, use_dora=False, base_model_name_or_path="tiny/llama", task_type="CAUSAL_LM",
               target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], modules_to_save=None, lora_bias=False,
               bias="none")
    cfg.update(extra)
    return cfg


def federation_deltas(seed, names, shapes, *, clients=6, poisoned=(0,), shared=2, local_rank=4):
    """ΔW_k = U_m G_k A_k per module (shared column space U_m), poisoned clients random.

    Returns {module: (list of B_k (out, local_rank) with ΔW_k = B_k A_k, list of A_k)}."""
    rng = np.random.default_rng(seed)
    out = {}
    for m in names:
        p, q = shapes[m]
        u, _ = np.linalg.qr(rng.standard_normal((p, shared)))
        bs, as_ = [], []
        for k in range(clients):
            a = rng.standard_normal((local_rank, q)) / np.sqrt(q)
            if k in poisoned:
                b = rng.standard_normal((p, local_rank))
            else:
                b = u @ rng.standard_normal((shared, local_rank))
            bs.append(b)
            as_.append(a)
        out[m] = (bs, as_)
    return out


def write_client(path, config, factors, *, dtype="float32", prefix=True, extra_tensors=None, metadata=None):
    """Write one adapter: ``factors`` {module: (B_scaled, A)} hold s·B (the ΔW factors);
    B is stored divided by the PEFT scaling of ``config`` for that module."""
    from clair_jax.adapters import peft_scaling

    os.makedirs(path, exist_ok=True)
    tensors = {}
    for m, (b, a) in factors.items():
        _, s = peft_scaling(config, m)
        key = (PREFIX if prefix else "") + m
        tensors[key + ".lora_A.weight"] = np.asarray(a).astype(DTYPES[dtype])
        tensors[key + ".lora_B.weight"] = (np.asarray(b) / s).astype(DTYPES[dtype])
    tensors.update(extra_tensors or {})
    with open(os.path.join(path, "adapter_config.json"), "w") as fh:
        json.dump(config, fh)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata=metadata or {"format": "pt"})
    return path


def write_federation(root, *, seed=0, clients=6, poisoned=(0,), layers=2, configs=None, dtype="float32",
                     prefix=True, names=None, shapes=None, ranks=None):
    """K client directories under ``root``; ``configs[k]`` overrides client k's config.

    ``ranks[k]`` gives client k a different LoRA rank (its factors are zero-padded
    versions of the same rank-2 update, so ΔW is the same kind)."""
    names = names or module_names(layers)
    shapes = shapes or shapes_for(names)
    deltas = federation_deltas(seed, names, shapes, clients=clients, poisoned=poisoned)
    dirs = []
    for k in range(clients):
        cfg = (configs or {}).get(k) or config_for()
        r = (ranks or {}).get(k, 4)
        facs = {}
        for m in names:
            b, a = deltas[m][0][k], deltas[m][1][k]
            if r != b.shape[1]:  # same ΔW at another rank: B A = (B T)(T⁺ A) with T of full row rank
                rng = np.random.default_rng(k)
                if r > b.shape[1]:
                    b = np.concatenate([b, np.zeros((b.shape[0], r - b.shape[1]))], axis=1)
                    a = np.concatenate([a, rng.standard_normal((r - a.shape[0], a.shape[1]))], axis=0)
                else:
                    dw = b @ a
                    uu, ss, vt = np.linalg.svd(dw, full_matrices=False)
                    b, a = uu[:, :r] * ss[:r], vt[:r]
            facs[m] = (b, a)
        cfg = dict(cfg)
        if r != 4 and not cfg.get("rank_pattern"):
            cfg["r"] = r
        dirs.append(write_client(os.path.join(root, f"client{k:02d}"), cfg, facs, dtype=dtype, prefix=prefix))
    return dirs, deltas
