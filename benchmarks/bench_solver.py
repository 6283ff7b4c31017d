"""clair_jax vs CVXPY (SCS) vs plain NumPy, at matched objective.

For each size and each program (exact: ALM; penalised: FISTA):

* **clair_jax**: the jitted, vmapped solver run to its default tolerance; timed
  after a warm-up compile, ``block_until_ready``, median of ``--repeats``.
* **NumPy**: ``benchmarks/numpy_reference.py``, the same iterations with
  ``numpy.linalg.svd`` and a Python loop over layers, run to the same tolerance
  (it then reaches the same objective in the same number of iterations; the
  table shows the objective difference so the match is visible).
* **CVXPY (SCS)**: the same convex program written in CVXPY, solved by SCS to
  ``eps=1e-6``; its optimum is the reference for the relative objective gap
  ``(f_clair − f_cvxpy)/|f_cvxpy|``. Only run where SCS finishes in reasonable
  time (not for the stacked-layer size: that would be 32 separate SDPs).
* **SVD floor**: one jitted batched SVD of the stacked (p, K·q) matrices; the
  table reports time-per-iteration / SVD time.
* **One core each** (stacked layers only): ``cj.decompose`` and NumPy (one BLAS
  thread) in one fresh process pinned to one CPU core (``sched_setaffinity``),
  timed in 5 alternating rounds; the ratio is the median of the per-round ratios.
  The main process's clair_jax column is not one core: XLA:CPU may spread its
  small ops over every core it sees, which on 2 cores made it slower, not faster.
* **Both cores** (stacked layers only, ``--cores 2``): clair_jax with the layer
  axis sharded over 2 forced host devices (:func:`clair_jax.sharding.map_over_layers`
  of the same single-problem solve), and NumPy with ``OPENBLAS_NUM_THREADS=2``, each
  in a fresh process; "NumPy best / clair 2 dev" compares each at its best setting.

Usage::

    python benchmarks/bench_solver.py [--quick] [--json PATH] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see README: avoids BLAS oversubscription

import numpy as np

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import jax
import jax.numpy as jnp

from benchmarks import numpy_reference
from benchmarks._common import machine_info, make_blocks, markdown_table, time_call, write_json

# (name, layers or None, K, p, q, rank, cvxpy?)
FULL_SIZES = [
    ("small", None, 20, 16, 8, 2, True),
    ("medium", None, 40, 64, 16, 4, True),
    ("32 layers", 32, 32, 64, 16, 4, False),
]
QUICK_SIZES = [("tiny", None, 8, 8, 4, 2, True), ("tiny layers", 2, 8, 8, 4, 2, False)]
LAM_EXACT = 0.7     # inside the exact-recovery window for these federations (checked)
LAM_PENALIZED = 1.2  # DESIGN §2 default check
NOISE = 0.05


def penalized_mu(blocks, noise):
    """μ = σ(√p + √(Kq)) in the user's units, σ the per-entry noise level of make_blocks."""
    k, p, q = blocks.shape[-3:]
    scale = np.sqrt(np.mean(np.sum(np.asarray(blocks, np.float64) ** 2, axis=(-2, -1))))
    sigma = noise * scale / np.sqrt(p * q)
    return float(sigma * (np.sqrt(p) + np.sqrt(k * q)))


def jax_decompose_fn(lam, mu, tol, max_iter):
    """A callable blocks → (objective, iterations, converged), fully blocking.

    Uses the public ``cj.decompose`` when it exists; otherwise the single-problem
    solvers with the same per-problem spectral normalisation, jitted and vmapped.
    """
    try:
        import clair_jax as cj

        decompose = cj.decompose
    except AttributeError:
        decompose = None
    if decompose is not None:
        def run(blocks):
            out = decompose(blocks, lam=lam, mu=mu, tol=tol, max_iter=max_iter)
            jax.block_until_ready(out.objective)
            return out.objective, out.iterations, out.converged
        return run, "cj.decompose"

    from clair_jax.solvers import solve_exact, solve_penalized
    from clair_jax.stack import to_stacked

    def one(blocks):
        scale = jnp.maximum(jnp.linalg.norm(to_stacked(blocks), ord=2), jnp.finfo(blocks.dtype).tiny)
        if mu is None:
            out = solve_exact(blocks / scale, lam, tol=tol, max_iter=max_iter)
            return out.objective * scale, out.iterations, out.converged
        out = solve_penalized(blocks / scale, lam, mu / scale, tol=tol, max_iter=max_iter)
        return out.objective * scale**2, out.iterations, out.converged

    @jax.jit
    def batched(blocks):
        lead = blocks.shape[:-3]
        flat = blocks.reshape((-1,) + blocks.shape[-3:])
        obj, it, conv = jax.vmap(one)(flat)
        return obj.reshape(lead), it.reshape(lead), conv.reshape(lead)

    def run(blocks):
        return jax.block_until_ready(batched(blocks))
    return run, "solvers (jit+vmap)"


