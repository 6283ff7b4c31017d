"""Honest but noisy clients: never reported contaminated, refined no worse than local.

Federations of :func:`clair_jax.data.make_federation` (K = 40, p = 64, q = 16, r = 4)
in which a share of the honest clients carries ``factor``× the others' noise
(Θ̂_k = Θ_k + factor·E_k), with no attacker or with 30 % attackers of a mixed
kind. Reports, over seeds and settings: the share of honest clients reported
contaminated, the worst ratio refined/local error of a noisy honest client, and
the TPR on attackers (a client counts as detected when its status is
"contaminated"; before the status existed, when it was flagged).

    python benchmarks/noisy_honest.py --seeds 2
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np

import clair_jax as cj


def federation(seed, frac, factor, contamination, kind="mixed", noise=0.05):
    fed = cj.data.make_federation(seed, contamination=contamination, kind=kind, noise=noise)
    rng = np.random.default_rng(1000 + seed)
    honest = np.flatnonzero(np.asarray(fed.benign))
    loud = rng.choice(honest, int(round(frac * len(honest))), replace=False)
    clean = np.asarray(fed.clean, np.float64)
    updates = np.asarray(fed.updates, np.float64)
    updates[loud] = clean[loud] + factor * (updates[loud] - clean[loud])
    noisy = np.zeros(len(updates), bool)
    noisy[loud] = True
    return updates.astype(np.float32), clean, np.asarray(fed.benign), noisy


def status_of(res):
    """Per client 'benign' | 'noisy' | 'contaminated' (today's flag where no status exists)."""
    if hasattr(res, "statuses"):
        return np.array(res.statuses())
    return np.where(np.asarray(res.client_benign), "benign", "contaminated")


def run(seed, frac, factor, contamination):
    updates, clean, honest, noisy = federation(seed, frac, factor, contamination)
    res = cj.clair(updates)
    status = status_of(res)
    refined = np.asarray(res.refined, np.float64)
    err = np.linalg.norm((refined - clean).reshape(len(clean), -1), axis=1)
    local = np.linalg.norm((updates - clean).reshape(len(clean), -1), axis=1)
    bad = ~honest
    return dict(seed=seed, frac=frac, factor=factor, contamination=contamination,
                honest_contaminated=int(np.sum(status[honest] == "contaminated")), honest=int(honest.sum()),
                noisy_reported_noisy=int(np.sum(status[noisy] == "noisy")), noisy=int(noisy.sum()),
                worst_noisy_vs_local=float(np.max(err[noisy] / local[noisy])),
                mean_noisy_vs_local=float(np.mean(err[noisy] / local[noisy])),
                mean_quiet_vs_local=float(np.mean(err[honest & ~noisy] / local[honest & ~noisy])),
                tpr=float(np.mean(status[bad] == "contaminated")) if bad.any() else float("nan"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for contamination, frac, factor, seed in itertools.product((0.0, 0.3), (0.1, 0.2, 0.3), (3, 5, 10),
                                                               range(args.seeds)):
        rows.append(run(seed, frac, factor, contamination))
        r = rows[-1]
        print(f"att {contamination:.1f} noisy {frac:.1f} x{factor:<2d} seed {seed}: honest contaminated "
              f"{r['honest_contaminated']}/{r['honest']}, noisy reported noisy {r['noisy_reported_noisy']}/{r['noisy']}, "
              f"noisy refined/local worst {r['worst_noisy_vs_local']:.3f} mean {r['mean_noisy_vs_local']:.3f}, "
              f"quiet {r['mean_quiet_vs_local']:.3f}, TPR {r['tpr']:.3f}", flush=True)
    honest = sum(r["honest"] for r in rows)
    wrong = sum(r["honest_contaminated"] for r in rows)
    att = [r for r in rows if r["contamination"] > 0]
    print(f"\nhonest reported contaminated: {wrong}/{honest} ({wrong / honest:.4f}); "
          f"worst noisy refined/local {max(r['worst_noisy_vs_local'] for r in rows):.3f}; "
          f"mean TPR with attackers {np.mean([r['tpr'] for r in att]):.4f} (min {min(r['tpr'] for r in att):.3f})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
