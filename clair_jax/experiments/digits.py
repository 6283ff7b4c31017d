"""Real data: scikit-learn's bundled 8 × 8 digits, ridge-classifier clients → CLAIR.

Every other experiment draws its federation from the model CLAIR assumes. Here
the clients hold real images (``sklearn.datasets.load_digits``, shipped with
scikit-learn, nothing is downloaded):

* K clients, each with a non-IID class mix π_k ~ Dirichlet(α·1) over the ten
  digits and n_k ∈ [30, 60] private training images drawn from a training half
  of the data by that mix;
* each client fits a ridge classifier on one-hot labels, Θ̂_k = (XᵀX + ρI)⁻¹XᵀY,
  with X the pixels scaled to [0, 1] plus an intercept column: a 65 × 10
  coefficient matrix per client, the update CLAIR sees;
* a fraction of the clients is contaminated: label flipping (y → 9 − y),
  random labels, a parity task (one-hot of y mod 2), a pixel-regression task
  (the same ten pixels as targets for every such client), or a mix of the four;
* each benign client is scored on the held-out half by its accuracy on its own
  class mix, Σ_c π_kc · acc_c(Θ̃_k) (the expectation over held-out images drawn
  by π_k, without the sampling noise).

Why relabelling hides from a subspace method: ridge is linear in Y, so a client
whose labels are any linear map of the true one-hot labels, Y' = Y A (a flip is a
permutation A, parity sums the even and the odd columns), sends Θ̂' = Θ̂ A, whose
column space lies inside the benign one. On the left side CLAIR cannot see it —
and its refined benign clients do not care either, since Û is unchanged.

scikit-learn is imported only here (the ``realdata`` extra).
``clair digits`` prints the comparison table (markdown) and can write JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

import clair_jax as cj
from clair_jax.estimators import coordinate_noise
from clair_jax.experiments.regression import _log, flagged_by_kind, format_table

__all__ = [
    "KINDS", "POISONS", "DigitsFederation", "load_digits", "make_digits_federation", "ridge_fit", "accuracy",
    "evaluate_digits", "reported_noise", "run_digits", "run_digits_seeds", "table", "add_arguments", "run",
]

#: Contamination settings: "none" (every client benign), one poison, or "mixed".
KINDS = ("none", "label_flip", "random_labels", "parity", "pixel_regression", "mixed")
#: The poisons "mixed" cycles through.
POISONS = ("label_flip", "random_labels", "parity", "pixel_regression")
#: Targets of the pixel-regression clients: ten central pixels (row-major 8 × 8 index).
PIXELS = (19, 20, 21, 27, 28, 29, 35, 36, 37, 44)
#: Methods in table order.
METHODS = ("local", "fedavg", "median", "trimmed mean", "multi-krum", "benign fedavg",
           "clair (no pooling)", "clair (pooling)", "clair (reported noise)", "clair (full pooling)", "oracle S")


def load_digits():
    """(images (1797, 64) in [0, 1], labels (1797,)) from scikit-learn's bundled copy."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the digits study needs scikit-learn: pip install 'clair-jax[realdata]'") from err
    data = _load()
    return np.asarray(data.data, np.float64) / 16.0, np.asarray(data.target, np.int64)


class DigitsFederation(NamedTuple):
    """One digits federation.

    Attributes:
        updates: (K, 65, 10) ridge coefficients Θ̂_k (last row: intercept).
        benign: (K,) bool true collaborative set.
        kinds: (K,) poison of each client ("none" for benign ones).
        mix: (K, 10) class mix π_k.
        num_samples: (K,) n_k.
        test_x: (m, 65) held-out images with the intercept column. test_y: (m,) labels.
        train: K pairs (x (n_k, 65), targets (n_k, 10)): each client's own training data
            (what it refits to report its noise along Û).
        ridge: ρ of every client's fit.
    """

    updates: np.ndarray
    benign: np.ndarray
    kinds: np.ndarray
    mix: np.ndarray
    num_samples: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    train: tuple = ()
    ridge: float = 1.0


def _with_intercept(x):
    return np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)


def ridge_fit(x, y, ridge):
    """Θ̂ = (XᵀX + ρI)⁻¹XᵀY for one client: x (n, p), y (n, q) → (p, q)."""
    p = x.shape[1]
    return np.linalg.solve(x.T @ x + ridge * np.eye(p), x.T @ y)


