"""Tuning cost: a λ grid as a path vs a vmapped batch vs one solve vs a Python loop.

``cj.clair`` chooses λ from a geometric grid (:func:`clair_jax.tuning.lambda_grid`,
9 values) of penalised problems at μ = σ̂(√p + √(Kq)). Here the same grid is solved
(a) as one ``cj.decompose`` call (FISTA) on the problem tiled G times with λ of shape (G,),
(b) as a Python loop of G single-λ ``cj.decompose`` calls, (c) as one jitted FISTA path
(:func:`clair_jax.solvers.solve_penalized_path`: a while_loop up the ascending grid, each
solve warm-started from the previous λ's L), (d) as one jitted ALM path
(:func:`clair_jax.solvers.solve_alm_path`, what ``cj.clair`` runs, there stopped one λ
after the first clean split), against (e) one single-λ solve; the whole ``cj.clair``
call is timed too.

Usage::

    python benchmarks/investigations/bench_lambda_path.py [--quick] [--json PATH]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._common import machine_info, make_blocks, markdown_table, time_call, write_json
from benchmarks.bench_solver import NOISE, penalized_mu

# (name, layers, K, p, q, rank)
FULL = [("small", None, 20, 16, 8, 2), ("medium", None, 40, 64, 16, 4), ("8 layers", 8, 32, 64, 16, 4)]
QUICK = [("tiny", None, 8, 8, 4, 2)]


def run(sizes, repeats, with_clair=True):
    import clair_jax as cj
    from clair_jax.decompose import decompose, spectral_scale
    from clair_jax.linalg import choose_svt_budget
    from clair_jax.solvers import solve_alm_path, solve_penalized_path
    from clair_jax.solvers.common import default_tolerance
    from clair_jax.tuning import lambda_grid

    rows = []
    for name, layers, k, p, q, rank in sizes:
        blocks, _ = make_blocks(0, k, p, q, rank=rank, layers=layers, noise=NOISE)
        blocks = jnp.asarray(blocks)
        mu = penalized_mu(np.asarray(blocks), NOISE)
        grid = np.asarray(lambda_grid(k, p, q), np.float32)
        g = grid.size
        lead = blocks.shape[:-3]
        tiled = jnp.broadcast_to(blocks, (g,) + blocks.shape)
        lam_grid = jnp.broadcast_to(jnp.asarray(grid).reshape((g,) + (1,) * len(lead)), (g,) + lead)
        mid = float(grid[g // 2])

        def single():
            return jax.block_until_ready(decompose(blocks, lam=mid, mu=mu).objective)

        def batched():
            return jax.block_until_ready(decompose(tiled, lam=lam_grid, mu=mu).objective)

        budget = choose_svt_budget((p, k * q), "auto")  # what cj.decompose's default picks

        def one_path(b):
            scale = spectral_scale(b)
            return solve_penalized_path(b / scale, jnp.asarray(grid), mu / scale, spectral_norm=1.0, svt_budget=budget,
                                        tol=default_tolerance(b.dtype), max_iter=3000)  # decompose's penalised default

        path_fn = jax.jit(jax.vmap(one_path) if lead else one_path)

        def one_alm_path(b):
            scale = spectral_scale(b)
            return solve_alm_path(b / scale, jnp.asarray(grid), mu / scale, spectral_norm=1.0, svt_budget=budget,
                                  tol=default_tolerance(b.dtype), max_iter=3000)

        alm_fn = jax.jit(jax.vmap(one_alm_path) if lead else one_alm_path)

        def alm_path():
            return jax.block_until_ready(alm_fn(blocks).objective)

        def path():
            return jax.block_until_ready(path_fn(blocks).objective)

        def loop():
            return [jax.block_until_ready(decompose(blocks, lam=float(l), mu=mu).objective) for l in grid]

        def full_clair():
            res = cj.clair(blocks)
            return jax.block_until_ready(res.benign)

        t_single = time_call(single, repeats=repeats)[0]
        t_batch = time_call(batched, repeats=repeats)[0]
        t_loop = time_call(loop, repeats=max(1, repeats // 2))[0]
        t_path = time_call(path, repeats=repeats)[0]
        path_its = np.asarray(path_fn(blocks).iterations)
        t_alm = time_call(alm_path, repeats=repeats)[0]
        alm_out, fista_out = alm_fn(blocks), path_fn(blocks)
        alm_its = np.asarray(alm_out.iterations)
        alm_gap = float(np.max(np.abs(np.asarray(alm_out.objective) - np.asarray(fista_out.objective))
                               / np.abs(np.asarray(fista_out.objective))))
        t_clair = time_call(full_clair, repeats=max(1, repeats // 2))[0] if with_clair else float("nan")
        its = np.asarray(decompose(tiled, lam=lam_grid, mu=mu).iterations)
        rows.append(dict(size=name, layers=layers or 1, K=k, p=p, q=q, grid=g,
                         single_ms=t_single * 1e3, batch_ms=t_batch * 1e3, loop_ms=t_loop * 1e3,
                         clair_ms=t_clair * 1e3, batch_over_single=t_batch / t_single,
                         path_ms=t_path * 1e3, path_over_single=t_path / t_single,
                         path_iters=int(path_its.sum(axis=0).max()),
                         alm_ms=t_alm * 1e3, alm_iters=int(alm_its.sum(axis=0).max()), alm_obj_gap=alm_gap,
                         loop_over_batch=t_loop / t_batch, clair_over_single=t_clair / t_single,
                         max_iters=int(its.max()), mean_iters=float(its.mean())))
        print(f"  {name}: single {t_single*1e3:.1f} ms, path {t_path*1e3:.1f} ms, grid {t_batch*1e3:.1f} ms, "
              f"loop {t_loop*1e3:.1f} ms, ALM path {t_alm*1e3:.1f} ms (obj gap {alm_gap:.1e}), "
              f"clair {t_clair*1e3:.1f} ms", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default="bench_results/bench_lambda_path.json")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    info = machine_info()
    print(f"bench_lambda_path on {info['cpu_count']} CPU(s), backend {info['jax_backend']}, "
          f"load {info['loadavg_at_start']}")
    rows = run(QUICK if args.quick else FULL, 1 if args.quick else args.repeats,
               with_clair=not args.quick)  # cj.clair's compile is too slow for the smoke test
    print()
    print(markdown_table(rows, [
        ("size", "size", ""), ("layers", "layers", "d"), ("K", "K", "d"), ("p", "p", "d"),
        ("q", "q", "d"), ("grid", "λ values", "d"), ("single_ms", "1 solve (ms)", ".1f"),
        ("path_ms", "FISTA path (ms)", ".1f"), ("path_over_single", "path / 1 solve", ".1f"),
        ("path_iters", "path iters (sum)", "d"),
        ("alm_ms", "ALM path (ms)", ".1f"), ("alm_iters", "ALM iters (sum)", "d"),
        ("alm_obj_gap", "ALM vs FISTA obj", ".1e"),
        ("batch_ms", "tiled grid, cj.decompose (ms)", ".1f"), ("batch_over_single", "grid / 1 solve", ".1f"),
        ("loop_ms", "Python loop (ms)", ".1f"), ("loop_over_batch", "loop / grid", ".1f"),
        ("clair_ms", "cj.clair (ms)", ".1f"), ("max_iters", "grid max iters", "d")]))
    write_json(args.json, dict(benchmark="bench_lambda_path", machine=info, args=vars(args), rows=rows))
    return rows


if __name__ == "__main__":
    main()
