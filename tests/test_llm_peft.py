"""PEFT and transformers as the independent judges of the LLM path (the ``peft`` extra; skipped where absent).

transformers reads the same GGUF file on its own (its converter undoes llama.cpp's q/k
row permutation) and PEFT loads the adapters ``clair shakespeare`` and ``clair
aggregate`` write: the logits must equal the JAX forward with the adapter as trained.
That checks the forward pass, the Hugging Face row order of q/k ``lora_B`` and the
adapter files at once.
"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from clair_jax import llm  # noqa: E402

pytestmark = [pytest.mark.peft, pytest.mark.slow]   # torch + transformers + peft: end to end by nature
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"


def _hf_model(gguf_path):
    folder, name = os.path.split(gguf_path)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = llm.write_tiny_gguf(str(tmp_path_factory.mktemp("hf") / "tiny.gguf"), seed=2)
    return llm.load_model(path)


def test_transformers_reads_the_same_model(tiny):
    ids = tiny.tokenizer.encode(TEXT).ids
    ours = np.asarray(llm.forward(tiny.params, jnp.asarray(ids)[None], tiny.config))[0]
    np.testing.assert_allclose(_hf_logits(_hf_model(tiny.path), ids), ours, atol=2e-4, rtol=1e-4)


def test_refined_adapters_load_with_peft_and_give_the_same_logits(tiny, tmp_path):
    """Every refined adapter of a (tiny) `clair shakespeare` run loads with PeftModel.from_pretrained."""
    import pathlib

    from clair_jax.experiments import shakespeare as sh
    from tests.test_shakespeare import TINY

    fixture = pathlib.Path(__file__).parent / "data" / "shakespeare_mini"
    out = sh.run_shakespeare(seed=1, model=tiny, texts=str(fixture), config=TINY, adapters_dir=str(tmp_path / "run"),
                             progress=False)
    refined = sorted((tmp_path / "run" / "refined").iterdir())
    assert len(refined) == sum(c["status"] != "contaminated" for c in out["clients"]) > 0
    ids = tiny.tokenizer.encode(TEXT).ids
    for folder in refined:
        base = _hf_model(tiny.path)
        model = peft.PeftModel.from_pretrained(base, str(folder))
        lora, spec = llm.load_peft_adapter(folder, tiny.config)
        ours = np.asarray(llm.forward(tiny.params, jnp.asarray(ids)[None], tiny.config, lora, spec))[0]
        np.testing.assert_allclose(_hf_logits(model, ids), ours, atol=2e-4, rtol=1e-4, err_msg=folder.name)


@pytest.mark.slow
def test_smollm2_with_an_adapter_matches_transformers(tmp_path):
    try:
        path = llm.locate_smollm2()
    except FileNotFoundError as exc:
        pytest.skip(f"SmolLM2-135M-Instruct not available: {exc}")
    model = llm.load_model(path)
    gguf_path = model.path
    if not gguf_path.endswith(".gguf"):
        pytest.skip("the model was located as a wheel")
    local = tmp_path / "m"
    local.mkdir()
    shutil.copy(gguf_path, local / "model.gguf")
    spec = llm.LoRASpec(layers=(26, 27, 28, 29), modules=("q", "k", "v", "o"), rank=8, alpha=16.0)
    lora = llm.init_lora(jax.random.key(0), model.config, spec)
    keys = jax.random.split(jax.random.key(1), 4)
    lora = {m: {"A": v["A"], "B": 0.02 * jax.random.normal(k, v["B"].shape)} for (m, v), k in zip(lora.items(), keys)}
    llm.save_peft_adapter(tmp_path / "adapter", lora, model.config, spec, base_model=str(local))
    ids = model.tokenizer.encode(TEXT).ids
    hf = peft.PeftModel.from_pretrained(_hf_model(str(local / "model.gguf")), str(tmp_path / "adapter"))
    ours = np.asarray(llm.forward(model.params, jnp.asarray(ids)[None], model.config, lora, spec))[0]
    theirs = _hf_logits(hf, ids)
    assert np.abs(theirs - ours).max() < 1e-2 * np.abs(ours).max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() > 0.95
