"""A federated LoRA round with PEFT adapters: six clients fine-tune a (tiny) Llama,
one of them is poisoned, and ``clair aggregate`` returns a refined adapter for
every honest client that ``PeftModel.from_pretrained`` loads as usual.

Needs the ``peft`` extra: ``pip install -e ".[peft]"`` (torch, transformers, peft).
Runs on a CPU in about a minute; nothing is downloaded (the model is randomly
initialised from a small ``LlamaConfig``).

    python examples/peft_federation.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import peft
import torch
import transformers

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def tiny_llama():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def client_adapters(base, root, clients=6, poisoned=(0,)):
    """Stand-ins for local fine-tuning: honest clients' updates share each module's
    column space (a rank-2 basis), the poisoned client's do not."""
    rng = np.random.default_rng(0)
    shared = {}
    dirs = []
    for k in range(clients):
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                                 use_rslora=(k == 2))  # clients may differ in PEFT settings
        model = peft.get_peft_model(copy.deepcopy(base), config)
        with torch.no_grad():
            for name, module in model.named_modules():
                if not (hasattr(module, "lora_A") and "default" in module.lora_A):
                    continue
                b_w, a_w = module.lora_B["default"].weight, module.lora_A["default"].weight
                if name not in shared:
                    shared[name] = np.linalg.qr(rng.standard_normal((b_w.shape[0], 2)))[0]
                b = rng.standard_normal(b_w.shape) if k in poisoned else shared[name] @ rng.standard_normal((2, 4))
                a_w.copy_(torch.tensor(rng.standard_normal(a_w.shape) / np.sqrt(a_w.shape[1]), dtype=torch.float32))
                b_w.copy_(torch.tensor(b / module.scaling["default"], dtype=torch.float32))
        path = os.path.join(root, f"client{k}")
        model.save_pretrained(path)
        dirs.append(path)
    return dirs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where to write the adapters (default: a temporary directory)")
    args = parser.parse_args(argv)
    root = args.workdir or tempfile.mkdtemp(prefix="peft_federation_")
    base = tiny_llama()
    dirs = client_adapters(base, os.path.join(root, "clients"))

    # The command line (the library call is clair_jax.adapters.aggregate(dirs, out_dir)).
    out, report_path = os.path.join(root, "refined"), os.path.join(root, "report.json")
    subprocess.run([sys.executable, "-m", "clair_jax", "aggregate", *dirs, "--out", out, "--json", report_path,
                    "--global-rank", "4"], check=True)

    with open(report_path) as fh:
        report = json.load(fh)
    for client in report["clients"]:
        if client["output"] is None:
            print(f"{client['name']}: flagged (score {client['score']:.2f}, z {client['z']:.1f}), no adapter written")
            continue
        model = peft.PeftModel.from_pretrained(copy.deepcopy(base), client["output"])
        ids = torch.arange(8)[None]
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        print(f"{client['name']}: refined adapter loaded from {client['output']}, logits {tuple(logits.shape)}")
    print(f"global adapter for new clients: {report['global_adapter']['path']}")


if __name__ == "__main__":
    main()
