"""Accuracy of the whole-spectrum Gram SVT in float32, and what its certificate lets through.

Forming X Xᵀ squares the condition number, so the Gram path of
:func:`clair_jax.linalg.partial_svt_with_spectrum` (budget = short side) is only
as good as its certificate. For random matrices (low rank plus noise, σ₁ = 1,
tall and wide, short side 8–128) and thresholds τ from 1e-3 to 0.3, this
compares one float32 Gram-path SVT with the float64 SVT of the same matrix:

* ``c = err·τ/eps``: the error model ‖Δ‖₂ ≈ c·eps·σ₁²/τ (c should stay O(1));
* how often the certificate passes, and the largest error it let through
  (it should stay near rtol·σ₁ = 3e-5 or below).

Usage::

    python benchmarks/investigations/gram_svt_accuracy.py [--quick] [--cases N] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._common import machine_info, markdown_table, write_json
from clair_jax import linalg

TAUS = (0.3, 0.05, 0.02, 0.01, 0.003, 0.001)


def random_matrix(rng):
    p = int(rng.choice([8, 16, 64, 128]))
    n = int(p * rng.choice([1, 4, 10]))
    if rng.random() < 0.5:
        p, n = n, p
    r = int(rng.integers(1, min(p, n) // 2 + 1))
    sv = np.sort(rng.uniform(0.01, 1, r))[::-1]
    sv[0] = 1.0
    u, _ = np.linalg.qr(rng.standard_normal((p, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    x = (u * sv) @ v.T + 10 ** rng.uniform(-4, -1) * rng.standard_normal((p, n)) / np.sqrt(max(p, n))
    return x / np.linalg.norm(x, 2)


def run(cases, seed=0):
    rng = np.random.default_rng(seed)
    eps = float(jnp.finfo(jnp.float32).eps)
    step = jax.jit(linalg.partial_svt_with_spectrum)
    gram_alone = jax.jit(linalg._whole_space_ritz, static_argnums=2)  # the Gram step before its fallback
    per_tau = {tau: dict(raw=[], returned=[], certified=[]) for tau in TAUS}
    for _ in range(cases):
        x = random_matrix(rng)
        u, s, vt = np.linalg.svd(x, full_matrices=False)
        whole = linalg.init_subspace(x.shape, min(x.shape))
        x32 = jnp.asarray(x, jnp.float32)
        for tau in TAUS:
            want = (u * np.maximum(s - tau, 0)) @ vt
            err = lambda low: np.linalg.norm(np.asarray(low, np.float64) - want, 2)  # noqa: E731
            raw, _, certified = gram_alone(x32, jnp.float32(tau), 3e-5, jnp.float32(0))
            (low, _), _ = step(x32, tau, whole)
            per_tau[tau]["raw"].append(err(raw))
            per_tau[tau]["returned"].append(err(low))
            per_tau[tau]["certified"].append(bool(certified))
    rows = []
    for tau, d in per_tau.items():
        raw, ok = np.asarray(d["raw"]), np.asarray(d["certified"])
        rows.append(dict(tau=tau, cases=len(raw), max_c=float(np.max(raw * tau / eps)),
                         certified=float(np.mean(ok)), max_err_gram=float(np.max(raw)),
                         max_err_certified=float(np.max(raw[ok])) if ok.any() else None,
                         max_err_returned=float(np.max(d["returned"]))))
    return rows


COLUMNS = [("tau", "τ/σ₁", "g"), ("cases", "cases", "d"), ("max_c", "max c = err·τ/eps", ".2f"),
           ("certified", "certified", ".2f"), ("max_err_gram", "max err, Gram step", ".1e"),
           ("max_err_certified", "max err, Gram step certified", ".1e"),
           ("max_err_returned", "max err returned (with fallback)", ".1e")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cases", type=int, default=60)
    parser.add_argument("--json", default="bench_results/gram_svt_accuracy.json")
    args = parser.parse_args(argv)
    rows = run(6 if args.quick else args.cases)
    print(markdown_table(rows, COLUMNS))
    write_json(args.json, dict(benchmark="gram_svt_accuracy", machine=machine_info(), args=vars(args), rows=rows))
    return rows


if __name__ == "__main__":
    main()
