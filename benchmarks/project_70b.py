"""A 70B-shaped federation, on paper: time a few layers here, project the whole model.

Llama-2-70B's attention: 80 layers of q/o at 8192 × 8192 and k/v at 1024 × 8192
(grouped-query attention), LoRA rank 16, K = 64 clients (20 % off-subspace,
benign factors with ``--noise`` relative error). A 70B federation's factors are
16 GiB in float32, so this script builds ``--layers`` layers (each: q, k, v, o),
times one ``cj.clair_groups`` call over them cold (compilation included) and
warm, and projects the 80-layer call as compile + 80 × (warm time per layer):
every module of a shape is the same program, so the warm time is linear in the
number of layers. Each module reduces exactly to a 1024 × (64·16) problem
(q/o: d = min(8192, K·r); k/v: d = min(1024, K·r)), against 512 × 512 at 7B.

Usage::

    python benchmarks/project_70b.py [--layers 2] [--noise 0.05] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYERS_70B = 80


def make_group(rng, modules, k, out_dim, in_dim, r, noise, n_bad):
    """B (modules, K, out, r), A (modules, K, r, in): benign B_k share a rank-r column space."""
    import numpy as np

    b = np.empty((modules, k, out_dim, r), np.float32)
    a = np.empty((modules, k, r, in_dim), np.float32)
    for m in range(modules):
        u, _ = np.linalg.qr(rng.standard_normal((out_dim, r), dtype=np.float32))
        b[m] = np.einsum("dr,kre->kde", u, rng.standard_normal((k, r, r), dtype=np.float32))
        b[m] += noise * np.sqrt(r / out_dim) * rng.standard_normal((k, out_dim, r), dtype=np.float32)
        b[m, :n_bad] = rng.standard_normal((n_bad, out_dim, r), dtype=np.float32) * np.sqrt(r / out_dim)
        a[m] = rng.standard_normal((k, r, in_dim), dtype=np.float32) / np.sqrt(in_dim)
    return b, a


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--json", default="bench_results/project_70b.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import jax
    import numpy as np

    import clair_jax as cj
    from benchmarks._common import machine_info, markdown_table, write_json

    info = machine_info()
    k, r, layers = args.clients, args.rank, args.layers
    n_bad = int(round(0.2 * k))
    rng = np.random.default_rng(0)
    # q and o (8192 × 8192) form one shape group, k and v (1024 × 8192) the other.
    big = make_group(rng, 2 * layers, k, 8192, 8192, r, args.noise, n_bad)
    small = make_group(rng, 2 * layers, k, 1024, 8192, r, args.noise, n_bad)
    groups = [cj.LoRAFactors(*big), cj.LoRAFactors(*small)]
    input_gib = sum(x.nbytes for x in big + small) / 2**30
    benign = np.arange(k) >= n_bad

    t0 = time.perf_counter()
    out = cj.clair_groups(groups)
    jax.block_until_ready(out[0].refined.B)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = cj.clair_groups(groups)
    jax.block_until_ready(out[0].refined.B)
    warm = time.perf_counter() - t0
    correct = bool((np.asarray(out[0].client_benign) == benign).all())
    per_layer = warm / layers
    compile_s = cold - warm
    projected = compile_s + LAYERS_70B * per_layer
    row = dict(layers=layers, K=k, r=r, noise=args.noise, input_gib=input_gib, cold_s=cold, warm_s=warm,
               compile_s=compile_s, per_layer_s=per_layer, per_module_ms=1e3 * per_layer / 4,
               projected_80_layers_s=projected, input_80_layers_gib=input_gib * LAYERS_70B / layers,
               verdicts_correct=correct)
    print(f"project_70b on {info['cpu_count']} CPU(s), load {info['loadavg_at_start']}")
    print(markdown_table([row], [
        ("layers", "layers timed", "d"), ("K", "K", "d"), ("noise", "noise", ".2f"),
        ("input_gib", "input (GiB)", ".2f"), ("cold_s", "cold (s)", ".1f"), ("warm_s", "warm (s)", ".1f"),
        ("per_module_ms", "ms/module (warm)", ".0f"), ("compile_s", "compile (s)", ".1f"),
        ("projected_80_layers_s", "80 layers, projected (s)", ".0f"),
        ("input_80_layers_gib", "80-layer input (GiB, f32)", ".1f"), ("verdicts_correct", "verdicts exact", "")]))
    write_json(args.json, dict(benchmark="project_70b", machine=info, args=vars(args), rows=[row]))
    return row


if __name__ == "__main__":
    main()
