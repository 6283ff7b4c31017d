"""Real PEFT adapters in, refined adapters that PEFT loads out.

A tiny Llama (random init, no download; grouped-query attention: q/o 32 × 32,
k/v 16 × 32) gets a LoRA adapter per client from peft itself (one client with
rsLoRA, one at rank 2, one poisoned), saved with ``save_pretrained``;
``clair aggregate`` refines them, and every output is loaded back with
``PeftModel.from_pretrained``: no missing or unexpected key, and the loaded
s·B·A of every module equals the refined product.

Needs the ``peft`` extra (``pip install -e ".[peft]"``); skipped without it.
"""

import copy
import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import clair_jax as cj  # noqa: E402
from clair_jax import adapters  # noqa: E402
from clair_jax.cli import main  # noqa: E402

pytestmark = [pytest.mark.peft, pytest.mark.slow]   # torch + transformers + peft: end to end by nature
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _lora_modules(model):
    return {name: mod for name, mod in model.named_modules() if hasattr(mod, "lora_A") and "default" in mod.lora_A}


def _delta(mod):
    return (mod.lora_B["default"].weight @ mod.lora_A["default"].weight).detach().double().numpy() * mod.scaling["default"]


def _write_clients(root, base, k=6):
    rng = np.random.default_rng(0)
    configs = [dict(r=4, lora_alpha=8)] * k
    configs[2] = dict(r=4, lora_alpha=8, use_rslora=True)
    configs[3] = dict(r=2, lora_alpha=4)
    bases = {}
    dirs = []
    for c in range(k):
        cfg = peft.LoraConfig(target_modules=list(KINDS), lora_dropout=0.0, init_lora_weights=False, **configs[c])
        model = peft.get_peft_model(copy.deepcopy(base), cfg)
        with torch.no_grad():
            for name, mod in _lora_modules(model).items():
                out_f, in_f = mod.lora_B["default"].weight.shape[0], mod.lora_A["default"].weight.shape[1]
                r = mod.lora_A["default"].weight.shape[0]
                if name not in bases:
                    bases[name] = np.linalg.qr(rng.standard_normal((out_f, 2)))[0]
                a = rng.standard_normal((r, in_f)) / np.sqrt(in_f)
                b = rng.standard_normal((out_f, r)) if c == 0 else bases[name] @ rng.standard_normal((2, r))
                mod.lora_A["default"].weight.copy_(torch.tensor(a, dtype=torch.float32))
                mod.lora_B["default"].weight.copy_(torch.tensor(b / mod.scaling["default"], dtype=torch.float32))
        path = root / f"client{c}"
        model.save_pretrained(str(path))
        dirs.append(str(path))
    return dirs


def test_peft_adapters_round_trip(tmp_path, capsys):
    base = _tiny_llama()
    dirs = _write_clients(tmp_path / "in", base)
    with open(f"{dirs[0]}/adapter_config.json") as fh:
        assert json.load(fh)["peft_type"] == "LORA"
    fed = adapters.load_federation(dirs)
    assert {g.shape for g in fed.groups} == {(32, 32), (16, 32)}
    expected_results = cj.clair_groups(fed.factors())

    out = tmp_path / "out"
    code = main(["aggregate", *dirs, "--out", str(out), "--json", str(tmp_path / "r.json"), "--quiet"])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    benign = [c["benign"] for c in report["clients"]]
    assert benign == np.asarray(expected_results[0].client_benign).tolist()
    assert benign[0] is False and all(benign[1:])

    refined = {}
    for g, res in zip(fed.groups, expected_results):
        b, a = np.asarray(res.refined.B, np.float64), np.asarray(res.refined.A, np.float64)
        for i, m in enumerate(g.modules):
            for k in range(len(dirs)):
                refined[(m, k)] = b[i, k] @ a[i, k]
    for k, client in enumerate(report["clients"]):
        if not client["benign"]:
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), client["output"])
        key_warnings = [str(w.message) for w in caught if "key" in str(w.message).lower()]
        assert not key_warnings, key_warnings
        modules = _lora_modules(loaded)
        assert len(modules) == 2 * len(KINDS)
        for name, mod in modules.items():
            module = name.split("base_model.model.", 1)[-1]
            want = refined[(module, k)]
            np.testing.assert_allclose(_delta(mod), want, atol=1e-5 * np.abs(want).max() + 1e-8)
    capsys.readouterr()
