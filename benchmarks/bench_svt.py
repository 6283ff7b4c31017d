"""Partial (warm-started, certified) SVT and whole-spectrum Gram SVT vs the full-SVD SVT, by size.

For each size of the stacked matrix (p × K·q):

* one SVT call: full SVD path vs the rank-k partial SVT of ``clair_jax.linalg``
  after a warm start (the regime inside the solver loop) vs the whole spectrum
  from the certified Gram eigendecomposition (budget = short side), and one bare
  SVD (the floor);
* a whole exact-program solve (ALM, jitted) with each SVT: time, iterations,
  time per iteration, relative objective difference, and whether the detected
  contaminated set agrees;
* what :func:`clair_jax.linalg.choose_svt_budget` picks for ``svt="auto"``.

Usage::

    python benchmarks/bench_svt.py [--quick] [--json PATH]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see README: avoids BLAS oversubscription

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._common import machine_info, make_blocks, markdown_table, time_call, write_json
from benchmarks._fast_solvers import fast_solvers
from clair_jax import linalg
from clair_jax.prox import svt_with_spectrum
from clair_jax.stack import to_stacked

# (K, p, q, rank)
FULL_SIZES = [(20, 16, 8, 2), (32, 32, 16, 4), (32, 64, 16, 4), (32, 128, 16, 4), (32, 256, 16, 8),
              (32, 512, 16, 8), (32, 1024, 32, 16)]
QUICK_SIZES = [(8, 64, 8, 2)]


def lam_for(k, rank):
    """λ inside the exact-recovery window: above √(r/K) (benign blocks stay in L)."""
    return max(0.7, 1.6 * (rank / k) ** 0.5)


def run(sizes, repeats):
    solve_exact, _ = fast_solvers()
    rows = []
    for k, p, q, rank in sizes:
        blocks, mask = make_blocks(0, k, p, q, rank=rank, contaminated=0.25, noise=0.0)
        blocks = jnp.asarray(blocks)
        scale = jnp.linalg.norm(to_stacked(blocks), ord=2)
        scaled = blocks / scale
        shape = (p, k * q)
        budget = linalg.rank_budget(shape, rank)
        short = min(shape)
        rule = linalg.svt_method(shape, linalg.choose_svt_budget(shape, "auto", rank))

        # --- whole solves ---
        solves = {}
        for label, b in (("full", None), ("partial", budget), ("gram", short)):
            fn = jax.jit(lambda m, b=b: solve_exact(m, lam_for(k, rank), tol=3e-6, max_iter=1000, svt_budget=b))
            out = jax.block_until_ready(fn(scaled))
            t = time_call(lambda: jax.block_until_ready(fn(scaled)), repeats=repeats)[0]
            norms = np.linalg.norm(np.asarray(out.sparse), axis=(-2, -1))
            flagged = norms > 1e-3 * np.linalg.norm(np.asarray(scaled), axis=(-2, -1))
            solves[label] = dict(t=t, it=int(out.iterations), obj=float(out.objective),
                                 conv=bool(out.converged), flagged=flagged,
                                 low=np.asarray(out.low_rank))
        # --- one SVT call in the regime of the late iterations: the argument is the
        # solution's low-rank part plus a full-rank perturbation below the threshold ---
        tau = 0.05
        low_stacked = to_stacked(jnp.asarray(solves["full"]["low"]))
        noise = jax.random.normal(jax.random.PRNGKey(1), low_stacked.shape, low_stacked.dtype)
        x = low_stacked + 0.5 * tau * noise / jnp.linalg.norm(noise, ord=2)
        full = jax.jit(svt_with_spectrum)
        part = jax.jit(linalg.partial_svt_with_spectrum)
        svd = jax.jit(lambda a: jnp.linalg.svd(a, full_matrices=False))
        state = linalg.init_subspace(shape, budget)
        for _ in range(5):  # warm start, as inside the loop
            (_, _), state = part(x, tau, state)
        warm_fallbacks = int(state.fallbacks)
        t_full = time_call(lambda: jax.block_until_ready(full(x, tau)), repeats=repeats)[0]
        t_part = time_call(lambda: jax.block_until_ready(part(x, tau, state)), repeats=repeats)[0]
        t_svd = time_call(lambda: jax.block_until_ready(svd(x)), repeats=repeats)[0]
        whole = linalg.init_subspace(shape, short)
        t_gram = time_call(lambda: jax.block_until_ready(part(x, tau, whole)), repeats=repeats)[0]
        (low_p, _), st2 = part(x, tau, state)
        (low_g, _), st_g = part(x, tau, whole)
        low_f, _ = full(x, tau)
        rel = lambda a: float(jnp.linalg.norm(a - low_f) / jnp.maximum(jnp.linalg.norm(low_f), 1e-30))  # noqa: E731
        call_fallback = int(st2.fallbacks) > warm_fallbacks

        f, pa, g = solves["full"], solves["partial"], solves["gram"]
        rows.append(dict(
            K=k, p=p, q=q, rank=rank, matrix=f"{p}x{k * q}", budget=budget,
            lam=lam_for(k, rank), rule=rule,
            svd_ms=t_svd * 1e3, svt_full_ms=t_full * 1e3, svt_partial_ms=t_part * 1e3,
            svt_speedup=t_full / t_part, svt_call_rel_err=rel(low_p),
            svt_gram_ms=t_gram * 1e3, svt_gram_speedup=t_full / t_gram, svt_gram_rel_err=rel(low_g),
            svt_gram_fallback=int(st_g.fallbacks) > 0,
            solve_gram_ms=g["t"] * 1e3, iters_gram=g["it"], solve_gram_speedup=f["t"] / g["t"],
            gram_objective_rel_diff=abs(g["obj"] - f["obj"]) / abs(f["obj"]),
            gram_same_verdicts=bool(np.array_equal(f["flagged"], g["flagged"])),
            svt_call_fallback=call_fallback, warmup_fallbacks=warm_fallbacks,
            solve_full_ms=f["t"] * 1e3, solve_partial_ms=pa["t"] * 1e3,
            iters_full=f["it"], iters_partial=pa["it"],
            iter_full_ms=f["t"] / max(f["it"], 1) * 1e3, iter_partial_ms=pa["t"] / max(pa["it"], 1) * 1e3,
            iter_full_over_svd=f["t"] / max(f["it"], 1) / t_svd,
            iter_partial_over_svd=pa["t"] / max(pa["it"], 1) / t_svd,
            solve_speedup=f["t"] / pa["t"],
            objective_rel_diff=abs(pa["obj"] - f["obj"]) / abs(f["obj"]),
            low_rank_rel_diff=float(np.linalg.norm(pa["low"] - f["low"]) / np.linalg.norm(f["low"])),
            same_verdicts=bool(np.array_equal(f["flagged"], pa["flagged"])),
            verdicts_correct=bool(np.array_equal(pa["flagged"], ~mask)),
            converged=f["conv"] and pa["conv"] and g["conv"],
        ))
        r = rows[-1]
        print(f"  {r['matrix']:>10}: SVT full {r['svt_full_ms']:.2f} ms, partial {r['svt_partial_ms']:.2f} ms, "
              f"Gram {r['svt_gram_ms']:.2f} ms; solve {r['solve_full_ms']:.1f} → {r['solve_partial_ms']:.1f} "
              f"(partial), {r['solve_gram_ms']:.1f} ms (Gram)", flush=True)
    return rows


COLUMNS = [
    ("matrix", "stacked p×Kq", ""), ("rank", "r", "d"), ("budget", "k", "d"), ("rule", "auto rule", ""),
    ("svd_ms", "1 SVD (ms)", ".2f"), ("svt_full_ms", "SVT full (ms)", ".2f"),
    ("svt_partial_ms", "SVT partial (ms)", ".2f"), ("svt_speedup", "SVT speed-up", ".1f"),
    ("svt_call_rel_err", "SVT rel err", ".0e"),
    ("iter_full_ms", "iter full (ms)", ".2f"), ("iter_partial_ms", "iter partial (ms)", ".2f"),
    ("iter_full_over_svd", "iter full / SVD", ".2f"),
    ("solve_speedup", "solve speed-up", ".1f"), ("iters_full", "iters full", "d"),
    ("iters_partial", "iters partial", "d"), ("objective_rel_diff", "obj rel diff", ".1e"),
    ("low_rank_rel_diff", "‖ΔL‖/‖L‖", ".1e"), ("same_verdicts", "same verdicts", ""),
]
GRAM_COLUMNS = [
    ("matrix", "stacked p×Kq", ""), ("rule", "auto rule", ""), ("svt_full_ms", "SVT full (ms)", ".2f"),
    ("svt_gram_ms", "SVT Gram (ms)", ".2f"), ("svt_gram_speedup", "SVT speed-up", ".1f"),
    ("svt_gram_rel_err", "SVT rel err", ".0e"), ("solve_full_ms", "solve full (ms)", ".1f"),
    ("solve_partial_ms", "solve partial (ms)", ".1f"), ("solve_gram_ms", "solve Gram (ms)", ".1f"),
    ("solve_gram_speedup", "Gram solve speed-up", ".1f"), ("iters_gram", "iters Gram", "d"),
    ("gram_objective_rel_diff", "obj rel diff", ".1e"), ("gram_same_verdicts", "same verdicts", ""),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default="bench_results/bench_svt.json")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    info = machine_info()
    print(f"bench_svt on {info['cpu_count']} CPU(s), backend {info['jax_backend']}, "
          f"load {info['loadavg_at_start']}")
    rows = run(QUICK_SIZES if args.quick else FULL_SIZES, 2 if args.quick else args.repeats)
    for r in rows:
        r["same_verdicts"] = "yes" if r["same_verdicts"] else "NO"
        r["gram_same_verdicts"] = "yes" if r["gram_same_verdicts"] else "NO"
    print()
    print(markdown_table(rows, COLUMNS))
    print()
    print(markdown_table(rows, GRAM_COLUMNS))
    write_json(args.json, dict(benchmark="bench_svt", machine=info, args=vars(args), rows=rows))
    return rows


if __name__ == "__main__":
    main()
