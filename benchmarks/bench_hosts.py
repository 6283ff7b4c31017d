"""Several processes share one federation's modules (the multi-host path), on one machine.

Each run is cold (fresh processes, compilation included, as a user meets it).
The reference is one process calling ``cj.clair(cj.LoRAFactors(B, A))`` over all
modules. Then N processes join with ``jax.distributed`` (CPU collectives over
gloo), each takes its contiguous share of the modules, screens it
(``cj.screen``), gathers every process's evidence (``process_allgather``) and
refines its share with the pooled verdict (``cj.conclude``). Printed and written
as JSON: wall time of each (the slowest process for N), the speed-up, and
whether the pooled verdicts, per-module verdicts and ranks equal the
one-process ones. On a CPU each process gets its own cores' share; this is the
way to use several cores for independent modules where several host devices in
one process run one after another (``benchmarks/investigations/cpu_concurrency.py``).

Usage::

    python benchmarks/bench_hosts.py [--hosts 2] [--modules 16] [--noise 0.1] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(args):
    """One process: all modules (--hosts 1) or its share of them under jax.distributed."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import jax
    import numpy as np

    if args.hosts > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"localhost:{args.port}", num_processes=args.hosts,
                                   process_id=args.process)
    import clair_jax as cj
    from benchmarks.bench_llm import make_factors
    from jax.experimental import multihost_utils

    b, a, benign = make_factors(0, args.modules, args.clients, args.d, args.rank, noise=args.noise)
    share = np.array_split(np.arange(args.modules), args.hosts)[args.process]
    mine = cj.LoRAFactors(b[share], a[share])
    t0 = time.perf_counter()
    if args.hosts == 1:
        res = cj.clair(mine)
    else:
        s = cj.screen([mine], devices=jax.local_devices())
        gathered = multihost_utils.process_allgather(s.evidence())     # (hosts, n, K) each
        (res,) = cj.conclude(s, s.verdict([np.concatenate(list(e)) for e in gathered]))
    jax.block_until_ready(res.refined.B)
    wall = time.perf_counter() - t0
    print(json.dumps(dict(process=args.process, modules=share.tolist(), wall_s=wall,
                          client_benign=np.asarray(res.client_benign).tolist(),
                          benign=np.asarray(res.benign).tolist(), rank=np.asarray(res.rank).tolist(),
                          verdicts_correct=bool((np.asarray(res.client_benign) == benign).all()))), flush=True)


def _run(args, hosts):
    port = _free_port()
    base = [sys.executable, __file__, "--worker", "--hosts", str(hosts), "--port", str(port),
            "--modules", str(args.modules), "--clients", str(args.clients), "--d", str(args.d),
            "--rank", str(args.rank), "--noise", str(args.noise)]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    t0 = time.perf_counter()
    procs = [subprocess.Popen(base + ["--process", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for i in range(hosts)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=args.timeout)
        if p.returncode != 0:
            raise RuntimeError(f"process failed:\n{err[-3000:]}")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs, time.perf_counter() - t0


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--modules", type=int, default=16)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--timeout", type=float, default=1200.0)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--process", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--json", default="bench_results/bench_hosts.json")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.quick:
        args.modules, args.clients, args.d, args.rank = 4, 12, 64, 4

    (one,), one_total = _run(args, 1)
    many, many_total = _run(args, args.hosts)
    joined_benign = [row for out in many for row in out["benign"]]
    joined_rank = [r for out in many for r in out["rank"]]
    same = (all(out["client_benign"] == one["client_benign"] for out in many)
            and joined_benign == one["benign"] and joined_rank == one["rank"])
    slowest = max(out["wall_s"] for out in many)
    row = dict(modules=args.modules, K=args.clients, d=args.d, r=args.rank, noise=args.noise, hosts=args.hosts,
               one_process_s=one["wall_s"], processes_s=slowest, speedup=one["wall_s"] / slowest,
               one_process_total_s=one_total, processes_total_s=many_total,
               same_verdicts_and_ranks=same, verdicts_correct=one["verdicts_correct"])
    from benchmarks._common import machine_info, markdown_table, write_json

    print(markdown_table([row], [
        ("modules", "modules", "d"), ("K", "K", "d"), ("d", "d", "d"), ("r", "r", "d"), ("noise", "noise", ".3f"),
        ("hosts", "processes", "d"), ("one_process_s", "one process, cold (s)", ".1f"),
        ("processes_s", "N processes, slowest (s)", ".1f"), ("speedup", "speed-up", ".2f"),
        ("one_process_total_s", "launch to exit, 1 (s)", ".1f"), ("processes_total_s", "launch to exit, N (s)", ".1f"),
        ("same_verdicts_and_ranks", "same verdicts and ranks", "")]))
    write_json(args.json, dict(benchmark="bench_hosts", machine=machine_info(), args=vars(args), rows=[row]))
    if not same:
        raise SystemExit("the processes' verdicts or ranks differ from one process's")
    return [row]


if __name__ == "__main__":
    main()
