"""One GPU check: the 7B-shaped call, the solver benchmark and ``clair aggregate``, in one table.

Runs, each in its own process so compilation is counted as a user meets it:

* ``bench_llm_call.py`` — the cold 7B-shaped ``cj.clair(LoRAFactors)`` call
  (128 modules of 4096², K = 32, r = 16) at a few noise levels, with
  ``--breakdown`` (per-stage times against one R-only QR of a module's stack);
* ``bench_solver.py --no-cvxpy`` — clair_jax against the NumPy reference
  (CVXPY is a CPU reference, not a GPU figure);
* ``bench_aggregate.py`` — ``clair aggregate`` end to end on a 7B-shaped PEFT
  federation on disk (read, CLAIR, write).

and prints one table. ``benchmarks/gpu_check.sh`` installs what is missing and
calls this; ``--quick`` runs tiny shapes (a smoke test that works on CPU too).

Usage::

    python benchmarks/gpu_check.py [--quick] [--out DIR] [--noise 0 0.05 0.2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(name, argv, out_dir, log):
    """Run one benchmark script; returns (its JSON or None, seconds)."""
    path = out_dir / f"{name}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *argv, "--json", str(path)]
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    log.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\n")
    print(proc.stdout[-4000:], flush=True)
    if proc.returncode != 0:
        print(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
        return None, seconds
    return json.loads(path.read_text()), seconds


def table(llm, solver, aggregate):
    """The one summary table: (what, figure, note) rows as markdown."""
    rows = []
    if llm:
        for r in llm["runs"]:
            rows.append((f"call: {r['modules']} modules of {r['d']}², K {r['K']}, r {r['r']}, noise {r['noise']:g}", f"{r['cold_s']:.1f} s cold / {r['warm_s']:.1f} s warm",
                         f"verdicts exact {r['verdicts_correct']}, r̂ {r['ranks']}, peak host RSS "
                         f"{r['peak_rss_gib']:.2f} GiB for {r['input_gib']:.2f} GiB of factors"))
        for b in llm.get("breakdown", []):
            per_module = b["reduce_ms"] + b["detect_ms"] + b["pool_ms"] + b["refine_ms"]
            rows.append((f"per module, noise {b['noise']:g} (warm)", f"{per_module:.1f} ms",
                         f"reduce {b['reduce_ms']:.1f}, λ path + refit {b['detect_ms']:.1f}, refine "
                         f"{b['refine_ms']:.1f} ms; one R-only QR of the d×Kr stack {b['lapack_qr_ms']:.1f} ms "
                         f"→ {per_module / b['lapack_qr_ms']:.1f}× the QR floor"))
    if solver:
        for r in solver["rows"]:
            rows.append((f"solver '{r['size']}' ({r['layers']} × K {r['K']}, {r['p']}×{r['q']}), {r['program']}",
                         f"{r['jax_ms']:.2f} ms", f"NumPy {r['numpy_ms']:.2f} ms, {r['jax_iters']} iterations, "
                         f"compile {r['jax_compile_s']:.1f} s, objective diff {r['numpy_vs_jax_objective']:.1e}"))
    if aggregate:
        for r in aggregate["rows"]:
            rows.append((f"clair aggregate: K {r['clients']}, {r['modules']} modules, {r['shapes']}", f"{r['wall_s']:.1f} s wall",
                         f"read {r['read_s']:.1f} / CLAIR {r['solve_s']:.1f} / write {r['write_s']:.1f} s, "
                         f"{r['input_gib']:.2f} GiB in, verdicts correct {r['verdicts_correct']}"))
    lines = ["| what | time | note |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test, CPU is fine)")
    parser.add_argument("--out", default="bench_results/gpu_check", help="where the JSON files and log go")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.05, 0.2])
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    import jax

    devices = jax.devices()
    print(f"JAX {jax.__version__}, backend {jax.default_backend()}, devices {[str(d) for d in devices]}", flush=True)
    if jax.default_backend() == "cpu" and not args.quick:
        raise SystemExit("gpu_check: JAX sees no GPU (backend cpu); install jax[cuda12] or run with --quick")
    quick = ["--quick"] if args.quick else []
    noise = [str(n) for n in args.noise]
    t0 = time.perf_counter()
    with open(out_dir / "gpu_check.log", "w") as log:
        llm, t_llm = run("bench_llm_call", [*quick, "--noise", *noise, "--breakdown"], out_dir, log)
        solver, t_solver = run("bench_solver", [*quick, "--no-cvxpy", "--cores", "1", "--repeats", "3"], out_dir, log)
        aggregate, t_agg = run("bench_aggregate", quick, out_dir, log)
    summary = table(llm, solver, aggregate)
    device = str(devices[0].device_kind) if devices else "?"
    head = (f"gpu_check on {device} (JAX {jax.__version__}, backend {jax.default_backend()}); "
            f"{time.perf_counter() - t0:.0f} s in all (bench_llm_call {t_llm:.0f} s, bench_solver {t_solver:.0f} s, "
            f"bench_aggregate {t_agg:.0f} s)")
    print("\n" + head + "\n\n" + summary, flush=True)
    (out_dir / "gpu_check.md").write_text(head + "\n\n" + summary + "\n")
    failed = [n for n, r in (("bench_llm_call", llm), ("bench_solver", solver), ("bench_aggregate", aggregate))
              if r is None]
    if failed:
        raise SystemExit(f"gpu_check: {', '.join(failed)} failed (see {out_dir / 'gpu_check.log'})")


if __name__ == "__main__":
    main()
