"""Check the untuned defaults of ``cj.clair`` on federations they were not tuned on.

Each configuration — 6 contamination kinds × 0/20/45% contaminated × relative
noise 0/0.15/0.33, plus heterogeneous clients, scales 1e-6/1e6 and other shapes —
is drawn with seeds 900, 901, … (never used while choosing the rule). A run
passes when the collaborative set is recovered exactly and the subspace error
is below 0.5. Prints the failures (every run with ``-v``), a summary table by
kind, and writes JSON.

Usage::

    OPENBLAS_NUM_THREADS=1 python benchmarks/validate_defaults.py [--seeds 2] [-v] [--x64] [--json PATH]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see README: avoids BLAS oversubscription
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import jax  # noqa: E402

from benchmarks._common import machine_info, markdown_table, write_json  # noqa: E402

FIRST_SEED = 900
KINDS = ["full_rank", "huge", "rank_one", "off_subspace", "mixed", "sign_flip"]
GRID = [dict(kind=k, contamination=c, noise=n)
        for k, c, n in itertools.product(KINDS, [0.0, 0.2, 0.45], [0.0, 0.15, 0.33])]
EXTRA = [
    dict(kind="full_rank", contamination=0.3, noise=0.1, heterogeneity=0.3, client_spread=0.8),
    dict(kind="full_rank", contamination=0.3, noise=0.1, scale=1e-6),
    dict(kind="full_rank", contamination=0.3, noise=0.1, scale=1e6),
    dict(kind="mixed", contamination=0.3, noise=0.1, p=32, q=8, num_clients=20, rank=3),
    dict(kind="mixed", contamination=0.3, noise=0.1, p=100, q=50, num_clients=16, rank=5),
    dict(kind="mixed", contamination=0.3, noise=0.1, p=64, q=1, num_clients=200, rank=3),
]


def run_one(cfg, seed):
    import clair_jax as cj

    fed = cj.data.make_federation(seed, **cfg)
    res = cj.clair(fed.updates)
    det = cj.metrics.detection_rates(res.benign, fed.benign)
    err = float(cj.metrics.subspace_error(res.subspace, fed.subspace))
    exact = bool((res.benign == fed.benign).all())
    return dict(cfg, seed=seed, exact_set=exact, passed=exact and err < 0.5,
                tpr=float(det["tpr"]), fpr=float(det["fpr"]), subspace_error=err,
                rank=int(res.rank), lam=float(res.lam), converged=bool(res.converged))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=2, help="seeds per configuration")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every run")
    parser.add_argument("--x64", action="store_true", help="float64")
    parser.add_argument("--json", default="bench_results/validate_defaults.json")
    args = parser.parse_args(argv)
    if args.x64:
        jax.config.update("jax_enable_x64", True)

    rows, t0 = [], time.perf_counter()
    for cfg in GRID + EXTRA:
        for seed in range(FIRST_SEED, FIRST_SEED + args.seeds):
            row = run_one(cfg, seed)
            row["group"] = cfg["kind"] if cfg in GRID else "other shapes / scales"
            rows.append(row)
            if args.verbose or not row["passed"]:
                print(f"{'ok  ' if row['passed'] else 'FAIL'} {cfg} seed={seed} tpr={row['tpr']:.2f} "
                      f"fpr={row['fpr']:.2f} sub={row['subspace_error']:.3f} rank={row['rank']} "
                      f"lam={row['lam']:.2f} converged={row['converged']}", flush=True)
    seconds = time.perf_counter() - t0

    summary = []
    for kind in KINDS + ["other shapes / scales"]:
        group = [r for r in rows if r["group"] == kind]
        summary.append(dict(kind=kind, runs=len(group), passed=sum(r["passed"] for r in group),
                            worst_subspace_error=max(r["subspace_error"] for r in group)))
    print()
    print(markdown_table(summary, [("kind", "configurations", ""), ("runs", "runs", "d"),
                                   ("passed", "exact set & subspace err < 0.5", "d"),
                                   ("worst_subspace_error", "worst subspace err", ".3f")]))
    passed = sum(r["passed"] for r in rows)
    print(f"\n{passed}/{len(rows)} passed in {seconds:.0f} s")
    write_json(args.json, dict(benchmark="validate_defaults", machine=machine_info(), args=vars(args),
                               passed=passed, runs=len(rows), seconds=seconds, rows=rows, summary=summary))
    return passed == len(rows)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
