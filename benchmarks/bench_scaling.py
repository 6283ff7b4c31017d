"""Scaling of the exact-program solve with K, p, the number of layers, and devices.

* K, p, layers: one process, the full-SVD jitted+vmapped solve, and the same solve
  with the SVT ``svt="auto"`` picks (:func:`clair_jax.linalg.choose_svt_budget`:
  the rank-k partial SVT, or the whole spectrum from the Gram matrix).
* devices: one subprocess per device count with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (CPU "devices" share the
  machine's cores: on 2 cores expect at most ~2×), the layer axis sharded with
  :func:`clair_jax.sharding.map_over_layers`.

Usage::

    python benchmarks/bench_scaling.py [--quick] [--json PATH] [--devices 1 2 4]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._common import machine_info, make_blocks, markdown_table, time_call, write_json

LAM = 0.7
FULL = dict(base=(32, 64, 16, 4, 8), Ks=[8, 16, 32, 64, 128], ps=[32, 64, 128, 256, 512],
            layers=[1, 4, 16, 64], dev_layers=32, devices=[1, 2, 4])
QUICK = dict(base=(8, 16, 4, 2, 2), Ks=[8], ps=[], layers=[], dev_layers=4, devices=[2])


def _solver(svt_budget, batched=True):
    from benchmarks._fast_solvers import fast_solvers
    from clair_jax.stack import to_stacked

    solve_exact, _ = fast_solvers()

    def one(x):
        s = jnp.linalg.norm(to_stacked(x), ord=2)
        out = solve_exact(x / s, LAM, tol=3e-6, max_iter=1000, svt_budget=svt_budget)
        return out.objective * s, out.iterations, out.converged

    return jax.vmap(one) if batched else one


def time_solve(k, p, q, rank, layers, repeats, *, partial):
    from clair_jax import linalg

    blocks, _ = make_blocks(0, k, p, q, rank=rank, layers=layers, noise=0.0)
    blocks = jnp.asarray(blocks)
    shape = (p, k * q)
    budget = linalg.choose_svt_budget(shape, "auto", rank)
    use = partial and budget is not None
    fn = jax.jit(_solver(budget if use else None))
    out = jax.block_until_ready(fn(blocks))
    t = time_call(lambda: jax.block_until_ready(fn(blocks)), repeats=repeats)[0]
    return t, int(np.max(out[1])), bool(np.all(out[2])), linalg.svt_method(shape, budget if use else None)


def sweep(cfg, repeats):
    k0, p0, q0, r0, l0 = cfg["base"]
    rows = []
    cases = ([("K", k, p0, q0, r0, l0) for k in cfg["Ks"]]
             + [("p", k0, p, q0, r0, l0) for p in cfg["ps"]]
             + [("layers", k0, p0, q0, r0, n) for n in cfg["layers"]])
    for axis, k, p, q, r, n in cases:
        t_full, it, conv, _ = time_solve(k, p, q, r, n, repeats, partial=False)
        t_auto, it_a, conv_a, used = time_solve(k, p, q, r, n, repeats, partial=True)
        rows.append(dict(vary=axis, K=k, p=p, q=q, layers=n, matrix=f"{p}x{k * q}",
                         full_ms=t_full * 1e3, auto_ms=t_auto * 1e3, auto_svt=used,
                         iters=it, per_layer_ms=t_auto * 1e3 / n, converged=conv and conv_a))
        print(f"  vary {axis:>6}: K={k} p={p} layers={n}: {t_full*1e3:.1f} ms (auto {t_auto*1e3:.1f})",
              flush=True)
    return rows


WORKER = """
import os, sys, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count={n}"
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp, numpy as np
from benchmarks._common import make_blocks, time_call
from benchmarks.bench_scaling import _solver
from clair_jax import sharding
k, p, q, r, layers, repeats = {args}
blocks = jnp.asarray(make_blocks(0, k, p, q, rank=r, layers=layers, noise=0.0)[0])
fn = sharding.map_over_layers(_solver(None, batched=False), sharding.layer_mesh())
out = jax.block_until_ready(fn(blocks))
t = time_call(lambda: jax.block_until_ready(fn(blocks)), repeats=repeats)[0]
print("RESULT" + json.dumps(dict(devices=len(jax.devices()), seconds=t, iters=int(np.max(out[1])))))
"""


def device_sweep(cfg, repeats):
    k, p, q, r, _ = cfg["base"]
    layers = cfg["dev_layers"]
    rows = []
    for n in cfg["devices"]:
        code = WORKER.format(n=n, root=str(ROOT), args=(k, p, q, r, layers, repeats))
        env = {key: v for key, v in os.environ.items() if key != "XLA_FLAGS"}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
        if proc.returncode != 0 or not line:
            raise RuntimeError(proc.stdout + proc.stderr)
        res = json.loads(line[0][len("RESULT"):])
        rows.append(dict(devices=res["devices"], layers=layers, K=k, p=p, q=q,
                         ms=res["seconds"] * 1e3, iters=res["iters"]))
        print(f"  devices {n}: {res['seconds']*1e3:.1f} ms", flush=True)
    for row in rows:
        row["speedup"] = rows[0]["ms"] / row["ms"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default="bench_results/bench_scaling.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--devices", type=int, nargs="*", default=None)
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.devices:
        cfg["devices"] = args.devices
    repeats = 1 if args.quick else args.repeats
    info = machine_info()
    print(f"bench_scaling on {info['cpu_count']} CPU(s), backend {info['jax_backend']}, "
          f"load {info['loadavg_at_start']}")
    rows = sweep(cfg, repeats)
    dev_rows = device_sweep(cfg, repeats)
    print()
    print(markdown_table(rows, [
        ("vary", "varied", ""), ("K", "K", "d"), ("p", "p", "d"), ("q", "q", "d"),
        ("layers", "layers", "d"), ("matrix", "stacked", ""), ("iters", "iters", "d"),
        ("full_ms", "full SVT (ms)", ".1f"), ("auto_ms", "auto SVT (ms)", ".1f"),
        ("auto_svt", "auto picks", ""), ("per_layer_ms", "ms / layer (auto)", ".2f")]))
    print()
    print(markdown_table(dev_rows, [
        ("devices", "host devices", "d"), ("layers", "layers", "d"), ("K", "K", "d"),
        ("p", "p", "d"), ("q", "q", "d"), ("ms", "time (ms)", ".1f"),
        ("speedup", "speed-up vs 1", ".2f"), ("iters", "max iters", "d")]))
    write_json(args.json, dict(benchmark="bench_scaling", machine=info, args=vars(args),
                               rows=rows, devices=dev_rows))
    return rows, dev_rows


if __name__ == "__main__":
    main()
