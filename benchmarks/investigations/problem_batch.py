"""Detection pass of the 7B-shaped call with modules vmapped in chunks of B: time, CPU time, same answers.

One process, the ``bench_llm`` LoRA workload (K = 32 clients, 4096 × 16
factors, 20 % off-subspace) reduced exactly to 512 × 512 problems, then
:func:`clair_jax.detect._pass_all` (λ path + refit, one pass) run with
``sharding.over_problems(..., "chunks", batch=B)`` for each B: cold (compile
included) once, then warm, the batch sizes alternated ``--rounds`` times
(this VM's timings drift). Wall and CPU time (``resource.getrusage``, both
cores counted) per module; each B's verdicts, iterations, rank caps and L̂ are
compared with B = 1. Also prints the ALM iterations per λ of every module
(``--iters``): a vmapped ``while_loop`` runs as long as its slowest member.
``--budgets`` runs each B at each partial-SVT budget (columns of its basis; default
the one ``linalg.rank_budget`` gives the adapters' rank).

Usage::

    python benchmarks/investigations/problem_batch.py [--noise 0.05] [--modules 16]
                                                      [--batches 1 4 8 16] [--budgets 40 32] [--rounds 2]
                                                      [--iters] [--quick]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--modules", type=int, default=16)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--budgets", type=int, nargs="+", default=None,
                        help="partial-SVT budgets to compare (default: the rule's for the adapters' rank)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iters", action="store_true", help="print the ALM iterations per λ of every module")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--json", default="bench_results/problem_batch.json")
    args = parser.parse_args(argv)
    clients, d, rank = (32, 4096, 16) if not args.quick else (12, 64, 4)
    if args.quick:
        args.modules, args.batches, args.rounds = 4, [1, 2], 1

    import jax
    import jax.numpy as jnp
    import numpy as np

    import clair_jax as cj
    from benchmarks._common import machine_info, markdown_table, write_json
    from benchmarks.bench_llm import make_factors
    from clair_jax import detect, stack
    from clair_jax.options import ClairOptions

    b, a, _ = make_factors(0, args.modules, clients, d, rank, noise=args.noise)
    pr = stack.problems(cj.LoRAFactors(b, a), "left")
    opts = ClairOptions.checked()
    dims, k = pr.dims, pr.num_clients
    shape = (pr.blocks.shape[-2], k * pr.blocks.shape[-1])
    # The pass's grid, threshold and settings as cj.clair sets them; only B and the budget vary.
    lams, threshold, settings = detect._setup(pr.blocks.shape, pr.blocks.dtype, dims, rank, jax.default_backend(),
                                              opts)
    budget = settings.svt_budget
    prep = jax.block_until_ready(detect._prepare_all(pr.blocks, pr.usable, dims=dims))
    sigma, edge = np.asarray(prep.sigma), np.asarray(prep.edge)
    mu = np.where(sigma * edge < detect._mu_floor(pr.blocks.dtype), 0.0, sigma * edge).astype(np.float32)

    def static(batch, columns):
        return settings._replace(batch=batch, svt_budget=columns, carry_width=detect.carry_width(columns, shape))

    def run(config):
        t0, c0 = time.perf_counter(), _cpu()
        out = jax.block_until_ready(detect._pass_all(prep, pr.blocks, pr.usable, lams, mu, threshold,
                                                     static=static(*config)))
        return out, time.perf_counter() - t0, _cpu() - c0

    info = machine_info()
    print(f"{args.modules} modules, stacks {shape[0]}×{shape[1]}, budget {budget}, noise {args.noise}, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    configs = [(batch, columns) for batch in args.batches for columns in (args.budgets or [budget])]
    results, cold, warm = {}, {}, {config: [] for config in configs}
    for config in configs:
        results[config], *cold[config] = run(config)
        print(f"B = {config[0]:3d}, budget {config[1]:3d} cold: {cold[config][0]:.2f} s (CPU {cold[config][1]:.2f} s)",
              flush=True)
    for _ in range(args.rounds):
        for config in configs:
            _, wall, cpu = run(config)
            warm[config].append((wall, cpu))
    n, rows = args.modules, []
    first = results[configs[0]]
    for config in configs:
        batch, columns = config
        wall, cpu = min(w for w, _ in warm[config]), min(c for _, c in warm[config])
        out = results[config]
        same = all(bool((np.asarray(getattr(out, f)) == np.asarray(getattr(first, f))).all())
                   for f in ("benign", "rank_cap")) and bool(
            (np.asarray(out.decomposition.iterations) == np.asarray(first.decomposition.iterations)).all())
        rows.append(dict(batch=batch, budget=columns, cold_s=cold[config][0], cold_cpu_s=cold[config][1],
                         warm_ms=1e3 * wall / n,
                         warm_cpu_ms=1e3 * cpu / n, cpu_over_wall=cpu / wall, same=same,
                         max_low_rank_diff=float(jnp.max(jnp.abs(out.decomposition.low_rank
                                                                 - first.decomposition.low_rank)))))
    print()
    print(markdown_table(rows, [
        ("batch", "B", "d"), ("budget", "budget", "d"), ("cold_s", "cold (s)", ".1f"), ("cold_cpu_s", "cold CPU (s)", ".1f"),
        ("warm_ms", "warm wall (ms/module)", ".0f"), ("warm_cpu_ms", "warm CPU (ms/module)", ".0f"),
        ("cpu_over_wall", "CPU / wall", ".2f"), ("same", "same verdicts, iterations, rank caps as the first row", ""),
        ("max_low_rank_diff", "max |ΔL̂| vs the first row", ".1e")]))
    print(f"load at the end {os.getloadavg()[0]:.2f}")
    write_json(args.json, dict(benchmark="problem_batch", machine=info, args=vars(args), rows=rows,
                               load_at_end=os.getloadavg()[0]))
    if args.iters:
        from clair_jax.solvers import solve_alm_path

        usable = jnp.ones((k,), bool)

        def path_iterations(x, m):
            def clean(sol):
                split = detect.split_scores(detect.block_scores(sol.sparse, x, usable), usable, opts.min_gap)
                return (split.gap > 0) & (sol.singular_values[0] > 0)
            return solve_alm_path(x, lams, m, tol=detect.SCREEN_TOL, max_iter=opts.max_iter, spectral_norm=1.0,
                                  svt_budget=budget, until=clean, extra=1, extra_tol=detect.RANK_TOL).iterations

        its = jax.jit(lambda x, m: jax.lax.map(lambda z: path_iterations(*z), (x, m)))(prep.x, jnp.asarray(mu))
        print("ALM iterations per λ (rows: modules; λ grid", np.round(np.asarray(lams), 3).tolist(), "):")
        print(np.asarray(its))
    return rows


if __name__ == "__main__":
    main()
