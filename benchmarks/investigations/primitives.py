"""What one ALM iteration's pieces cost on XLA:CPU at the 7B call's reduced shape (512 × 512, k = 32).

Each primitive runs ``--repeats`` times inside one jitted ``fori_loop`` (no dispatch
between them), best of 5, in one process with clair_jax's thread-pool settings: the
partial SVT's products (512 × 512 by 512 × k, and its transpose), a 512³ product,
a 512 × 512 SVD with and without U and V, and the largest eigenvalue's route
(eigvalsh of the 512 × 512 Gram matrix, product included).

Usage::

    python benchmarks/investigations/primitives.py [--n 512] [--k 32] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from benchmarks._common import machine_info, markdown_table, write_json  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="64 × 64, k = 8 (smoke test)")
    parser.add_argument("--json", default="bench_results/primitives.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.k = 64, 8

    import clair_jax  # noqa: F401  (its thread-pool settings, as in a call)
    import jax
    import jax.numpy as jnp

    n, k = args.n, args.k
    x = jax.random.normal(jax.random.PRNGKey(0), (n, n))
    v = jax.random.normal(jax.random.PRNGKey(1), (n, k))

    def timed(f, arg, repeats):
        loop = jax.jit(lambda c: jax.lax.fori_loop(0, repeats, lambda i, c: c + f(c), c))
        jax.block_until_ready(loop(arg))
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            jax.block_until_ready(loop(arg))
            best = min(best, time.perf_counter() - t)
        return 1000 * best / repeats

    cases = [
        (f"{n} × {n} by {n} × {k}", lambda c: 1e-3 * (x @ c), v, 50, 2 * n * n * k),
        (f"({n} × {n})ᵀ by {n} × {k}", lambda c: 1e-3 * (x.T @ c), v, 50, 2 * n * n * k),
        (f"{n}³ product", lambda c: 1e-3 * (x @ c), x, 10, 2 * n ** 3),
        (f"{n} × {n} SVD, values", lambda c: 1e-9 * jnp.sum(jnp.linalg.svd(c, compute_uv=False, full_matrices=False)),
         x, 5, None),
        (f"{n} × {n} SVD, U and V", lambda c: 1e-9 * jnp.linalg.svd(c, full_matrices=False)[0], x, 5, None),
        (f"eigvalsh of the {n} × {n} Gram", lambda c: 1e-9 * jnp.sum(jnp.linalg.eigvalsh(c @ c.T)), x, 5, None),
    ]
    rows = []
    for name, f, arg, repeats, flops in cases:
        ms = timed(f, arg, repeats)
        rows.append(dict(primitive=name, ms=ms, gflops=(flops / ms / 1e6 if flops else None)))
        print(f"  {name}: {ms:.3f} ms", file=sys.stderr, flush=True)
    print(markdown_table(rows, [("primitive", "primitive", "s"), ("ms", "ms", ".3f"), ("gflops", "GFLOP/s", ".0f")]))
    write_json(args.json, dict(benchmark="primitives", machine=machine_info(), args=vars(args), rows=rows))
    return rows


if __name__ == "__main__":
    main()
