"""What a LoRA client can report about its noise, against a ground truth, on the real-LLM federation.

For a run kept with ``clair shakespeare --adapters DIR`` (same seed and mode):

* **ground truth**: ``--roles`` honest roles each retrained ``--resamples`` times
  from the shared initialisation on bootstrap resamples of their own training
  sequences (new data draws and batch orders): the variance of ΔW across
  resamples, per module, is E‖E_k‖²;
* **half split** (what a client can afford: one more training): each client
  trained on the two halves of its data; ν = ‖(ΔW_a − ΔW_b)/2‖²
  (``cj.centre.noise_from_halves``);
* **size model** (no extra training; the client reports its number of training
  sequences): ν = ĉ/n_k fitted over the honest clients (``cj.centre.size_noise``);
* **σ̂ from the stack** (nothing reported): σ̂²·p·r with σ̂ the noise level
  ``clair aggregate`` reads from the stacked factors.

It prints each estimate's ratio to the ground truth per module kind (median over
roles and layers) and each estimate's ratio to the distance from the benign
centre, and writes JSON. About 2× one run's training time.

    python benchmarks/investigations/llm_noise.py --run DIR --seed 0 [--full] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from clair_jax import llm
from clair_jax.experiments import shakespeare as sh
from clair_jax.llm import texts as tx


def _energy(delta_a, delta_b, spec, scale=1.0):
    return np.array([[np.sum((scale * (delta_a[m][li] - delta_b[m][li])) ** 2) for li in range(len(spec.layers))]
                     for m in spec.modules])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="an adapters dir of clair shakespeare --adapters")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--roles", type=int, default=5)
    ap.add_argument("--resamples", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cfg = sh.FULL if args.full else sh.QUICK
    t0 = time.perf_counter()
    model = llm.load_model(None)
    clients = sh.build_clients(model, tx.locate_shakespeare(None), cfg, args.seed)
    spec = sh._spec(model, cfg)
    start = spec.layers[0]
    local = [sh.dense_deltas(sh._saved_adapter(args.run, c, model, spec), spec) for c in clients]
    hidden = [sh.cache_hidden(model, c.train, start) for c in clients]
    honest = [j for j, c in enumerate(clients) if c.benign]

    def sub(j, rows):
        return clients[j]._replace(train=clients[j].train[rows], train_mask=clients[j].train_mask[rows]), hidden[j][rows]

    # half split, every client as in the run (the batch order is seeded by the client's index)
    halves = []
    for g in (0, 1):
        cs, hs = [], []
        for j in range(len(clients)):
            perm = np.random.default_rng([args.seed, j, 55]).permutation(len(clients[j].train))
            rows = np.sort(perm[: len(perm) // 2] if g == 0 else perm[len(perm) // 2:])
            c, h = sub(j, rows if len(rows) else perm)
            cs.append(c)
            hs.append(h)
        ad, _ = sh.train_clients(model, cs, hs, cfg, args.seed)
        halves.append([sh.dense_deltas(ad[j], spec) for j in honest])
        print(f"[{time.perf_counter() - t0:6.0f} s] half {g} trained", file=sys.stderr, flush=True)
    nu_half = np.stack([_energy(a, b, spec, 0.5) for a, b in zip(*halves)])          # (H, M, L)

    # ground truth: bootstrap resamples of a few roles
    roles = honest[: args.roles]
    reps = []
    for r in range(args.resamples):
        cs, hs = [], []
        for j in roles:
            rows = np.random.default_rng([args.seed, j, 77, r]).choice(len(clients[j].train), len(clients[j].train))
            c, h = sub(j, rows)
            cs.append(c)
            hs.append(h)
        ad, _ = sh.train_clients(model, cs, hs, cfg, args.seed)
        reps.append([sh.dense_deltas(a, spec) for a in ad])
        print(f"[{time.perf_counter() - t0:6.0f} s] resample {r} trained", file=sys.stderr, flush=True)
    truth = np.stack([[[np.var(np.stack([rep[i][m][li] for rep in reps]), axis=0, ddof=1).sum()
                        for li in range(len(spec.layers))] for m in spec.modules] for i in range(len(roles))])

    # distance to the honest centre, the size model and σ̂
    centre = {m: np.mean([local[j][m] for j in honest], 0) for m in spec.modules}
    dev = np.stack([[[np.sum((local[j][m][li] - centre[m][li]) ** 2) for li in range(len(spec.layers))]
                     for m in spec.modules] for j in honest])
    sizes = np.array([len(clients[j].train) for j in honest], float)
    import jax.numpy as jnp

    from clair_jax import centre as cc
    flat = dev.reshape(len(honest), -1).T
    nu_size = np.asarray(cc.size_noise(jnp.asarray(flat), jnp.ones(len(honest), bool), jnp.asarray(sizes))[0]).T
    nu_size = nu_size.reshape(dev.shape)
    with open(os.path.join(args.run, "report.json"), encoding="utf-8") as fh:
        report = json.load(fh)
    sigma = {}
    for g in report["groups"]:
        for name, s in zip(g["modules"], g["noise_level"]):
            sigma[(int(name.split(".")[2]), name.split(".")[-1][0])] = s * s * g["shape"][0] * spec.rank
    nu_sigma = np.broadcast_to(np.array([[sigma[(layer, m)] for layer in spec.layers] for m in spec.modules]), dev.shape)

    idx = [honest.index(j) for j in roles]
    rows = []
    for name, est in (("half split", nu_half), ("size model", nu_size), ("σ̂ of the stack", nu_sigma)):
        rows.append(dict(estimate=name,
                         vs_truth={m: float(np.median(est[idx, mi] / truth[:, mi])) for mi, m in enumerate(spec.modules)},
                         vs_distance={m: float(np.median(est[:, mi] / dev[:, mi])) for mi, m in enumerate(spec.modules)}))
    rows.append(dict(estimate="ground truth", vs_truth={m: 1.0 for m in spec.modules},
                     vs_distance={m: float(np.median(truth[:, mi] / dev[idx, mi])) for mi, m in enumerate(spec.modules)}))
    print(f"{'estimate':<18}" + "".join(f"{'÷ truth ' + m:>11}" for m in spec.modules)
          + "".join(f"{'÷ dist ' + m:>10}" for m in spec.modules))
    for r in rows:
        print(f"{r['estimate']:<18}" + "".join(f"{r['vs_truth'][m]:>11.2f}" for m in spec.modules)
              + "".join(f"{r['vs_distance'][m]:>10.2f}" for m in spec.modules))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(dict(run=args.run, seed=args.seed, full=args.full, roles=[clients[j].name for j in roles],
                           resamples=args.resamples, rows=rows, seconds=time.perf_counter() - t0), fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
