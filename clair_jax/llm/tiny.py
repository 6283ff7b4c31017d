"""A tiny random Llama in SmolLM2's file format, for offline tests and examples.

Same GGUF tensor names and ``llama.*`` metadata, a byte-level BPE vocabulary
(``tokenizer.ggml.model`` "gpt2": the 256 byte symbols plus merges learned from a
fixed English text), and quantised tensors (Q8_0 embedding, Q4_1 projections) so
that :func:`clair_jax.llm.load_model` takes exactly the path it takes on the real
file.

Example:
    >>> import tempfile, os
    >>> from clair_jax import llm
    >>> path = llm.write_tiny_gguf(os.path.join(tempfile.mkdtemp(), "tiny.gguf"))
    >>> model = llm.load_model(path)
    >>> model.config.n_layers, model.config.hidden
    (2, 64)
    >>> model.tokenizer.decode(model.tokenizer.encode("To be, or not to be").ids)
    'To be, or not to be'
"""

from __future__ import annotations

import json

import numpy as np

__all__ = ["write_tiny_gguf", "TRAINING_TEXT"]

#: The text the tiny vocabulary's merges are learned from.
TRAINING_TEXT = (
    "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
    "The slings and arrows of outrageous fortune, Or to take arms against a sea of troubles "
    "And by opposing end them. To die: to sleep; No more; and by a sleep to say we end "
    "The heart-ache and the thousand natural shocks That flesh is heir to. "
    "def function(self, value): return value if value is not None else self.default\n"
) * 4


def _vocabulary(merges: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + merges, initial_alphabet=alphabet, show_progress=False,
                                  special_tokens=[])
    tok.train_from_iterator([TRAINING_TEXT], trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    merge_list = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merge_list


def write_tiny_gguf(path, *, seed: int = 0, n_layers: int = 2, hidden: int = 64, n_heads: int = 4,
                    n_kv_heads: int = 2, head_dim: int = 16, ffn: int = 128, vocab_merges: int = 200) -> str:
    """Write a tiny random Llama GGUF file and return its path.

    Args:
        path: the file to write.
        seed: seeds the weights.
        n_layers, hidden, n_heads, n_kv_heads, head_dim, ffn: the architecture
            (widths multiples of 32, the quantisation block).
        vocab_merges: BPE merges learned on top of the 256 byte symbols.
    """
    import gguf

    for name, value in (("hidden", hidden), ("ffn", ffn), ("n_heads*head_dim", n_heads * head_dim)):
        if value % 32:
            raise ValueError(f"{name} must be a multiple of 32 (the quantisation block), got {value}")
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
    tokens, merges = _vocabulary(vocab_merges)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(n_layers)
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([1] * len(tokens))

    def quantised(name, rows, cols, qtype):
        w = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
        writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)

    quantised("token_embd.weight", len(tokens), hidden, gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    q_out, kv_out = n_heads * head_dim, n_kv_heads * head_dim
    shapes = {"attn_q": (q_out, hidden), "attn_k": (kv_out, hidden), "attn_v": (kv_out, hidden),
              "attn_output": (hidden, q_out), "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden),
              "ffn_down": (hidden, ffn)}
    for i in range(n_layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
        for name, (rows, cols) in shapes.items():
            qtype = gguf.GGMLQuantizationType.Q4_1 if name.startswith("ffn") else gguf.GGMLQuantizationType.Q8_0
            quantised(f"blk.{i}.{name}.weight", rows, cols, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)
