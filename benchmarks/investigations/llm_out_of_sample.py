"""What the refit test sees on the real-LLM federation: in-sample against leave-one-out energies.

For each module of a kept ``clair shakespeare`` run (``--adapters DIR``), every
client's off-subspace share e_k/‖ΔW_k‖² is computed against the rank-``r``
subspace of the true honest clients' stacked ΔW (from the Gram matrix):

* **in-sample**: the honest client's own update is in the fit (how CLAIR's refit
  test reads the members of its set today);
* **leave-one-out**: the fit without the client (how it reads an outsider).

Then, per client, the mean leave-one-out share over the modules, and its
residual against the federation's own size trend: log share on log training
sequences, a repeated-median line fitted over every client (no truth used),
in MAD units. Prints one table per run; the figures are quoted in docs/llm.md.

Usage::

    python benchmarks/investigations/llm_out_of_sample.py --run runs/f1 --results benchmarks/results/shakespeare/full_seed1.json [--rank 30]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def repeated_median_line(x, y):
    """Siegel's repeated median (slope, intercept): robust to a minority of outliers."""
    slopes = []
    for i in range(len(x)):
        d = x - x[i]
        ok = d != 0
        slopes.append(np.median((y[ok] - y[i]) / d[ok]))
    slope = np.median(slopes)
    return slope, np.median(y - slope * x)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a kept `clair shakespeare --adapters` directory")
    parser.add_argument("--results", required=True, help="that run's results JSON (client kinds and sizes)")
    parser.add_argument("--rank", type=int, default=30)
    args = parser.parse_args(argv)
    from clair_jax.adapters.peft_format import load_federation

    info = {c["name"]: c for c in json.load(open(args.results))["clients"]}
    dirs = sorted(os.listdir(os.path.join(args.run, "clients")))
    fed = load_federation([os.path.join(args.run, "clients", n) for n in dirs])
    names = list(fed.names)
    honest = np.array([info[n]["kind"] == "honest" for n in names])
    inside, loo = [], []
    for g, group in enumerate(fed.groups):
        for module in group.modules:
            b, a = fed.factors(g, modules=[module])
            w = np.einsum("kpr,krq->kpq", np.asarray(b, np.float64)[0], np.asarray(a, np.float64)[0])
            gram = np.einsum("kpq,ksq->kps", w, w)
            total = gram[honest].sum(0)
            norm2 = np.sum(w**2, axis=(1, 2))

            def share(c, i):
                u = np.linalg.eigh(c)[1][:, ::-1][:, :args.rank]
                return np.sum((w[i] - u @ (u.T @ w[i]))**2) / norm2[i]

            inside.append([share(total, i) for i in range(len(names))])
            loo.append([share(total - gram[i], i) if honest[i] else share(total, i) for i in range(len(names))])
    inside, loo = np.array(inside), np.array(loo)            # (modules, K)
    mean_loo = loo.mean(0)
    seqs = np.array([info[n]["train_seqs"] for n in names], float)
    x, y = np.log(seqs), np.log(mean_loo)
    slope, icpt = repeated_median_line(x, y)
    resid = y - (icpt + slope * x)
    z = (resid - np.median(resid)) / (1.4826 * np.median(np.abs(resid - np.median(resid))))
    print(f"{args.run}: {len(names)} clients, {loo.shape[0]} modules, rank {args.rank}; "
          f"size trend: share ∝ seqs^{slope:.2f}")
    print("| client | kind | seqs | in-sample share (mean) | leave-one-out share (mean) | z against the size trend |")
    print("| --- | --- | --- | --- | --- | --- |")
    for i in np.argsort(mean_loo):
        print(f"| {names[i]} | {info[names[i]]['kind']} | {int(seqs[i])} | {inside[:, i].mean():.3f} | "
              f"{mean_loo[i]:.3f} | {z[i]:.1f} |")


if __name__ == "__main__":
    main()
