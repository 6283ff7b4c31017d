"""End to end with linear-regression clients: OLS/ridge → CLAIR → held-out test MSE.

Client k holds n_k (unequal) samples of Y = X Θ_k + ε with isotropic Gaussian X.
Θ_k comes from :func:`clair_jax.data.make_federation` (benign: U V_kᵀ, contaminated:
an arbitrary full-rank block); contaminated clients are, in turn, poisoned in one
of five ways: arbitrary Θ_k with clean data, shuffled responses, another task,
10× label noise, negated responses. Every method turns the local estimates
Θ̂_k (one vmapped fit) into per-client estimates, scored on each benign client's
clean held-out data.

``clair regression`` prints the comparison table (markdown) and can write JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import clair_jax as cj
from clair_jax.estimators import regression as R

__all__ = ["run_regression", "evaluate_methods", "flagged_by_kind", "format_table", "add_arguments", "run"]

#: Contamination kinds cycled through the contaminated clients.
REGRESSION_POISONS = ("none", "shuffled", "other_task", "heavy_noise", "sign_flip")


def _log(msg, verbose):
    if verbose:
        print(msg, file=sys.stderr, flush=True)


def evaluate_methods(updates, subspace, benign, *, clair_kwargs=None):
    """Runs CLAIR, the baselines and the oracle on the same local estimates.

    Args:
        updates: (..., K, p, q) local estimates Θ̂_k.
        subspace: (..., p, r) true U (for the oracle).
        benign: (K,) bool true collaborative set (for the oracle).
        clair_kwargs: extra keyword arguments for :func:`clair_jax.clair`.

    Returns:
        (estimates, clair_result): dict method name → (..., K, p, q) estimates, and
        the :class:`clair_jax.ClairResult`.
    """
    b = cj.baselines
    result = cj.clair(updates, **(clair_kwargs or {}))
    estimates = {
        "local": b.local(updates),
        "fedavg": b.fedavg(updates),
        "coordinate median": b.coordinate_median(updates),
        "trimmed mean": b.trimmed_mean(updates),
        "multi-krum": b.multi_krum(updates),
        "geometric median": b.geometric_median(updates),
        "clair": result.refined,
        "oracle": b.oracle(updates, subspace, jnp.asarray(benign)),
    }
    return estimates, result


def format_table(rows, columns, *, title=None):
    """Markdown table from a list of dicts (floats with 4 significant digits)."""
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = [f"**{title}**", ""] if title else []
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join(["---"] * len(columns)) + "|")
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def run_regression(
    seed=0,
    *,
    num_clients=40,
    contamination=0.3,
    p=32,
    q=8,
    rank=2,
    num_samples=(60, 140),
    noise=0.4,
    estimator="ols",
    ridge_alpha=1.0,
    num_test=1000,
    dtype=jnp.float32,
    clair_kwargs=None,
    verbose=False,
):
    """Local regression estimators → CLAIR and baselines → per-client test MSE.

    Args:
        seed: seed of the federation and of the data.
        num_clients: K.
        contamination: fraction of contaminated clients.
        p, q: number of features and of responses (Θ_k is p × q).
        rank: r of the shared subspace.
        num_samples: (n_min, n_max): n_k drawn uniformly in this range (unequal
            sizes, padded and masked), or one int for all clients.
        noise: label-noise standard deviation σ.
        estimator: "ols" or "ridge".
        ridge_alpha: ridge strength when ``estimator="ridge"``.
        num_test: clean held-out rows per client.
        dtype: float32 or float64.
        clair_kwargs: extra keyword arguments for :func:`clair_jax.clair`.
        verbose: progress on stderr.

    Returns:
        dict with "config", "methods" (name → mean/sd of benign test MSE, excess
        MSE over the noise floor σ², relative parameter error ‖Θ̃_k − Θ_k‖²/‖Θ_k‖²),
        "clair" (detection rates, rank, λ, convergence) and "seconds".

    Example:
        >>> out = run_regression(0, num_clients=16, p=16, q=4, rank=2, num_samples=(40, 80), num_test=200)
        >>> sorted(out["methods"])[:3]
        ['clair', 'coordinate median', 'fedavg']
    """
    if estimator not in ("ols", "ridge"):
        raise ValueError(f"estimator must be 'ols' or 'ridge'; got {estimator!r}")
    if not 0.0 <= contamination < 1.0:
        raise ValueError(f"contamination must be in [0, 1); got {contamination}")
    t0 = time.perf_counter()
    fed = cj.data.make_federation(
        seed, num_clients=num_clients, p=p, q=q, rank=rank, contamination=contamination, noise=0.0, dtype=dtype
    )
    theta = fed.clean
    benign = np.asarray(fed.benign)
    rng = np.random.default_rng(seed)
    if np.ndim(num_samples) == 0:
        n = np.full(num_clients, int(num_samples))
    else:
        lo, hi = num_samples
        n = rng.integers(int(lo), int(hi) + 1, size=num_clients)
    if estimator == "ols" and n.min() <= p:
        raise ValueError(f"num_samples must exceed p = {p} for OLS; got n_min = {n.min()}")
    kinds = np.array(["none"] * num_clients, dtype=object)
    bad = np.flatnonzero(~benign)
    for i, c in enumerate(bad):
        kinds[c] = REGRESSION_POISONS[i % len(REGRESSION_POISONS)]
    train, test = R.simulate_regression(
        jax.random.key(seed), theta, n, noise=noise, poisoned=~benign, poison=list(kinds), num_test=num_test
    )
    _log(f"[regression] K={num_clients} p={p} q={q} r={rank} n_k∈[{n.min()},{n.max()}] σ={noise}", verbose)
    if estimator == "ols":
        updates = R.fit_ols(train.x, train.y, train.mask)
    else:
        updates = R.fit_ridge(train.x, train.y, train.mask, alpha=ridge_alpha)
    _log("[regression] local fits done; running CLAIR and baselines", verbose)
    estimates, result = evaluate_methods(updates, fed.subspace, benign, clair_kwargs=clair_kwargs)
    truth_sq = np.sum(np.square(np.asarray(theta)), (-2, -1))
    methods = {}
    for name, est in estimates.items():
        mse = np.asarray(R.prediction_mse(est, test))[benign]
        err = (np.sum(np.square(np.asarray(est) - np.asarray(theta)), (-2, -1)) / truth_sq)[benign]
        methods[name] = {
            "test_mse": float(mse.mean()),
            "test_mse_sd": float(mse.std()),
            "excess_mse": float(mse.mean() - noise**2),
            "rel_error": float(err.mean()),
        }
    rates = cj.metrics.detection_rates(result.client_benign, fed.benign)
    out = {
        "experiment": "regression",
        "config": {
            "seed": seed, "num_clients": num_clients, "contamination": contamination, "p": p, "q": q,
            "rank": rank, "num_samples": [int(n.min()), int(n.max())], "noise": noise,
            "estimator": estimator, "num_test": num_test,
        },
        "methods": methods,
        "clair": {
            "tpr": float(rates["tpr"]), "fpr": float(rates["fpr"]),
            "rank": np.asarray(result.rank).tolist(), "lam": np.asarray(result.lam).tolist(),
            "converged": bool(np.all(np.asarray(result.converged))),
            "flagged_by_kind": flagged_by_kind(
                result.client_benign, benign, np.where(kinds == "none", "arbitrary", kinds)
            ),
        },
        "noise_floor": noise**2,
        "seconds": time.perf_counter() - t0,
    }
    _log(f"[regression] done in {out['seconds']:.1f}s", verbose)
    return out


def flagged_by_kind(client_benign, benign, kinds):
    """Fraction of the clients of each kind that CLAIR flags contaminated.

    Args:
        client_benign: (K,) bool verdict of CLAIR.
        benign: (K,) bool true collaborative set.
        kinds: (K,) poisoning kind of each client (ignored for benign clients).

    Returns:
        dict: "benign" → false-alarm rate, then each contaminated kind (in order of
        first appearance) → detection rate.
    """
    flagged = ~np.asarray(client_benign, bool)
    benign = np.asarray(benign, bool)
    labels = np.where(benign, "benign", np.asarray(kinds, dtype=object))
    return {str(kd): float(flagged[labels == kd].mean()) for kd in dict.fromkeys(["benign", *labels.tolist()])
            if np.any(labels == kd)}


def table(out):
    """Markdown comparison table of a :func:`run_regression` / ``run_mlp`` result."""
    rows = [{"method": name, **{k: v for k, v in m.items()}} for name, m in out["methods"].items()]
    for row in rows:
        row["test MSE (benign)"] = f"{row['test_mse']:.4g} ± {row['test_mse_sd']:.2g}"
    cols = ["method", "test MSE (benign)", "excess_mse", "rel_error"]
    c = out["clair"]
    note = (
        f"CLAIR flagged {c['tpr']:.0%} of contaminated clients, {c['fpr']:.0%} of benign ones; "
        f"r̂ = {c['rank']}; noise floor {out['noise_floor']:.4g}"
    )
    return format_table(rows, cols) + "\n\n" + note


def add_arguments(parser: argparse.ArgumentParser):
    """Options of ``clair regression``."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clients", type=int, default=40, help="number of clients K")
    parser.add_argument("--contamination", type=float, default=0.3, help="fraction of contaminated clients")
    parser.add_argument("--p", type=int, default=32, help="features")
    parser.add_argument("--q", type=int, default=8, help="responses")
    parser.add_argument("--rank", type=int, default=2, help="rank of the shared subspace")
    parser.add_argument("--samples", type=int, nargs=2, default=(60, 140), metavar=("MIN", "MAX"))
    parser.add_argument("--noise", type=float, default=0.4, help="label-noise std σ")
    parser.add_argument("--estimator", choices=("ols", "ridge"), default="ols")
    parser.add_argument("--json", type=str, default=None, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def run(args) -> int:
    """Entry point of ``clair regression``."""
    out = run_regression(
        args.seed, num_clients=args.clients, contamination=args.contamination, p=args.p, q=args.q,
        rank=args.rank, num_samples=tuple(args.samples), noise=args.noise, estimator=args.estimator,
        verbose=not args.quiet,
    )
    print(table(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0
