"""What does memory the process has never touched cost, and how much of a call is it?

Every page a process touches for the first time is zeroed by the kernel (and, in a
virtual machine that hands freed memory back to its host, backed again by the host).
This script measures, in one process:

* ``fresh``: allocate ``--gib`` GiB with numpy and fill it, after the previous block
  was freed and ``--pause`` seconds passed (time for the kernel to hand the pages on);
* ``freed just before``: the same right after freeing a block of the same size;
* ``touched``: filling a block that is already touched (the memory bandwidth alone);

each ``--repeats`` times, wall and system (kernel) CPU time. With ``--call`` it then
runs the 7B-shaped LoRA call (``--modules`` modules of 4096 × 16 factors, 32 clients,
5 % noise) cold and warm and splits each stage's CPU time into user and system time:
the system share is pages the stage touched for the first time.

Usage::

    python benchmarks/investigations/fresh_memory.py [--gib 1] [--repeats 4] [--pause 3]
                                                     [--call] [--modules 128] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks._common import machine_info, markdown_table, write_json  # noqa: E402

STAGES = (("stack", "problems", "reduce"), ("detect", "until_settled", "detect"), ("refine", "refine", "refine"))


def _cpu():
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime, use.ru_stime


def _timed(fn):
    (u0, s0), t0 = _cpu(), time.perf_counter()
    fn()
    (u1, s1), t1 = _cpu(), time.perf_counter()
    return {"wall_s": t1 - t0, "user_s": u1 - u0, "sys_s": s1 - s0}


def memory_costs(gib, repeats, pause):
    """Wall and system time per GiB of fresh, just-freed and touched memory."""
    count = int(gib * 2**30) // 4
    rows = {"fresh": [], "freed just before": [], "touched": []}
    for _ in range(repeats):
        time.sleep(pause)
        block = np.empty(count, np.float32)
        rows["fresh"].append(_timed(lambda: block.fill(1.0)))
        del block
        block = np.empty(count, np.float32)
        rows["freed just before"].append(_timed(lambda: block.fill(1.0)))
        rows["touched"].append(_timed(lambda: block.fill(2.0)))
        del block
    return {kind: {key: statistics.median(r[key] for r in runs) / gib for key in runs[0]} | {
        "wall_s_range": [min(r["wall_s"] for r in runs) / gib, max(r["wall_s"] for r in runs) / gib]}
        for kind, runs in rows.items()}


def call_costs(modules):
    """The 7B-shaped call, cold then warm: each stage's wall, user and system time."""
    from benchmarks.bench_llm import make_factors
    b, a, benign = make_factors(0, modules, 32, 4096, 16, noise=0.05)
    import jax

    import clair_jax as cj
    from clair_jax import detect, refine, stack

    seen = {}

    def wrap(module, name, key):
        inner = getattr(module, name)

        def timed(*args, **kwargs):
            out = {}
            seen[key] = _timed(lambda: out.setdefault("v", jax.block_until_ready(inner(*args, **kwargs))))
            return out["v"]

        setattr(module, name, timed)
        return lambda: setattr(module, name, inner)

    modules_by_name = {"stack": stack, "detect": detect, "refine": refine}
    undo = [wrap(modules_by_name[m], name, key) for m, name, key in STAGES]
    runs = {}
    try:
        for run in ("cold", "warm"):
            seen.clear()
            out = {}
            total = _timed(lambda: out.setdefault("r", jax.block_until_ready(cj.clair(cj.LoRAFactors(b, a)))))
            exact = bool((np.asarray(out.pop("r").client_benign) == benign).all())
            runs[run] = {"total": total, **dict(seen), "exact": exact}
    finally:
        for u in undo:
            u()
    return runs


def _columns(*names):
    return [(name, name, "") for name in names]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--pause", type=float, default=3.0, help="seconds between a free and the next fresh block")
    parser.add_argument("--call", action="store_true", help="also split the 7B-shaped call's stages into user/system")
    parser.add_argument("--modules", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="64 MiB, 2 repeats, no pause; the call on 4 modules")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "fresh_memory.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.gib, args.repeats, args.pause, args.modules = 1 / 16, 2, 0.0, 4

    memory = memory_costs(args.gib, args.repeats, args.pause)
    print(f"per GiB ({args.gib:g} GiB blocks, median of {args.repeats}; {args.pause:g} s pause before each fresh one)")
    print(markdown_table([{"memory": kind, "wall (s/GiB)": f"{c['wall_s']:.2f}",
                           "range": f"{c['wall_s_range'][0]:.2f}–{c['wall_s_range'][1]:.2f}",
                           "system (s/GiB)": f"{c['sys_s']:.2f}", "user (s/GiB)": f"{c['user_s']:.2f}"}
                          for kind, c in memory.items()],
                         _columns("memory", "wall (s/GiB)", "range", "system (s/GiB)", "user (s/GiB)")))
    result = {"benchmark": "fresh_memory", "machine": machine_info(), "args": vars(args), "memory": memory}
    if args.call:
        runs = call_costs(args.modules)
        rows = []
        for run, stages in runs.items():
            for key in ("total",) + tuple(k for _, _, k in STAGES):
                s = stages[key]
                rows.append({"call": run, "stage": key, "wall (s)": f"{s['wall_s']:.2f}", "user (s)": f"{s['user_s']:.2f}",
                             "system (s)": f"{s['sys_s']:.2f}"})
        print(f"\n7B-shaped call, {args.modules} modules (verdicts exact: {all(r['exact'] for r in runs.values())})")
        print(markdown_table(rows, _columns("call", "stage", "wall (s)", "user (s)", "system (s)")))
        result["call"] = runs
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