def cvxpy_solve(blocks, lam, mu, eps):
    """Solve one (K, p, q) problem with CVXPY + SCS. Returns (objective, seconds, status)."""
    import cvxpy as cp

    k, p, q = blocks.shape
    m = np.transpose(np.asarray(blocks, np.float64), (1, 0, 2)).reshape(p, k * q)
    low = cp.Variable((p, k * q))
    sparse = cp.Variable((p, k * q))
    block_pen = cp.sum(cp.hstack([cp.norm(sparse[:, i * q:(i + 1) * q], "fro") for i in range(k)]))
    reg = cp.normNuc(low) + lam * block_pen
    if mu is None:
        prob = cp.Problem(cp.Minimize(reg), [low + sparse == m])
    else:
        prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(m - low - sparse) + mu * reg))
    t0 = time.perf_counter()
    prob.solve(solver=cp.SCS, eps_abs=eps, eps_rel=eps, max_iters=200_000)
    return float(prob.value), time.perf_counter() - t0, prob.status


WORKER = """
import os, sys, json
if {pin}:  # one core for the whole process, before XLA sizes its thread pool
    os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}})
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count={cores}"
os.environ["OPENBLAS_NUM_THREADS"] = "{threads}"
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp, numpy as np
from benchmarks._common import make_blocks, time_call
from benchmarks.bench_solver import penalized_mu
from benchmarks import numpy_reference
from clair_jax import linalg, sharding
from clair_jax.decompose import solve_one
k, p, q, rank, layers, noise, lam, exact, tol, max_iter, repeats, whats, rounds = {args}
blocks = make_blocks(0, k, p, q, rank=rank, contaminated=0.25, noise=noise, layers=layers, dtype=np.float32)[0]
mu = None if exact else penalized_mu(blocks, noise)
jb = jnp.asarray(blocks)

def runner(what):
    if what == "jax":
        import clair_jax as cj
        return lambda: jax.block_until_ready(cj.decompose(jb, lam=lam, mu=mu, tol=tol, max_iter=max_iter).objective)
    if what == "jax-sharded":
        budget = linalg.choose_svt_budget((p, k * q), "auto")  # what cj.decompose picks
        fn = sharding.map_over_layers(lambda b: solve_one(b, lam, 0.0 if exact else mu, exact=exact, tol=tol,
                                                          max_iter=max_iter, svt_budget=budget).objective)
        return lambda: jax.block_until_ready(fn(jb))
    return lambda: numpy_reference.decompose(blocks, lam=lam, mu=mu, tol=tol, max_iter=max_iter)[0]

runs = {{w: runner(w) for w in whats}}
objective = {{w: float(np.sum(np.asarray(run()))) for w, run in runs.items()}}  # also the warm-up
times = {{w: [] for w in whats}}
for _ in range(rounds):  # alternate, so that this VM's drift hits every side alike
    for w, run in runs.items():
        times[w].append(time_call(run, repeats=repeats if w.startswith("jax") else 1, warmup=0)[0])
out = {{w: dict(seconds=float(np.median(times[w])), objective=objective[w], rounds=times[w]) for w in whats}}
if len(whats) == 2:
    out["ratio"] = float(np.median(np.array(times[whats[1]]) / np.array(times[whats[0]])))
print("RESULT" + json.dumps(dict(devices=len(jax.devices()), **out)))
"""


