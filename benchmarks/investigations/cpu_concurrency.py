"""Can two XLA:CPU programs run at once, and what do they gain?

XLA:CPU runs the parallel pieces of every program on one intra-op thread pool
(one thread per core unless ``PJRT_NPROC`` says otherwise when the backend
starts). A program that waits inside a loop holds one of its threads, so as many
concurrent programs as pool threads can wait on each other for ever. This script
checks, each case in a fresh process with a time limit and each pool size of
``--pool``, which programs hang and what the others gain from the second core:
the same jitted program on its own data on each of 2 host devices
(``--xla_force_host_platform_device_count``), dispatched once one after another
and once together, warm. clair_jax asks for a pool of 2 threads per core and
runs at most half the pool's size of its programs at once
(``clair_jax._compile.host_lanes``).

Cases (the smallest first):

* ``loop`` — a ``lax.map`` of a 50-step ``while_loop`` of 256 × 256 products;
* ``loop+svd inside`` — the same with an SVD in the loop body;
* ``loop, then svd`` — the ``lax.map`` followed by an SVD of its result;
* ``λ path`` — one 7B-shaped LoRA module's ALM λ path (``solve_alm_path``);
* ``detection pass, no refit`` / ``detection pass`` — ``detect._pass_all`` on one
  7B-shaped module per device, without and with the refit test.

Usage::

    python benchmarks/investigations/cpu_concurrency.py [--pool 2 4] [--timeout 60] [--cases ...] [--quick]
                                                        [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CASES = ["loop", "loop+svd inside", "loop, then svd", "λ path", "detection pass, no refit", "detection pass"]


def _program(case):
    """(jitted function, [args on device 0, args on device 1]) for ``case``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    devices = jax.devices()
    if case.startswith("loop"):
        def inner(x):
            def body(s):
                y = s[1] @ s[1].T / 256
                if case == "loop+svd inside":
                    y = y * jnp.linalg.svd(s[1], compute_uv=False)[0] / 100
                return s[0] + 1, y
            return jax.lax.while_loop(lambda s: s[0] < 50, body, (0, x))[1]

        def fn(xs):
            y = jax.lax.map(inner, xs)
            return y * jnp.linalg.svd(y, compute_uv=False)[..., :1, None] if case == "loop, then svd" else y

        data = [np.random.default_rng(i).standard_normal((4, 256, 256)).astype(np.float32) for i in range(2)]
        return jax.jit(fn), [(jax.device_put(x, d),) for x, d in zip(data, devices)]

    import clair_jax as cj
    from benchmarks.bench_llm import make_factors
    from clair_jax import detect, linalg, stack, tuning
    from clair_jax.options import ClairOptions
    from clair_jax.solvers import solve_alm_path

    b, a, _ = make_factors(0, 2, 32, 4096, 16, noise=0.1)
    problems = stack.problems(cj.LoRAFactors(jnp.asarray(b), jnp.asarray(a)), "left")
    prep = detect._prepare_all(problems.blocks, problems.usable, dims=problems.dims)
    lams = jnp.asarray(tuning.lambda_grid(32, *problems.dims), jnp.float32)
    if case == "λ path":
        def fn(x, mu):
            return solve_alm_path(x, lams, mu, tol=detect.SCREEN_TOL, max_iter=3000, spectral_norm=1.0,
                                  svt_budget=40, extra=1).low_rank

        return jax.jit(fn), [jax.device_put((prep.x[i], prep.sigma[i] * prep.edge[i]), d)
                             for i, d in enumerate(devices)]
    # One detection pass as until_settled runs it, captured from a real call.
    options = ClairOptions.checked(refit=case == "detection pass")
    captured = []
    real = detect._pass_all
    detect._pass_all = lambda *args, **kw: captured.append((args, kw)) or real(*args, **kw)
    try:
        detect.until_settled(problems, options)
    finally:
        detect._pass_all = real
    args, kw = captured[0]
    one = [jax.tree_util.tree_map(lambda x, i=i: x[i:i + 1] if getattr(x, "ndim", 0) and x.shape[0] == 2 else x, args)
           for i in range(2)]
    return (lambda *xs: real(*xs, **kw)), [jax.device_put(o, d) for o, d in zip(one, devices)]


def worker(case):
    """One case in this process: prints a JSON line (the parent enforces the time limit)."""
    import jax

    fn, per_device = _program(case)
    for args in per_device:                 # compile, and warm both devices
        jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for args in per_device:
        jax.block_until_ready(fn(*args))
    sequential = time.perf_counter() - t0
    print(json.dumps(dict(case=case, sequential_s=sequential)), flush=True)
    t0 = time.perf_counter()
    jax.block_until_ready([fn(*args) for args in per_device])
    together = time.perf_counter() - t0
    print(json.dumps(dict(case=case, sequential_s=sequential, concurrent_s=together,
                          speedup=sequential / together)), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per case before it counts as hung")
    parser.add_argument("--pool", type=int, nargs="+", default=[2, 4],
                        help="XLA:CPU intra-op pool sizes to try (PJRT_NPROC)")
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument("--quick", action="store_true", help="only the smallest case (smoke test)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--json", default="bench_results/cpu_concurrency.json")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.quick:
        args.cases, args.pool = CASES[:1], args.pool[-1:]

    from benchmarks._common import machine_info, markdown_table, write_json

    info = machine_info()
    print(f"cpu_concurrency on {info['cpu_count']} CPU(s), load {info['loadavg_at_start']}", flush=True)
    rows = []
    for pool in args.pool:
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PJRT_NPROC=str(pool),
                   XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip())
        for case in args.cases:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", case]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
                stdout, hung = out.stdout, False
                if out.returncode != 0:
                    raise RuntimeError(f"case {case!r} failed:\n{out.stderr[-3000:]}")
            except subprocess.TimeoutExpired as e:
                stdout, hung = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), True
            lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
            row = dict(case=case, pool=pool, sequential_s=float("nan"), concurrent_s=float("nan"), speedup=float("nan"))
            if lines:
                row.update(lines[-1])
            row["result"] = "hangs" if hung else "runs"
            rows.append(row)
            print(f"  pool {pool}: {case:26s} {row['result']}: sequential {row['sequential_s']:.3f} s, "
                  f"concurrent {row['concurrent_s']:.3f} s", flush=True)
    print()
    print(markdown_table(rows, [("case", "program", ""), ("pool", "pool threads", "d"), ("result", "two at once", ""),
                                ("sequential_s", "one after another (s)", ".3f"),
                                ("concurrent_s", "together (s)", ".3f"), ("speedup", "speed-up", ".2f")]))
    write_json(args.json, dict(benchmark="cpu_concurrency", machine=info, args=vars(args), rows=rows))
    return rows


if __name__ == "__main__":
    main()
