"""LoRA factors of :mod:`clair_jax.llm.llama` as PEFT adapter directories for the Hugging Face checkpoint.

llama.cpp's converter permuted the q and k rows of every head from Hugging Face's
rotate-half order (rows i and i + d/2 rotate together) to interleaved pairs
(rows 2i and 2i + 1). The model here runs on GGUF's order; an adapter written for
``HuggingFaceTB/SmolLM2-135M-Instruct`` must hold q/k ``lora_B`` rows in HF order,
so they are permuted on the way out (:func:`hf_rows`) and back on the way in
(:func:`gguf_rows`). ``lora_A`` (the input side) needs no permutation: the hidden
state's order is the same in both.

Example:
    >>> import numpy as np
    >>> from clair_jax.llm import hf_rows, gguf_rows
    >>> rows = np.arange(8)                       # one head of dimension 8, GGUF order
    >>> hf_rows(rows, n_heads=1, head_dim=8).tolist()
    [0, 2, 4, 6, 1, 3, 5, 7]
    >>> gguf_rows(hf_rows(rows, 1, 8), 1, 8).tolist()
    [0, 1, 2, 3, 4, 5, 6, 7]
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from clair_jax.llm.llama import LlamaConfig, LoRASpec, module_shape

__all__ = ["PEFT_BASE_MODEL", "PEFT_NAMES", "hf_rows", "gguf_rows", "peft_key", "save_peft_adapter",
           "load_peft_adapter"]

PEFT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: Module → its name in ``transformers``' LlamaForCausalLM.
PEFT_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj\.lora_([AB])\.weight$")
_SHORT = {"q": "q", "k": "k", "v": "v", "o": "o", "gate": "gate", "up": "up", "down": "down"}


def hf_rows(rows, n_heads: int, head_dim: int):
    """Rows of a q/k-shaped array (n_heads·head_dim, …) from GGUF's interleaved order to HF's rotate-half order."""
    rows = np.asarray(rows)
    rest = rows.shape[1:]
    return rows.reshape((n_heads, head_dim // 2, 2) + rest).swapaxes(1, 2).reshape(rows.shape)


def gguf_rows(rows, n_heads: int, head_dim: int):
    """The inverse of :func:`hf_rows` (llama.cpp converter's permutation)."""
    rows = np.asarray(rows)
    rest = rows.shape[1:]
    return rows.reshape((n_heads, 2, head_dim // 2) + rest).swapaxes(1, 2).reshape(rows.shape)


def _heads(cfg: LlamaConfig, module: str):
    return {"q": cfg.n_heads, "k": cfg.n_kv_heads}.get(module)


def peft_key(layer: int, module: str, factor: str) -> str:
    """PEFT's on-disk key, e.g. ``base_model.model.model.layers.29.self_attn.q_proj.lora_B.weight``."""
    return f"base_model.model.model.layers.{layer}.{PEFT_NAMES[module]}.lora_{factor}.weight"


def save_peft_adapter(path, lora: dict, cfg: LlamaConfig, spec: LoRASpec, *, base_model: str = PEFT_BASE_MODEL,
                      dtype=np.float32) -> None:
    """Write LoRA factors as a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).

    Args:
        path: the directory (created).
        lora: module → {"A": (len(layers), r, in), "B": (len(layers), out, r)}, q/k B rows in GGUF order.
        cfg: the architecture (head counts for the q/k permutation).
        spec: layers, modules, rank and lora_alpha.
        base_model: ``base_model_name_or_path`` of the config.
        dtype: the tensors' dtype on disk.
    """
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    tensors = {}
    for m in spec.modules:
        out_f, in_f = module_shape(cfg, m)
        a, b = np.asarray(lora[m]["A"], np.float32), np.asarray(lora[m]["B"], np.float32)
        if a.shape != (len(spec.layers), spec.rank, in_f) or b.shape != (len(spec.layers), out_f, spec.rank):
            raise ValueError(f"lora[{m!r}]: A {a.shape}, B {b.shape}; expected A {(len(spec.layers), spec.rank, in_f)}"
                             f", B {(len(spec.layers), out_f, spec.rank)}")
        for i, layer in enumerate(spec.layers):
            rows = b[i] if _heads(cfg, m) is None else hf_rows(b[i], _heads(cfg, m), cfg.head_dim)
            tensors[peft_key(layer, m, "A")] = np.ascontiguousarray(a[i]).astype(dtype)
            tensors[peft_key(layer, m, "B")] = np.ascontiguousarray(rows).astype(dtype)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": int(spec.rank), "lora_alpha": float(spec.alpha), "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(PEFT_NAMES[m].split(".")[1] for m in spec.modules),
        "layers_to_transform": [int(x) for x in spec.layers], "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
        "modules_to_save": None,
    }
    with open(os.path.join(path, "adapter_config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))


def load_peft_adapter(path, cfg: LlamaConfig):
    """Read a PEFT LoRA adapter of a Llama model written by :func:`save_peft_adapter` or any tool with its keys.

    Returns:
        (lora, spec): factors in :func:`clair_jax.llm.init_lora`'s layout (q/k B rows
        back in GGUF order) and the :class:`LoRASpec` read from the files.

    Raises:
        ValueError: naming the file, when keys, ranks or options do not fit.
    """
    from safetensors.numpy import load_file

    config_path = os.path.join(path, "adapter_config.json")
    weights_path = os.path.join(path, "adapter_model.safetensors")
    for f in (config_path, weights_path):
        if not os.path.isfile(f):
            raise ValueError(f"path {os.fspath(path)!r}: {os.path.basename(f)} is missing")
    with open(config_path, encoding="utf-8") as fh:
        config = json.load(fh)
    for option in ("rank_pattern", "alpha_pattern"):
        if config.get(option):
            raise ValueError(f"{config_path}: {option} is not supported here")
    if config.get("use_rslora") or config.get("use_dora"):
        raise ValueError(f"{config_path}: rsLoRA/DoRA adapters are not supported here")
    found = {}
    for key, value in load_file(weights_path).items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"{weights_path}: unexpected key {key!r}")
        layer, _, name, factor = match.groups()
        found[(int(layer), _SHORT[name], factor)] = value.astype(np.float32)
    layers = tuple(sorted({k[0] for k in found}))
    modules = tuple(m for m in PEFT_NAMES if any(k[1] == m for k in found))
    rank = int(config["r"])
    lora = {}
    for m in modules:
        out_f, in_f = module_shape(cfg, m)
        a_list, b_list = [], []
        for layer in layers:
            if (layer, m, "A") not in found or (layer, m, "B") not in found:
                raise ValueError(f"{weights_path}: layer {layer} lacks {m}'s lora_A or lora_B")
            a, b = found[(layer, m, "A")], found[(layer, m, "B")]
            if a.shape != (rank, in_f) or b.shape != (out_f, rank):
                raise ValueError(f"{weights_path}: layer {layer} {m}: A {a.shape}, B {b.shape}; "
                                 f"expected A {(rank, in_f)}, B {(out_f, rank)} (r = {rank})")
            a_list.append(a)
            b_list.append(b if _heads(cfg, m) is None else gguf_rows(b, _heads(cfg, m), cfg.head_dim))
        lora[m] = {"A": np.stack(a_list), "B": np.stack(b_list)}
    return lora, LoRASpec(layers=layers, modules=modules, rank=rank, alpha=float(config["lora_alpha"]))
