"""Compile and run time of ``cj.clair`` with CLAIR's CPU compiler options against XLA's defaults.

CLAIR compiles its programs with ``clair_jax._compile.CPU_OPTIONS`` on the CPU
(the classic fusion emitters instead of XLA:CPU's MLIR ones). Each row is a fresh
process (no compilation cache), so "cold" is what a user's first call costs:
compilation plus one run; "warm" is the median of three further calls. Both
option sets must give the same verdicts and refined updates (to float32 rounding).

Usage::

    python benchmarks/bench_compile.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: name → (kind, leading layers, K, p, q or LoRA rank)
CASES = {
    "demo (40 × 48 × 12)": ("dense", 1, 40, 48, 12),
    "8 layers (20 × 32 × 8)": ("dense", 8, 20, 32, 8),
    "LoRA, 4 modules (16 × 256, r = 8)": ("lora", 4, 16, 256, 8),
}
QUICK_CASES = {"tiny (12 × 10 × 3)": ("dense", 1, 12, 10, 3)}


def _federation(kind, layers, k, p, q):
    import numpy as np

    import clair_jax as cj

    rng = np.random.default_rng(0)
    u = np.linalg.qr(rng.standard_normal((p, 2)))[0]
    if kind == "dense":
        fed = cj.data.make_federation(0, num_clients=k, p=p, q=q, rank=2, contamination=0.25, noise=0.1,
                                      num_layers=layers if layers > 1 else None)
        return fed.updates
    b = np.einsum("pr,lkrs->lkps", u, rng.standard_normal((layers, k, 2, q)))
    b += 0.05 * rng.standard_normal(b.shape) / np.sqrt(p)
    b[:, : k // 4] = rng.standard_normal((layers, k // 4, p, q)) / np.sqrt(p)
    a = rng.standard_normal((layers, k, q, p)) / np.sqrt(p)
    return cj.LoRAFactors(b.astype(np.float32), a.astype(np.float32))


def worker(case, options):
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import warnings

    import jax
    import numpy as np

    import clair_jax as cj
    from clair_jax import _compile

    if options == "xla-defaults":
        _compile.CPU_OPTIONS.clear()
    updates = _federation(*(CASES | QUICK_CASES)[case])
    jax.block_until_ready(updates)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        res = jax.block_until_ready(cj.clair(updates))
        cold = time.perf_counter() - t0
        warm = []
        for _ in range(3):
            t0 = time.perf_counter()
            jax.block_until_ready(cj.clair(updates))
            warm.append(time.perf_counter() - t0)
    refined = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(res.refined)])
    print(json.dumps(dict(case=case, options=options, cold_s=cold, warm_s=statistics.median(warm),
                          client_benign=np.asarray(res.client_benign).tolist(), refined=refined.tolist())))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one tiny case (smoke test)")
    parser.add_argument("--json", default="bench_results/bench_compile.json")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(*args.worker)

    import numpy as np

    from benchmarks._common import machine_info, markdown_table, write_json

    info = machine_info()
    print(f"bench_compile on {info['cpu_count']} CPU(s), load {info['loadavg_at_start']}", flush=True)
    rows = []
    for case in QUICK_CASES if args.quick else CASES:
        runs = {}
        for options in ("clair", "xla-defaults"):
            env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
            env.pop("JAX_COMPILATION_CACHE_DIR", None)   # cold means cold
            out = subprocess.run([sys.executable, __file__, "--worker", case, options], env=env,
                                 capture_output=True, text=True, timeout=900)
            if out.returncode != 0:
                raise RuntimeError(f"{case} / {options} failed:\n{out.stderr[-3000:]}")
            runs[options] = json.loads(out.stdout.strip().splitlines()[-1])
        ours, xla = runs["clair"], runs["xla-defaults"]
        a, b = np.asarray(ours["refined"]), np.asarray(xla["refined"])
        rows.append(dict(case=case, cold_s=ours["cold_s"], cold_xla_defaults_s=xla["cold_s"],
                         warm_ms=1e3 * ours["warm_s"], warm_xla_defaults_ms=1e3 * xla["warm_s"],
                         same_verdicts="yes" if ours["client_benign"] == xla["client_benign"] else "no",
                         refined_rel_diff=float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))))
        r = rows[-1]
        print(f"  {case}: cold {r['cold_s']:.1f} s vs {r['cold_xla_defaults_s']:.1f} s, "
              f"warm {r['warm_ms']:.1f} vs {r['warm_xla_defaults_ms']:.1f} ms", flush=True)
    print()
    print(markdown_table(rows, [("case", "case", ""), ("cold_s", "cold call, CLAIR's options (s)", ".1f"),
                                ("cold_xla_defaults_s", "cold call, XLA defaults (s)", ".1f"),
                                ("warm_ms", "warm call, CLAIR's options (ms)", ".1f"),
                                ("warm_xla_defaults_ms", "warm call, XLA defaults (ms)", ".1f"),
                                ("same_verdicts", "same verdicts", ""),
                                ("refined_rel_diff", "refined rel. diff", ".1e")]))
    write_json(args.json, {"benchmark": "bench_compile", "machine": info, "args": vars(args), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
