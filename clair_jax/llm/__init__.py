"""A real pretrained LLM for CLAIR to judge: a Llama decoder in JAX read from a GGUF file.

:mod:`clair_jax.llm.llama` is the forward pass with LoRA, :mod:`~clair_jax.llm.gguf_model`
reads weights and tokenizer (``gguf`` and ``tokenizers``, the ``llm`` extra, imported
only when a file is read), :mod:`~clair_jax.llm.peft_io` writes and reads PEFT
adapters for the Hugging Face checkpoint, :mod:`~clair_jax.llm.texts` holds the
Shakespeare benchmark's text, and :mod:`~clair_jax.llm.tiny` writes a tiny random
model in the same file format for offline tests. ``import clair_jax`` imports none
of this.
"""

from clair_jax.llm.gguf_model import (
    CACHE_DIR, SMOLLM2_FILE, SMOLLM2_SHA256, Model, build_tokenizer, load_model, locate_smollm2,
)
from clair_jax.llm.llama import (
    MODULES, LlamaConfig, LoRASpec, forward, forward_from, greedy_generate, hidden_states, init_lora, lora_deltas,
    module_shape, random_params, token_nll,
)
from clair_jax.llm.peft_io import PEFT_BASE_MODEL, gguf_rows, hf_rows, load_peft_adapter, save_peft_adapter
from clair_jax.llm.tiny import write_tiny_gguf

__all__ = [
    "LlamaConfig", "LoRASpec", "MODULES", "module_shape", "random_params", "init_lora", "lora_deltas",
    "hidden_states", "forward_from", "forward", "token_nll", "greedy_generate",
    "Model", "load_model", "locate_smollm2", "build_tokenizer", "SMOLLM2_FILE", "SMOLLM2_SHA256", "CACHE_DIR",
    "PEFT_BASE_MODEL", "hf_rows", "gguf_rows", "save_peft_adapter", "load_peft_adapter", "write_tiny_gguf",
]
