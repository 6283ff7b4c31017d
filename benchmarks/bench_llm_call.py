"""The user's call at 7B shape: one ``cj.clair(cj.LoRAFactors(B, A))`` over every module.

Each run is a fresh process (so compilation is included, as a user meets it):
numpy factors B (modules, K, d, r) and A (modules, K, r, d) of the
``bench_llm`` workload (20 % of clients off-subspace, every benign B_k with the
given relative error), then one timed call. Printed and written as JSON per
run: wall time of the call (compile included), the same call again (warm),
the floor measured in the same process after both (the R-only QR of every
module's d × K·r stack, which the reduction runs) and each call's ratio to it,
peak RSS of the process over the input's size, verdicts against the truth.

``--breakdown`` times the stages of :func:`clair_jax.clair_groups` on a few
modules (warm) and sets each against the machine's measured throughput:
the factor reduction (one QR of [B_1 … B_K] without Q, K small ones) against
LAPACK's R-only QR of the same shape, and every stage as a multiple of that QR.

Usage::

    python benchmarks/bench_llm_call.py [--noise 0 0.001 0.005 0.05 0.1 0.2] [--modules 128]
                                        [--devices 1 2] [--breakdown [--no-sweep]] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(args):
    """One cold run in this process (called with --worker)."""
    if args.devices > 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}").strip()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import resource

    import numpy as np

    from benchmarks.bench_llm import make_factors

    b, a, benign = make_factors(0, args.modules, args.clients, args.d, args.rank, noise=args.noise[0])
    import jax

    import clair_jax as cj

    devices = jax.devices() if args.devices > 1 else None
    load = os.getloadavg()[0]
    factors = cj.LoRAFactors(b, a)

    def cpu_s():   # this process's CPU time, every thread on every core
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    t0, c0 = time.perf_counter(), cpu_s()
    res = cj.clair(factors, devices=devices)
    jax.block_until_ready(res.refined.B)
    cold, cold_cpu = time.perf_counter() - t0, cpu_s() - c0
    verdict = np.asarray(res.client_benign)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    del res
    t0, c0 = time.perf_counter(), cpu_s()
    res = cj.clair(factors, devices=devices)
    jax.block_until_ready(res.refined.B)
    warm, warm_cpu = time.perf_counter() - t0, cpu_s() - c0
    floor = qr_floor(b)
    out = dict(modules=args.modules, K=args.clients, d=args.d, r=args.rank, noise=args.noise[0], devices=args.devices,
               cold_s=cold, warm_s=warm, compile_s=cold - warm, cold_cpu_s=cold_cpu, warm_cpu_s=warm_cpu,
               load_at_start=load, qr_floor_s=floor, cold_over_floor=cold / floor,
               warm_over_floor=warm / floor, input_gib=(b.nbytes + a.nbytes) / 2**30,
               peak_rss_gib=rss, verdicts_correct=bool((verdict == benign).all()),
               ranks=sorted(set(np.asarray(res.rank).ravel().tolist())),
               iterations_max=int(np.max(res.decomposition.iterations)))
    out["rss_over_input"] = out["peak_rss_gib"] / out["input_gib"]
    print(json.dumps(out))


def qr_floor(b):
    """Seconds for the R-only QR of every module's d × K·r stack [B_1 … B_K], one module after
    another in this process (the copy to the device not counted): the floor of the call,
    whose reduction runs exactly this QR per module."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    qr = jax.jit(lambda m: jnp.linalg.qr(m, mode="r"))
    modules, k, d, r = b.shape

    def stacked(i):   # [B_1 … B_K] of module i: (d, K·r)
        return jax.block_until_ready(jnp.asarray(np.ascontiguousarray(b[i].transpose(1, 0, 2)).reshape(d, k * r)))

    jax.block_until_ready(qr(stacked(0)))   # compile
    total = 0.0
    for i in range(modules):
        m = stacked(i)
        t0 = time.perf_counter()
        jax.block_until_ready(qr(m))
        total += time.perf_counter() - t0
    return total


