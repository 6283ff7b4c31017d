"""Which ALM penalty schedule takes the fewest iterations on the 7B-shaped LoRA modules?

The exact/penalised ALM (:func:`clair_jax.solvers.solve_alm`) rebalances its penalty ρ
by ``rho_growth`` whenever one residual exceeds the other ``balance`` times. For each
schedule, in a fresh process (the schedule is a default argument, read when the
detection's pass is compiled): the ``bench_llm`` workload (K = 32 clients, 4096 × 16
factors, 20 % off-subspace, ``--noise``) on ``--modules`` modules, reduced exactly to
512 × 512 problems, then the detection's pass (:func:`clair_jax.detect._pass_all`, λ
path + refit) warm, best of 3: wall time per module, the ALM iterations at the chosen
λ, and whether the verdicts and rank caps are those of the default schedule.

Usage::

    python benchmarks/investigations/alm_schedule.py [--noise 0.05] [--modules 8]
                                                     [--schedules 2,10 1.5,10 3,10] [--quick] [--json PATH]
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

from benchmarks._common import machine_info, markdown_table, write_json  # noqa: E402

DEFAULT_SCHEDULES = ("2,10", "1.5,10", "1.5,5", "1.3,3", "2,20", "2,5", "2.5,20", "3,10")


def _worker(growth, balance, noise, modules, quick):
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import jax
    import jax.numpy as jnp
    import numpy as np

    import clair_jax as cj
    from benchmarks.bench_llm import make_factors
    from clair_jax import detect, stack
    from clair_jax.options import ClairOptions
    from clair_jax.solvers import alm

    alm.solve_alm.__kwdefaults__.update(rho_growth=growth, balance=balance)
    clients, d, rank = (12, 64, 4) if quick else (32, 4096, 16)
    b, a, _ = make_factors(0, modules, clients, d, rank, noise=noise)
    problems = stack.problems(cj.LoRAFactors(jnp.asarray(b), jnp.asarray(a)), "left")
    captured = []
    real = detect._pass_all
    detect._pass_all = lambda *args, **kw: captured.append((args, kw)) or real(*args, **kw)
    detect._settle(problems, ClairOptions.checked())
    detect._pass_all = real
    args, kw = captured[0]
    out = jax.block_until_ready(real(*args, **kw))
    times = []
    for _ in range(3):
        t = time.perf_counter()
        out = jax.block_until_ready(real(*args, **kw))
        times.append(time.perf_counter() - t)
    return dict(rho_growth=growth, balance=balance, ms_per_module=1000 * min(times) / modules,
                iterations=np.asarray(out.decomposition.iterations).reshape(-1).tolist(),
                benign=np.asarray(out.benign).astype(int).tolist(), rank_cap=np.asarray(out.rank_cap).tolist())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--modules", type=int, default=8)
    parser.add_argument("--schedules", nargs="+", default=list(DEFAULT_SCHEDULES),
                        help="rho_growth,balance pairs; the first is the reference")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, two schedules (smoke test)")
    parser.add_argument("--json", default="bench_results/alm_schedule.json")
    parser.add_argument("--worker", nargs=2, type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.modules, args.schedules = 2, args.schedules[:2]
    if args.worker:
        print(json.dumps(_worker(*args.worker, args.noise, args.modules, args.quick)))
        return None

    rows = []
    for schedule in args.schedules:
        growth, balance = (float(x) for x in schedule.split(","))
        cmd = [sys.executable, __file__, "--worker", str(growth), str(balance), "--noise", str(args.noise),
               "--modules", str(args.modules)] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
        if proc.returncode != 0:
            raise SystemExit(f"schedule {schedule} failed:\n{proc.stderr[-3000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        reference = rows[0] if rows else row
        row["same_verdicts_and_caps"] = row["benign"] == reference["benign"] and row["rank_cap"] == reference["rank_cap"]
        row["iterations_range"] = f"{min(row['iterations'])}–{max(row['iterations'])}"
        rows.append(row)
        print(f"  growth {growth:g}, balance {balance:g}: {row['iterations_range']} iterations, "
              f"{row['ms_per_module']:.1f} ms/module", file=sys.stderr, flush=True)
    print(markdown_table(rows, [("rho_growth", "ρ growth", "g"), ("balance", "balance", "g"),
                                ("iterations_range", "iterations at the chosen λ", "s"),
                                ("ms_per_module", "pass, warm (ms/module)", ".1f"),
                                ("same_verdicts_and_caps", "same verdicts, rank caps", "")]))
    write_json(args.json, dict(benchmark="alm_schedule", machine=machine_info(), args=vars(args), rows=rows))
    return rows


if __name__ == "__main__":
    main()
