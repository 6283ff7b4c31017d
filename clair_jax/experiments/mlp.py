"""End to end with MLP clients: optax fine-tuning → CLAIR → held-out test loss.

A base MLP is trained once (:func:`clair_jax.estimators.mlp.make_mlp_federation`);
every client fine-tunes the deltas of its L first-layer modules on its own data
(full or LoRA, one vmapped optax loop); contaminated clients train on poisoned data.
The (L, K, p, q) deltas go to :func:`clair_jax.clair` with the layer axis leading
and to the baselines; each benign client's model base + Δ is scored on its clean
held-out data.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

import clair_jax as cj
from clair_jax.estimators import mlp as M
from clair_jax.experiments.regression import _log, evaluate_methods, flagged_by_kind, table

__all__ = ["run_mlp", "add_arguments", "run"]


def run_mlp(
    seed=0,
    *,
    num_clients=40,
    contamination=0.3,
    num_modules=2,
    rank=2,
    num_samples=(150, 250),
    noise=0.3,
    mode="full",
    steps=1000,
    learning_rate=0.2,
    num_test=500,
    clair_kwargs=None,
    verbose=False,
):
    """Fine-tuned MLP deltas → CLAIR and baselines → per-client test loss.

    Args:
        seed: seed of the base task, the federation and the fine-tuning.
        num_clients: K.
        contamination: fraction of contaminated (data-poisoned) clients.
        num_modules: L, adapted modules (the leading layer axis).
        rank: r of the shared subspaces.
        num_samples: (n_min, n_max) for unequal sizes, or one int.
        noise: label-noise standard deviation.
        mode: "full" or "lora" fine-tuning.
        steps, learning_rate: fine-tuning schedule (SGD with momentum).
        num_test: clean held-out rows per client.
        clair_kwargs: extra keyword arguments for :func:`clair_jax.clair`.
        verbose: progress on stderr.

    Returns:
        dict like :func:`clair_jax.experiments.regression.run_regression`, with the
        benign clients' test MSE per method plus "zero delta" (the base model).

    Example:
        >>> out = run_mlp(0, num_clients=8, num_samples=40, steps=20, num_test=20)  # doctest: +SKIP
    """
    if mode not in ("full", "lora"):
        raise ValueError(f"mode must be 'full' or 'lora'; got {mode!r}")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    if np.ndim(num_samples) == 0:
        n = np.full(num_clients, int(num_samples))
    else:
        n = rng.integers(int(num_samples[0]), int(num_samples[1]) + 1, size=num_clients)
    fed = M.make_mlp_federation(
        seed, num_clients=num_clients, contamination=contamination, num_modules=num_modules,
        rank=rank, num_samples=n, num_test=num_test, noise=noise,
    )
    _log(f"[mlp] base model trained (loss {float(fed.base_losses[-1]):.2e}); fine-tuning {num_clients} clients", verbose)
    ft = M.fine_tune(
        jax.random.key(seed + 1), fed.params, fed.x_train, fed.y_train, fed.mask_train,
        mode=mode, steps=steps, learning_rate=learning_rate,
    )
    benign = np.asarray(fed.benign)
    _log(
        f"[mlp] fine-tuned: benign train loss {float(ft.initial_loss[benign].mean()):.4f} → "
        f"{float(ft.final_loss[benign].mean()):.4f}; running CLAIR and baselines",
        verbose,
    )
    estimates, result = evaluate_methods(ft.deltas, fed.subspace, benign, clair_kwargs=clair_kwargs)
    estimates = {"zero delta": 0 * ft.deltas, **estimates}
    truth = np.asarray(fed.true_deltas)
    truth_sq = np.sum(np.square(truth), (0, 2, 3))
    methods = {}
    for name, est in estimates.items():
        loss = np.asarray(M.client_loss(fed.params, est, fed.x_test, fed.y_test))[benign]
        err = (np.sum(np.square(np.asarray(est) - truth), (0, 2, 3)) / truth_sq)[benign]
        methods[name] = {
            "test_mse": float(loss.mean()),
            "test_mse_sd": float(loss.std()),
            "excess_mse": float(loss.mean() - noise**2),
            "rel_error": float(err.mean()),
        }
    rates = cj.metrics.detection_rates(result.client_benign, fed.benign)
    out = {
        "experiment": "mlp",
        "config": {
            "seed": seed, "num_clients": num_clients, "contamination": contamination,
            "num_modules": num_modules, "rank": rank, "num_samples": [int(n.min()), int(n.max())],
            "noise": noise, "mode": mode, "steps": steps, "learning_rate": learning_rate,
        },
        "methods": methods,
        "clair": {
            "tpr": float(rates["tpr"]), "fpr": float(rates["fpr"]),
            "rank": np.asarray(result.rank).tolist(), "lam": np.asarray(result.lam).tolist(),
            "converged": bool(np.all(np.asarray(result.converged))),
            "flagged_by_kind": flagged_by_kind(result.client_benign, benign, fed.poison_kinds),
        },
        "train_loss": {
            "initial": float(ft.initial_loss[benign].mean()), "final": float(ft.final_loss[benign].mean())
        },
        "noise_floor": noise**2,
        "seconds": time.perf_counter() - t0,
    }
    _log(f"[mlp] done in {out['seconds']:.1f}s", verbose)
    return out


def add_arguments(parser: argparse.ArgumentParser):
    """Options of ``clair mlp``."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clients", type=int, default=40, help="number of clients K")
    parser.add_argument("--contamination", type=float, default=0.3, help="fraction of contaminated clients")
    parser.add_argument("--modules", type=int, default=2, help="adapted modules L (the layer axis)")
    parser.add_argument("--rank", type=int, default=2, help="rank of the shared subspaces")
    parser.add_argument("--samples", type=int, nargs=2, default=(150, 250), metavar=("MIN", "MAX"))
    parser.add_argument("--noise", type=float, default=0.3, help="label-noise std")
    parser.add_argument("--mode", choices=("full", "lora"), default="full")
    parser.add_argument("--steps", type=int, default=1000, help="fine-tuning steps")
    parser.add_argument("--json", type=str, default=None, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def run(args) -> int:
    """Entry point of ``clair mlp``."""
    out = run_mlp(
        args.seed, num_clients=args.clients, contamination=args.contamination, num_modules=args.modules,
        rank=args.rank, num_samples=tuple(args.samples), noise=args.noise, mode=args.mode,
        steps=args.steps, verbose=not args.quiet,
    )
    print(table(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0