def breakdown(args):
    """Warm per-stage times on a few modules, against measured QR throughput."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import jax
    import jax.numpy as jnp
    import numpy as np

    import clair_jax as cj
    from benchmarks.bench_llm import make_factors
    from clair_jax import detect, pool, refine, stack
    from clair_jax.options import ClairOptions

    rows = []
    for noise in args.noise:
        b, a, benign = make_factors(0, args.breakdown_modules, args.clients, args.d, args.rank, noise=noise)
        f = cj.LoRAFactors(jnp.asarray(b), jnp.asarray(a))
        opts = ClairOptions.checked()
        times = {}

        def stage(name, fn):
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn())
            times[name] = times.get(name, 0.0) + time.perf_counter() - t0
            return out

        for rep in range(2):  # the first repetition compiles
            times.clear()
            pr = stage("reduce", lambda: stack.problems(f, "left"))
            det = stage("detect", lambda: detect.until_settled(pr, opts))
            v = stage("pool", lambda: pool.client_verdict(det.benign, det.scores, det.z, det.usable))
            stage("refine", lambda: refine.refine(pr, det, v.benign))
        n = args.breakdown_modules
        kr = args.clients * args.rank
        qr = jax.jit(lambda m: jnp.linalg.qr(m, mode="r"))   # what the reduction runs: R only
        m = jnp.asarray(np.random.default_rng(0).standard_normal((args.d, kr)), jnp.float32)
        jax.block_until_ready(qr(m))
        t0 = time.perf_counter()
        for _ in range(3):
            jax.block_until_ready(qr(m))
        qr_s = (time.perf_counter() - t0) / 3
        # Householder QR, R only: ≈ 2 m n² − 2 n³/3 flops.
        qr_flops = 2 * args.d * kr**2 - 2 * kr**3 / 3
        per_module = {name: times[name] / n for name in times}
        rows.append(dict(noise=noise, modules=n, passes=int(det.passes),
                         **{f"{name}_over_qr": per_module[name] / qr_s for name in ("reduce", "detect", "refine")},
                         total_over_qr=sum(per_module.values()) / qr_s,
                         reduce_ms=1e3 * times["reduce"] / n, detect_ms=1e3 * times["detect"] / n,
                         pool_ms=1e3 * times["pool"] / n, refine_ms=1e3 * times["refine"] / n,
                         qr_gflops=qr_flops / qr_s / 1e9, lapack_qr_ms=1e3 * qr_s,
                         correct=bool((np.asarray(v.benign) == benign).all())))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.001, 0.005, 0.05, 0.1, 0.2])
    parser.add_argument("--modules", type=int, default=128)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--devices", type=int, nargs="+", default=[1])
    parser.add_argument("--breakdown", action="store_true")
    parser.add_argument("--breakdown-modules", type=int, default=4)
    parser.add_argument("--no-sweep", action="store_true", help="only the --breakdown table")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", default="bench_results/bench_llm_call.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.modules, args.clients, args.d, args.rank, args.breakdown_modules = 2, 16, 64, 4, 2
        args.noise = args.noise[:2]
    if args.worker:
        args.devices = args.devices[0]
        return worker(args)

    from benchmarks._common import machine_info, markdown_table, write_json

    info = machine_info()
    print(f"bench_llm_call on {info['cpu_count']} CPU(s), load {info['loadavg_at_start']}", flush=True)
    runs = []
    for devices in ([] if args.no_sweep else args.devices):
        for noise in args.noise:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--noise", str(noise),
                   "--modules", str(args.modules), "--clients", str(args.clients), "--d", str(args.d),
                   "--rank", str(args.rank), "--devices", str(devices)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"worker failed (noise {noise}, devices {devices}):\n{out.stderr[-3000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            runs.append(row)
            print(f"  noise {noise:<6} devices {devices}: {row['cold_s']:.1f} s cold, {row['warm_s']:.1f} s warm, "
                  f"(CPU {row['cold_cpu_s']:.1f} s, {row['warm_cpu_s']:.1f} s), "
                  f"QR floor {row['qr_floor_s']:.1f} s (cold / floor {row['cold_over_floor']:.1f}, "
                  f"warm / floor {row['warm_over_floor']:.1f}), peak RSS {row['peak_rss_gib']:.2f} GiB, "
                  f"correct {row['verdicts_correct']}", flush=True)
    print()
    print(markdown_table(runs, [
        ("noise", "noise", ".3f"), ("devices", "devices", "d"), ("cold_s", "call, cold (s)", ".1f"),
        ("warm_s", "call, warm (s)", ".1f"), ("compile_s", "compile (s)", ".1f"),
        ("cold_cpu_s", "CPU, cold (s)", ".1f"), ("warm_cpu_s", "CPU, warm (s)", ".1f"),
        ("load_at_start", "load", ".1f"),
        ("qr_floor_s", "QR floor (s)", ".1f"), ("cold_over_floor", "cold / floor", ".1f"),
        ("warm_over_floor", "warm / floor", ".1f"),
        ("input_gib", "input (GiB)", ".2f"), ("peak_rss_gib", "peak RSS (GiB)", ".2f"),
        ("rss_over_input", "RSS / input", ".2f"), ("verdicts_correct", "verdicts exact", "")]))
    rows = []
    if args.breakdown:
        rows = breakdown(args)
        print()
        print(markdown_table(rows, [
            ("noise", "noise", ".3f"), ("passes", "passes", "d"), ("reduce_ms", "reduce (ms/module)", ".0f"),
            ("lapack_qr_ms", "one LAPACK QR d×Kr, R only (ms)", ".0f"), ("qr_gflops", "QR GFLOP/s", ".1f"),
            ("detect_ms", "λ path + refit (ms/module)", ".0f"), ("pool_ms", "pool (ms/module)", ".1f"),
            ("refine_ms", "refine (ms/module)", ".0f"), ("reduce_over_qr", "reduce / QR", ".1f"),
            ("detect_over_qr", "λ path + refit / QR", ".1f"), ("refine_over_qr", "refine / QR", ".1f"),
            ("total_over_qr", "all stages / QR", ".1f"), ("correct", "verdicts exact", "")]))
    write_json(args.json, dict(benchmark="bench_llm_call", machine=info, args=vars(args), runs=runs, breakdown=rows))
    return runs, rows


if __name__ == "__main__":
    main()