def in_fresh_process(whats, k, p, q, rank, layers, noise, lam, exact, tol, max_iter, repeats, *, cores=1,
                     pin=False, rounds=3):
    """Seconds (and objective) of one configuration per implementation in ``whats``,
    timed in one fresh process (the host device count, BLAS threads and CPU affinity
    are fixed when a process starts), in ``rounds`` alternating rounds.

    ``whats``: any of ``"jax"`` (``cj.decompose`` on one device), ``"jax-sharded"``
    (the layer axis sharded over ``cores`` host devices), ``"numpy"`` (``cores`` BLAS
    threads). ``pin``: the process may use one CPU core only (``sched_setaffinity``).
    Returns ``{what: {seconds (median over rounds), objective, rounds}}``, plus for two
    implementations ``ratio``: the median over rounds of second / first.
    """
    sharded, numpy_side = "jax-sharded" in whats, "numpy" in whats
    code = WORKER.format(cores=cores if sharded else 1, threads=cores if numpy_side else 1, pin=bool(pin),
                         root=str(Path(__file__).resolve().parents[1]),
                         args=(k, p, q, rank, layers, noise, lam, exact, tol, max_iter, repeats, tuple(whats),
                               rounds))
    env = {key: v for key, v in os.environ.items() if key not in ("XLA_FLAGS", "OPENBLAS_NUM_THREADS")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(proc.stdout + proc.stderr)
    return json.loads(line[0][len("RESULT"):])


def svd_floor(blocks, repeats):
    """Median time of one jitted batched SVD of the stacked (p, K q) matrices."""
    k, p, q = blocks.shape[-3:]
    stacked = jnp.asarray(blocks).reshape((-1, k, p, q)).transpose(0, 2, 1, 3).reshape(-1, p, k * q)
    svd = jax.jit(lambda x: jnp.linalg.svd(x, full_matrices=False))
    return time_call(lambda: jax.block_until_ready(svd(stacked)), repeats=repeats)[0]


def run(sizes, *, repeats, dtype, tol, max_iter, cvxpy_eps, with_cvxpy=True, cores=1):
    rows = []
    for name, layers, k, p, q, rank, cvx_ok in sizes:
        for program in ("exact", "penalized"):
            noise = 0.0 if program == "exact" else NOISE
            blocks, _ = make_blocks(0, k, p, q, rank=rank, contaminated=0.25, noise=noise,
                                    layers=layers, dtype=dtype)
            lam = LAM_EXACT if program == "exact" else LAM_PENALIZED
            mu = None if program == "exact" else penalized_mu(blocks, noise)
            solve, backend = jax_decompose_fn(lam, mu, tol, max_iter)
            jblocks = jnp.asarray(blocks)
            t_compile0 = time.perf_counter()
            obj_j, it_j, conv_j = solve(jblocks)
            compile_s = time.perf_counter() - t_compile0
            t_jax, _ = time_call(lambda: solve(jblocks), repeats=repeats, warmup=1)
            obj_j = np.atleast_1d(np.asarray(obj_j, np.float64))
            it_j = np.atleast_1d(np.asarray(it_j))

            t0 = time.perf_counter()
            obj_n, it_n, conv_n = numpy_reference.decompose(blocks, lam=lam, mu=mu, tol=tol,
                                                            max_iter=max_iter)
            t_np = time.perf_counter() - t0
            if t_np < 2.0 and repeats > 1:  # cheap enough to take a median
                t_np = time_call(lambda: numpy_reference.decompose(
                    blocks, lam=lam, mu=mu, tol=tol, max_iter=max_iter), repeats=min(repeats, 3),
                    warmup=0)[0]
            obj_n = np.atleast_1d(obj_n)

            row = dict(size=name, layers=layers or 1, K=k, p=p, q=q, program=program,
                       backend=backend, dtype=np.dtype(dtype).name, tol=tol,
                       jax_s=t_jax, jax_compile_s=compile_s,
                       jax_iters=int(it_j.max()), jax_converged=bool(np.all(conv_j)),
                       jax_objective=float(obj_j.sum()),
                       numpy_s=t_np, numpy_iters=int(np.max(it_n)),
                       numpy_converged=bool(np.all(conv_n)),
                       numpy_objective=float(obj_n.sum()),
                       numpy_vs_jax_objective=float(abs(obj_n.sum() - obj_j.sum()) / abs(obj_j.sum())),
                       speedup_numpy=t_np / t_jax, jax_ms=t_jax * 1e3, numpy_ms=t_np * 1e3)
            if layers and hasattr(os, "sched_setaffinity"):
                # One core each, for real: both pinned to one core, in one fresh process,
                # alternating (a one-device XLA:CPU run is slower when it may spread over two).
                args = (k, p, q, rank, layers, noise, lam, mu is None, tol, max_iter, repeats)
                pinned = in_fresh_process(("jax", "numpy"), *args, pin=True, rounds=5)
                jax1, np1 = pinned["jax"], pinned["numpy"]
                row.update(jax_pinned_ms=jax1["seconds"] * 1e3, numpy_pinned_ms=np1["seconds"] * 1e3,
                           speedup_numpy_pinned=pinned["ratio"],
                           pinned_rounds=dict(jax=jax1["rounds"], numpy=np1["rounds"]),
                           pinned_objective_diff=abs(jax1["objective"] - np1["objective"]) / abs(np1["objective"]))
                print(f"  {name:>14} {program:>9}: one core each: clair_jax {jax1['seconds']*1e3:.1f} ms, "
                      f"NumPy {np1['seconds']*1e3:.1f} ms, ratio {pinned['ratio']:.1f}", flush=True)
                if cores > 1:
                    jax2 = in_fresh_process(("jax-sharded",), *args, cores=cores)["jax-sharded"]
                    np2 = in_fresh_process(("numpy",), *args, cores=cores)["numpy"]
                    best_np = min(t_np, np1["seconds"], np2["seconds"])
                    row.update(jax_cores_ms=jax2["seconds"] * 1e3, numpy_cores_ms=np2["seconds"] * 1e3,
                               numpy_best_ms=best_np * 1e3, speedup_numpy_cores=best_np / jax2["seconds"],
                               cores_objective_diff=abs(jax2["objective"] - obj_j.sum()) / abs(obj_j.sum()))
                    print(f"  {name:>14} {program:>9}: {cores} host devices {jax2['seconds']*1e3:.1f} ms, "
                          f"NumPy {cores} threads {np2['seconds']*1e3:.1f} ms", flush=True)
            floor = svd_floor(blocks, repeats)
            row["svd_floor_s"] = floor
            row["iter_over_svd"] = (t_jax / max(int(it_j.max()), 1)) / floor

            if with_cvxpy and cvx_ok:
                obj_c, t_c, status = cvxpy_solve(blocks, lam, mu, cvxpy_eps)
                row.update(cvxpy_s=t_c, cvxpy_status=status, cvxpy_objective=obj_c,
                           gap_vs_cvxpy=float((obj_j.sum() - obj_c) / abs(obj_c)),
                           speedup_cvxpy=t_c / t_jax)
            else:
                row.update(cvxpy_s=None, cvxpy_status="skipped: SCS too slow here (stacked layers = one SDP per layer)"
                           if with_cvxpy else "skipped", gap_vs_cvxpy=None, speedup_cvxpy=None)
            rows.append(row)
            print(f"  {name:>14} {program:>9}: jax {t_jax*1e3:8.2f} ms ({row['jax_iters']} it) "
                  f"numpy {t_np*1e3:9.1f} ms  cvxpy {row['cvxpy_s'] or float('nan'):8.2f} s",
                  flush=True)
    return rows


COLUMNS = [
    ("size", "size", ""), ("layers", "layers", "d"), ("K", "K", "d"), ("p", "p", "d"),
    ("q", "q", "d"), ("program", "program", ""),
    ("jax_ms", "clair_jax (ms)", ".2f"), ("jax_iters", "iters", "d"),
    ("numpy_ms", "NumPy (ms)", ".1f"), ("speedup_numpy", "NumPy/clair", ".1f"),
    ("cvxpy_s", "CVXPY-SCS (s)", ".2f"), ("speedup_cvxpy", "SCS/clair", ".0f"),
    ("gap_vs_cvxpy", "obj gap vs SCS", ".1e"), ("numpy_vs_jax_objective", "obj diff NumPy", ".1e"),
    ("iter_over_svd", "iter / SVD", ".2f"),
]
CORES_COLUMNS = [
    ("size", "size", ""), ("program", "program", ""),
    ("jax_pinned_ms", "clair_jax 1 core (ms)", ".1f"), ("numpy_pinned_ms", "NumPy 1 core (ms)", ".1f"),
    ("speedup_numpy_pinned", "NumPy/clair, 1 core each (median of 5 alternating rounds)", ".1f"), ("pinned_objective_diff", "obj diff", ".1e"),
    ("jax_cores_ms", "clair_jax 2 dev (ms)", ".1f"), ("numpy_cores_ms", "NumPy 2 threads (ms)", ".1f"),
    ("speedup_numpy_cores", "NumPy best / clair 2 dev", ".1f"), ("cores_objective_diff", "obj diff 2 dev", ".1e"),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--json", default="bench_results/bench_solver.json")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--tol", type=float, default=None)
    parser.add_argument("--max-iter", type=int, default=2000)
    parser.add_argument("--cvxpy-eps", type=float, default=1e-6)
    parser.add_argument("--no-cvxpy", action="store_true")
    parser.add_argument("--cores", type=int, default=2,
                        help="also time the stacked-layer size on this many cores (1: skip)")
    args = parser.parse_args(argv)
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = np.dtype(args.dtype)
    tol = args.tol if args.tol is not None else (1e-9 if dtype == np.float64 else 3e-6)
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    info = machine_info()
    print(f"bench_solver on {info['cpu_count']} CPU(s), backend {info['jax_backend']}, "
          f"load {info['loadavg_at_start']}")
    rows = run(sizes, repeats=args.repeats if not args.quick else 2, dtype=dtype, tol=tol,
               max_iter=args.max_iter, cvxpy_eps=args.cvxpy_eps, with_cvxpy=not args.no_cvxpy,
               cores=args.cores)
    print()
    print(markdown_table(rows, COLUMNS))
    multi = [r for r in rows if "jax_pinned_ms" in r]
    if multi:
        print()
        print(markdown_table(multi, CORES_COLUMNS))
    for r in rows:
        if r["cvxpy_s"] is None and r["cvxpy_status"] != "skipped":
            print(f"\nCVXPY skipped at '{r['size']}': {r['cvxpy_status']}.")
            break
    write_json(args.json, dict(benchmark="bench_solver", machine=info, args=vars(args), rows=rows))
    return rows


if __name__ == "__main__":
    main()