def _targets(kind, images, labels, rng):
    if kind == "none":
        return np.eye(10)[labels]
    if kind == "label_flip":
        return np.eye(10)[9 - labels]
    if kind == "random_labels":
        return np.eye(10)[rng.integers(0, 10, size=labels.shape)]
    if kind == "parity":
        return np.eye(10)[labels % 2]
    if kind == "pixel_regression":
        return images[:, list(PIXELS)]
    raise ValueError(f"unknown poison {kind!r}; expected one of {POISONS}")


def make_digits_federation(seed=0, *, kind="mixed", num_clients=40, contamination=0.3, num_samples=(30, 60),
                           dirichlet=0.5, ridge=1.0, data=None):
    """Draws a digits federation (see the module docstring).

    Args:
        seed: seed of the train/test split, the class mixes, the samples and the poisons.
        kind: one of :data:`KINDS`; "none" makes every client benign.
        num_clients: K.
        contamination: fraction of contaminated clients (ignored for "none").
        num_samples: (n_min, n_max), n_k uniform in between.
        dirichlet: concentration α of the class mixes (smaller: more non-IID).
        ridge: ridge strength ρ.
        data: (images, labels) to use instead of :func:`load_digits`.

    Returns:
        :class:`DigitsFederation`.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not 0.0 <= contamination < 1.0:
        raise ValueError(f"contamination must be in [0, 1), got {contamination}")
    images, labels = load_digits() if data is None else data
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    train, test = order[: len(order) // 2], order[len(order) // 2:]
    by_class = [train[labels[train] == c] for c in range(10)]
    lo, hi = num_samples
    n = rng.integers(int(lo), int(hi) + 1, size=num_clients)
    mix = rng.dirichlet(np.full(10, dirichlet), size=num_clients)
    kinds = np.array(["none"] * num_clients, dtype=object)
    if kind != "none":
        bad = rng.choice(num_clients, size=int(round(contamination * num_clients)), replace=False)
        for i, c in enumerate(np.sort(bad)):
            kinds[c] = POISONS[i % len(POISONS)] if kind == "mixed" else kind
    updates, train_data = np.empty((num_clients, 65, 10)), []
    for k in range(num_clients):
        counts = rng.multinomial(n[k], mix[k])
        idx = np.concatenate([rng.choice(by_class[c], size=counts[c], replace=counts[c] > len(by_class[c]))
                              for c in range(10)])
        y = _targets(kinds[k], images[idx], labels[idx], rng)
        train_data.append((_with_intercept(images[idx]), y))
        updates[k] = ridge_fit(*train_data[-1], ridge)
    return DigitsFederation(updates, kinds == "none", kinds, mix, n, _with_intercept(images[test]), labels[test],
                            tuple(train_data), float(ridge))


def accuracy(estimates, fed):
    """(K,) accuracy of each client's classifier on held-out images of its own class mix.

    acc_k = Σ_c π_kc · (share of held-out images of class c that Θ̃_k classifies as c).
    """
    pred = np.argmax(np.einsum("mp,kpq->kmq", fed.test_x, np.asarray(estimates, np.float64)), axis=-1)
    hit = pred == fed.test_y[None, :]
    per_class = np.stack([hit[:, fed.test_y == c].mean(axis=1) for c in range(10)], axis=1)   # (K, 10)
    return np.sum(fed.mix * per_class, axis=1)


def _oracle_s(updates, benign, pooling):
    """Refinement on the true collaborative set: Û from the true benign stack, r̂ by the noise edge."""
    blocks = jnp.asarray(updates)
    s = jnp.asarray(benign)
    u, sv = cj.refine.benign_spectrum(blocks, s)
    r, sigma = cj.refine.select_rank(sv, s, *blocks.shape[-2:])
    basis, _ = cj.refine.shared_basis(u, r, blocks, s)
    refined, _ = cj.refine.partial_pool(basis, blocks, s, sigma, pooling=pooling)
    return refined


def _used(result):
    return result.client_benign & (result.rank > 0)


def reported_noise(fed):
    """The clients' answer to Û: each refits its ridge classifier without one image at a time
    (:func:`clair_jax.estimators.coordinate_noise`) → (K, r) noise along each direction."""
    fit = functools.partial(ridge_fit, ridge=fed.ridge)
    return lambda basis: np.stack([coordinate_noise(fit, x, y, basis) for x, y in fed.train])


def evaluate_digits(fed, *, clair_kwargs=None):
    """CLAIR, the baselines, benign FedAvg and the oracle-S refinement on one federation.

    CLAIR runs with ``pooling="auto"``; its Û, verdict and α_k also give the
    refinement without pooling (what ``pooling="none"`` returns:
    Û Ûᵀ Θ̂_k + α_k(I − Û Ûᵀ)Θ̂_k) and with full pooling (Λ = 0). Once more with
    the clients reporting their noise along Û (:func:`reported_noise`):
    "clair (reported noise)".

    Returns:
        (accuracies: method → (K,) accuracy of every client, clair result, Λ (K, r_max) of
        each pooled refinement and the clients set aside with the reported noise:
        {"pooling": …, "reported noise": …, "outlying": (K,) bool}).
    """
    b = cj.baselines
    x = jnp.asarray(fed.updates)
    # One screening, two refinements: the verdict does not depend on the pooling.
    screening = cj.screen([x], **{"pooling": "auto", **(clair_kwargs or {})})
    (result,) = cj.conclude(screening)
    (reported,) = cj.conclude(screening, coordinate_noise=[reported_noise(fed)])
    used = _used(result)
    projected = cj.refine.project(result.subspace, x, used)
    share = jnp.asarray(result.local_share)[:, None, None]
    unpooled = jnp.where(used[:, None, None], projected + share * (x - projected), result.refined)
    estimates = {
        "local": b.local(x),
        "fedavg": b.fedavg(x),
        "median": b.coordinate_median(x),
        "trimmed mean": b.trimmed_mean(x),
        "multi-krum": b.multi_krum(x),
        "benign fedavg": b.fedavg(x, weights=jnp.asarray(fed.benign, x.dtype)),
        "clair (no pooling)": unpooled,
        "clair (pooling)": result.refined,
        "clair (reported noise)": reported.refined,
        "clair (full pooling)": cj.refine.partial_pool(result.subspace, x, used, result.noise_level,
                                                       pooling="full")[0],
        "oracle S": _oracle_s(x, fed.benign, "auto"),
    }
    shrinkage = {"pooling": np.asarray(result.shrinkage), "reported noise": np.asarray(reported.shrinkage),
                 "outlying": np.asarray(reported.outlying)}
    return {name: accuracy(est, fed) for name, est in estimates.items()}, result, shrinkage


def run_digits(seed=0, *, kind="mixed", num_clients=40, contamination=0.3, num_samples=(30, 60), dirichlet=0.5,
               ridge=1.0, clair_kwargs=None, verbose=False, data=None):
    """One digits federation end to end.

    Returns:
        dict with "config", "methods" (name → mean / sd / min over benign clients of
        the accuracy, and the share of benign clients below their local accuracy),
        "clair" (detection rates, flagged by kind, r̂, mean Λ of the pooled
        refinement), "per_client" (benign clients' local and CLAIR accuracies) and
        "seconds".
    """
    t0 = time.perf_counter()
    fed = make_digits_federation(seed, kind=kind, num_clients=num_clients, contamination=contamination,
                                 num_samples=num_samples, dirichlet=dirichlet, ridge=ridge, data=data)
    acc, result, shrink = evaluate_digits(fed, clair_kwargs=clair_kwargs)
    ben = fed.benign
    methods = {}
    for name in METHODS:
        a = acc[name][ben]
        methods[name] = {"accuracy": float(a.mean()), "accuracy_sd": float(a.std()), "worst": float(a.min()),
                         "below_local": float(np.mean(a < acc["local"][ben] - 1e-12))}
    rates = cj.metrics.detection_rates(result.client_benign, jnp.asarray(ben))
    verdict = np.asarray(result.client_benign)
    rank = int(np.asarray(result.rank))

    def mean_shrink(lam):   # over the refined benign clients and the r̂ live directions
        return float(lam[verdict & ben][:, :rank].mean()) if np.any(verdict & ben) and rank > 0 else None

    out = {
        "experiment": "digits",
        "config": {"seed": seed, "kind": kind, "num_clients": num_clients, "contamination": contamination,
                   "num_samples": list(num_samples), "dirichlet": dirichlet, "ridge": ridge},
        "methods": methods,
        "clair": {
            "tpr": float(rates["tpr"]) if not ben.all() else None, "fpr": float(rates["fpr"]),
            "flagged_by_kind": flagged_by_kind(verdict, ben, fed.kinds),
            "rank": int(np.asarray(result.rank)), "noise_level": float(np.asarray(result.noise_level)),
            "shrinkage": mean_shrink(shrink["pooling"]),
            "shrinkage_reported": mean_shrink(shrink["reported noise"]),
            # With the reported noise: clients left out of Û and the centre although the verdict clears them.
            "outlying_benign": float(np.mean(shrink["outlying"][ben])),
            "outlying_contaminated": float(np.mean(shrink["outlying"][~ben])) if not ben.all() else None,
        },
        "per_client": {name: acc[name].tolist()
                       for name in ("local", "clair (no pooling)", "clair (pooling)", "clair (reported noise)")},
        "kinds": [str(k) for k in fed.kinds],
        "seconds": time.perf_counter() - t0,
    }
    _log(f"[digits] seed {seed} kind {kind}: {out['seconds']:.1f}s", verbose)
    return out


def run_digits_seeds(seeds, kinds=KINDS, **kwargs):
    """:func:`run_digits` over seeds × kinds; the table rows averaged over seeds.

    Returns:
        {"runs": [each run's dict], "summary": {kind: {method: mean accuracy,
        "tpr": …, "fpr": …}}}.
    """
    data = kwargs.pop("data", None) or load_digits()
    runs = [run_digits(s, kind=k, data=data, **kwargs) for k in kinds for s in seeds]
    summary = {}
    for k in kinds:
        mine = [r for r in runs if r["config"]["kind"] == k]
        row = {m: float(np.mean([r["methods"][m]["accuracy"] for r in mine])) for m in METHODS}
        row["below local (pooling)"] = float(np.mean([r["methods"]["clair (pooling)"]["below_local"] for r in mine]))
        tprs = [r["clair"]["tpr"] for r in mine if r["clair"]["tpr"] is not None]
        row["tpr"] = float(np.mean(tprs)) if tprs else None
        row["fpr"] = float(np.mean([r["clair"]["fpr"] for r in mine]))
        row["rank"] = float(np.mean([r["clair"]["rank"] for r in mine]))
        row["outlying benign"] = float(np.mean([r["clair"]["outlying_benign"] for r in mine]))
        out_bad = [r["clair"]["outlying_contaminated"] for r in mine if r["clair"]["outlying_contaminated"] is not None]
        row["outlying contaminated"] = float(np.mean(out_bad)) if out_bad else None
        for key in ("shrinkage", "shrinkage_reported"):
            shr = [r["clair"][key] for r in mine if r["clair"][key] is not None]
            row[key] = float(np.mean(shr)) if shr else None
        summary[k] = row
    return {"runs": runs, "summary": summary, "seeds": list(seeds)}


def table(out):
    """Markdown table of a :func:`run_digits_seeds` result (mean accuracy of benign clients)."""
    rows = []
    for kind, row in out["summary"].items():
        r = {"contamination": kind, **{m: row[m] for m in METHODS}}
        r["CLAIR TPR"] = "–" if row["tpr"] is None else f"{row['tpr']:.2f}"
        r["FPR"] = f"{row['fpr']:.2f}"
        r["r̂"] = f"{row['rank']:.1f}"
        r["mean Λ"] = "–" if row["shrinkage"] is None else f"{row['shrinkage']:.2f}"
        r["mean Λ (reported)"] = "–" if row["shrinkage_reported"] is None else f"{row['shrinkage_reported']:.2f}"
        r["set aside (reported): contaminated / benign"] = (
            f"{'–' if row['outlying contaminated'] is None else format(row['outlying contaminated'], '.2f')} / "
            f"{row['outlying benign']:.2f}")
        rows.append(r)
    cols = ["contamination", *METHODS, "CLAIR TPR", "FPR", "r̂", "mean Λ", "mean Λ (reported)",
            "set aside (reported): contaminated / benign"]
    return format_table(rows, cols) + f"\n\nmean accuracy of the benign clients, {len(out['seeds'])} seed(s)"


def add_arguments(parser: argparse.ArgumentParser):
    """Options of ``clair digits``."""
    parser.add_argument("--kind", choices=("all",) + KINDS, default="all", help="contamination setting")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (seed, seed+1, ...)")
    parser.add_argument("--clients", type=int, default=40, help="number of clients K")
    parser.add_argument("--contamination", type=float, default=0.3, help="fraction of contaminated clients")
    parser.add_argument("--json", type=str, default=None, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def run(args) -> int:
    """Entry point of ``clair digits``."""
    kinds = KINDS if args.kind == "all" else (args.kind,)
    out = run_digits_seeds(range(args.seed, args.seed + args.seeds), kinds, num_clients=args.clients,
                           contamination=args.contamination, verbose=not args.quiet)
    print(table(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0
