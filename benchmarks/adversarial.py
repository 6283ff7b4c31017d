"""A zoo of attacks and awkward federations for ``cj.clair`` with default arguments.

Each case reproduces one finding of issue 14 (the class number is the issue's):

1. benign clients hurt with no (or one obvious) attacker: noiseless exact-rank
   LoRA, few clients, rank near Kq/2, copies of one honest update;
2. huge updates inside the shared subspace;
3. overflow / underflow: entries near 1e19, whole federations scaled by 1e19,
   1e-20, 1e30, an all-NaN client;
4. coordinated minorities: a shared rank-1 / rank-2 attack subspace, LoRA attackers
   of every size along one direction, copies of an honest update plus one common
   direction;
5. heavy-tailed (Student-t, df = 2) noise, attackers confined to one of six layers;
6. the copy task's foreign-permutation client (``--copy-task``: trains models);
8. honest clients that differ in norm or in noise;

and class 0, what no subspace method can see by design: attackers inside the
shared subspace with benign-sized coefficients.

Columns: TPR / FPR of the pooled verdict (``client_benign``; "positive" =
contaminated), the share of honest clients whose public status is
"contaminated" (``ClairResult.contaminated()``: a flagged honest client that is
noise-like is "noisy", refined and not accused), the benign clients' mean relative error ‖Θ̃_k − Θ_k‖/‖Θ_k‖ (Θ_k
the noise-free update), that error over the local one (each client keeps Θ̂_k)
and over the oracle's (true subspace and true set, :func:`cj.baselines.oracle`),
r̂ against the true rank, and flags: ``nonfinite`` when any reported number
(z, scores, refined updates, Û, σ̂, objective) is NaN/Inf, by name, ``converged`` when every
problem's decomposition converged. Only the public API is used.

Usage::

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python benchmarks/adversarial.py [--quick] [--seeds 3] [--copy-task] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks._common import machine_info, markdown_table, write_json  # noqa: E402

import clair_jax as cj  # noqa: E402

# The reference federation: 40 clients of 48 × 12, shared rank 3, noise
# norm about 40% of an update's norm.
K, P, Q, R, NOISE = 40, 48, 12, 3, 0.4


# ------------------------------------------------------------------ generators


def _basis(rng, p, r):
    return np.linalg.qr(rng.standard_normal((p, r)))[0]


def _unit(x):
    return x / np.linalg.norm(x)


def _benign(rng, u, k, q, spread=None):
    """k noise-free benign blocks U V_kᵀ of Frobenius norm ≈ 1 (times a per-client scale)."""
    r = u.shape[1]
    v = rng.standard_normal((k, q, r)) / np.sqrt(q * r)
    clean = np.einsum("pr,kqr->kpq", u, v)
    if spread is not None:
        clean *= np.exp(rng.uniform(0.0, np.log(spread), k))[:, None, None]
    return clean


def _noise(rng, shape, norm=NOISE, df=None):
    """Noise whose Frobenius norm per block is about ``norm`` (Student-t when ``df``)."""
    p, q = shape[-2:]
    if df is None:
        return norm / np.sqrt(p * q) * rng.standard_normal(shape)
    # t with df = 2 has infinite variance: scale by the median |t| instead of the std.
    t = rng.standard_t(df, shape)
    return norm / np.sqrt(p * q) * t / np.median(np.abs(rng.standard_t(df, 100000))) * 0.6745


def dense_case(rng, *, k=K, p=P, q=Q, r=R, noise=NOISE, spread=None, df=None):
    """The reference federation, all honest: returns (updates, clean, U, benign)."""
    u = _basis(rng, p, r)
    clean = _benign(rng, u, k, q, spread)
    updates = clean + (_noise(rng, clean.shape, noise, df) if noise else 0.0)
    return updates, clean, u, np.ones(k, bool)


def _attackers(rng, k, frac):
    n = int(round(frac * k))
    bad = np.zeros(k, bool)
    bad[rng.choice(k, n, replace=False)] = True
    return bad


def _gaussian_attack(rng, updates, clean, bad, norm=1.0):
    g = rng.standard_normal((int(bad.sum()),) + updates.shape[1:])
    g *= norm / np.linalg.norm(g, axis=(-2, -1), keepdims=True)
    updates, clean = updates.copy(), clean.copy()
    updates[bad] = g
    clean[bad] = g
    return updates, clean


# ------------------------------------------------------------------ the cases
# Each returns dict(updates, clean, subspace, benign, rank) with dense clean
# blocks (..., K, p, q), subspace (..., p, r) and benign (K,).


def _case(updates, clean, u, benign, rank=None, **extra):
    return dict(updates=updates, clean=clean, subspace=u, benign=benign,
                rank=u.shape[-1] if rank is None else rank, **extra)


def c1_lora_noiseless(rng, poisoned=True, modules=4, k=8, p=32, q=24, r=4):
    """Noiseless LoRA: B_k = U_m G_k, A_k random; one client poisoned at 50× norm."""
    u = np.stack([_basis(rng, p, r) for _ in range(modules)])
    g = rng.standard_normal((modules, k, r, r))
    b = np.einsum("mpr,mkrs->mkps", u, g)
    a = rng.standard_normal((modules, k, r, q)) / np.sqrt(q)
    benign = np.ones(k, bool)
    if poisoned:
        benign[0] = False
        bb = rng.standard_normal((modules, p, r))
        dense_ok = np.linalg.norm(b[:, 1:] @ a[:, 1:], axis=(-2, -1)).mean()
        raw = bb @ a[:, 0]
        b[:, 0] = bb * (50 * dense_ok / np.linalg.norm(raw, axis=(-2, -1)))[:, None, None]
    b, a = b.astype(np.float32), a.astype(np.float32)
    dense = b @ a
    return _case(cj.LoRAFactors(B=b, A=a), dense, u, benign)


def c1_dense_noiseless(rng):
    """Noiseless dense reference federation, exact rank 3, 30% Gaussian attackers."""
    updates, clean, u, benign = dense_case(rng, noise=0.0)
    bad = _attackers(rng, K, 0.3)
    updates, clean = _gaussian_attack(rng, updates, clean, bad)
    return _case(updates, clean, u, ~bad)


def c1_few(rng, k, attackers=0):
    updates, clean, u, benign = dense_case(rng, k=k)
    bad = np.zeros(k, bool)
    bad[:attackers] = True
    updates, clean = _gaussian_attack(rng, updates, clean, bad)
    return _case(updates, clean, u, ~bad)


def c1_high_rank(rng, r, k=10, q=4, known_noise=False):
    """A shared rank near Kq/2; with ``known_noise`` the caller passes the true
    per-entry noise std (``noise=``) instead of letting CLAIR estimate it."""
    updates, clean, u, benign = dense_case(rng, k=k, q=q, r=r)
    given = {"noise": NOISE / np.sqrt(P * q)} if known_noise else {}
    return _case(updates, clean, u, benign, clair_kwargs=given)


def c1_copies(rng, frac=0.4):
    """40% of clients send the same copy of one honest update (labelled contaminated)."""
    updates, clean, u, benign = dense_case(rng)
    bad = _attackers(rng, K, frac)
    src = np.flatnonzero(~bad)[0]
    updates = updates.copy()
    updates[bad] = updates[src]
    clean = clean.copy()
    clean[bad] = updates[src]
    return _case(updates, clean, u, ~bad)


def c2_huge_in_subspace(rng, factor=1e4, n=3, off=0.0, lora=False):
    """n clients with ``factor``× the benign norm along one shared direction (+ a common off-subspace part)."""
    updates, clean, u, benign = dense_case(rng)
    bad = np.zeros(K, bool)
    bad[rng.choice(K, n, replace=False)] = True
    off_dir = rng.standard_normal((P, Q))
    off_dir -= u @ (u.T @ off_dir)
    off_dir = _unit(off_dir)
    for j in np.flatnonzero(bad):
        v = _unit(rng.standard_normal(Q))
        updates[j] = factor * np.outer(u[:, 0], v) + off * off_dir + _noise(rng, (P, Q))
        clean[j] = updates[j]
    if lora:
        # Exact factors of the dense updates: B = U_k S_k (p × q'), A = V_kᵀ.
        uu, ss, vt = np.linalg.svd(updates, full_matrices=False)
        return _case(cj.LoRAFactors(B=(uu * ss[:, None, :]).astype(np.float32), A=vt.astype(np.float32)),
                     clean, u, ~bad)
    return _case(updates, clean, u, ~bad)


def c3_scaled(rng, scale, frac=0.3):
    updates, clean, u, benign = dense_case(rng)
    bad = _attackers(rng, K, frac)
    updates, clean = _gaussian_attack(rng, updates, clean, bad)
    # float64 first so the scaled numbers are the float32 nearest the true ones.
    return _case((updates * scale).astype(np.float32), clean * scale, u, ~bad, scale=scale)


def c3_one_huge_entries(rng):
    """One finite client whose entries are ≈ 1e19 (float32 holds them; their squares overflow)."""
    updates, clean, u, benign = dense_case(rng)
    bad = np.zeros(K, bool)
    bad[0] = True
    updates[0] = 1e19 * np.sign(rng.standard_normal((P, Q)))
    clean[0] = updates[0]
    return _case(updates.astype(np.float32), clean, u, ~bad)


def c3_all_nan(rng):
    updates, clean, u, benign = dense_case(rng)
    bad = np.zeros(K, bool)
    bad[:2] = True
    updates = updates.copy()
    updates[0] = np.nan
    updates[1, 0, 0] = np.inf
    return _case(updates, clean, u, ~bad)


def c4_coordinated(rng, frac, attack_rank):
    """Attackers share their own rank-``attack_rank`` subspace W: W Z_kᵀ + noise, benign-sized."""
    updates, clean, u, benign = dense_case(rng)
    bad = _attackers(rng, K, frac)
    w = _basis(rng, P, attack_rank)
    for j in np.flatnonzero(bad):
        z = rng.standard_normal((Q, attack_rank)) / np.sqrt(Q * attack_rank)
        clean[j] = w @ z.T
        updates[j] = clean[j] + _noise(rng, (P, Q))
    return _case(updates, clean, u, ~bad)


def c4_coordinated_lora(rng, k=20, d=64, r=4, d_in=64, shared=3, noise=0.5, frac=0.3):
    """LoRA: B_k = U G_k + noise; attackers B_k = w g_kᵀ along one common direction w ⊥ U at
    a benign B norm (their ΔW = w (g_kᵀ A_k) vary widely in size: the smallest sit below
    an honest client's noise off Û)."""
    u = _basis(rng, d, shared)
    bad = _attackers(rng, k, frac)
    w = rng.standard_normal(d)
    w = _unit(w - u @ (u.T @ w))
    g = rng.standard_normal((k, shared, r))
    b_clean = np.einsum("ps,ksr->kpr", u, g)
    b = b_clean + noise * rng.standard_normal((k, d, r)) / np.sqrt(d)
    for j in np.flatnonzero(bad):
        b[j] = np.outer(w, rng.standard_normal(r)) * np.linalg.norm(b[j]) / np.sqrt(r)
        b_clean[j] = b[j]
    a = rng.standard_normal((k, r, d_in)) / np.sqrt(d_in)
    return _case(cj.LoRAFactors(B=b.astype(np.float32), A=a.astype(np.float32)), b_clean @ a, u, ~bad)


def c4_copy_plus_direction(rng, mult, frac=0.3):
    """Attackers send a copy of an honest update plus one common direction of ``mult``× the noise norm."""
    updates, clean, u, benign = dense_case(rng)
    bad = _attackers(rng, K, frac)
    d = _unit(np.outer(rng.standard_normal(P), rng.standard_normal(Q)))
    honest = np.flatnonzero(~bad)
    for i, j in enumerate(np.flatnonzero(bad)):
        updates[j] = updates[honest[i % len(honest)]] + mult * NOISE * d
        clean[j] = updates[j]
    return _case(updates, clean, u, ~bad)


def c5_student_t(rng, frac=0.0):
    updates, clean, u, benign = dense_case(rng, df=2)
    bad = _attackers(rng, K, frac)
    updates, clean = _gaussian_attack(rng, updates, clean, bad)
    return _case(updates, clean, u, ~bad)


def c5_one_layer(rng, layers=6, frac=0.2):
    """Attackers add an off-subspace Gaussian block of the noise norm in one layer of six."""
    cases = [dense_case(rng) for _ in range(layers)]
    updates = np.stack([c[0] for c in cases])
    clean = np.stack([c[1] for c in cases])
    u = np.stack([c[2] for c in cases])
    bad = _attackers(rng, K, frac)
    hit = int(rng.integers(layers))
    for j in np.flatnonzero(bad):
        g = rng.standard_normal((P, Q))
        g -= u[hit] @ (u[hit].T @ g)
        updates[hit, j] += NOISE * _unit(g)
        clean[hit, j] = updates[hit, j]
    return _case(updates, clean, u, ~bad)


def c8_spread(rng, spread, frac=0.0, proportional=True):
    """Benign norms log-uniform over [1, spread], their noise in proportion (or, with
    ``proportional=False``, of one level); attackers (if any) at the smallest benign norm."""
    u = _basis(rng, P, R)
    clean = _benign(rng, u, K, Q, spread)
    norms = np.linalg.norm(clean, axis=(-2, -1))
    updates = clean + _noise(rng, clean.shape) * (norms[:, None, None] if proportional else 1.0)
    bad = _attackers(rng, K, frac)
    updates, clean = _gaussian_attack(rng, updates, clean, bad, norm=float(norms.min()))
    return _case(updates, clean, u, ~bad)


def c8_noisy_client(rng, factor=5.0):
    """One honest client's estimate is ``factor``× noisier than the others'."""
    updates, clean, u, benign = dense_case(rng)
    updates[0] = clean[0] + _noise(rng, (P, Q), factor * NOISE)
    return _case(updates, clean, u, benign)


def c0_in_subspace(rng, frac=0.3):
    """By design invisible: attackers send U·(−V̄)ᵀ (the honest mean coefficients, sign-flipped,
    at a benign norm) plus noise: inside the shared subspace with benign-sized coefficients."""
    updates, clean, u, benign = dense_case(rng)
    bad = _attackers(rng, K, frac)
    mean = np.mean(clean[~bad], axis=0)
    flip = -mean / np.linalg.norm(mean) * np.median(np.linalg.norm(clean[~bad], axis=(-2, -1)))
    for j in np.flatnonzero(bad):
        clean[j] = flip
        updates[j] = flip + _noise(rng, (P, Q))
    return _case(updates, clean, u, ~bad)


#: name → (class, builder, cheap). Cheap cases make up ``--quick``.
CASES = {
    "lora noiseless K=8, 1 poisoned 50x": (1, lambda g: c1_lora_noiseless(g), True),
    "lora noiseless K=8, all honest": (1, lambda g: c1_lora_noiseless(g, poisoned=False), False),
    "dense noiseless rank 3, 30% gaussian": (1, c1_dense_noiseless, False),
    "K=3 all honest": (1, lambda g: c1_few(g, 3), False),
    "K=4, 1 attacker": (1, lambda g: c1_few(g, 4, 1), False),
    "K=2 all honest": (1, lambda g: c1_few(g, 2), False),
    "rank 8, K=10, q=4": (1, lambda g: c1_high_rank(g, 8), False),
    "rank 14, K=10, q=4": (1, lambda g: c1_high_rank(g, 14), False),
    "rank 20 = Kq/2, K=10, q=4": (1, lambda g: c1_high_rank(g, 20), False),
    "rank 20 = Kq/2, noise level given": (1, lambda g: c1_high_rank(g, 20, known_noise=True), False),
    "40% copies of one honest update": (1, c1_copies, False),
    "3 clients 1e4x along a shared direction": (2, lambda g: c2_huge_in_subspace(g), True),
    "same, LoRA input": (2, lambda g: c2_huge_in_subspace(g, lora=True), False),
    "3 clients 1e3x shared + common off-subspace 20": (2, lambda g: c2_huge_in_subspace(g, 1e3, off=20.0), False),
    "one client with entries 1e19": (3, c3_one_huge_entries, True),
    "federation x1e19, 30% gaussian": (3, lambda g: c3_scaled(g, 1e19), False),
    "federation x1e-20, 30% gaussian": (3, lambda g: c3_scaled(g, 1e-20), False),
    "federation x1e30, 30% gaussian": (3, lambda g: c3_scaled(g, 1e30), False),
    "one all-NaN client, one with an Inf": (3, c3_all_nan, False),
    "coordinated rank-1, 20%": (4, lambda g: c4_coordinated(g, 0.2, 1), True),
    "coordinated rank-1, 35%": (4, lambda g: c4_coordinated(g, 0.35, 1), False),
    "coordinated rank-1, 45%": (4, lambda g: c4_coordinated(g, 0.45, 1), False),
    "coordinated rank-2, 35%": (4, lambda g: c4_coordinated(g, 0.35, 2), False),
    "coordinated rank-2, 45%": (4, lambda g: c4_coordinated(g, 0.45, 2), False),
    "LoRA, 30% small attackers along one direction": (4, c4_coordinated_lora, False),
    "copy + common direction 2x noise": (4, lambda g: c4_copy_plus_direction(g, 2.0), False),
    "copy + common direction 3x noise": (4, lambda g: c4_copy_plus_direction(g, 3.0), False),
    "copy + common direction 10x noise": (4, lambda g: c4_copy_plus_direction(g, 10.0), False),
    "student-t df=2 noise, no attacker": (5, c5_student_t, True),
    "student-t df=2 noise, 30% gaussian": (5, lambda g: c5_student_t(g, 0.3), False),
    "6 layers, 20% attack 1 layer at noise norm": (5, c5_one_layer, False),
    "benign norm spread 1-3x": (8, lambda g: c8_spread(g, 3.0), True),
    "benign norm spread 1-100x": (8, lambda g: c8_spread(g, 100.0), False),
    "norm spread 1-100x, 20% small gaussian": (8, lambda g: c8_spread(g, 100.0, 0.2), False),
    "benign norm spread 1-100x, noise of one level": (8, lambda g: c8_spread(g, 100.0, proportional=False), False),
    "one honest client 5x noisier": (8, c8_noisy_client, False),
    "in-subspace sign-flipped mean, benign norm, 30% (by design)": (0, c0_in_subspace, False),
}


# ------------------------------------------------------------------ running


def _finite(x):
    return bool(np.all(np.isfinite(np.asarray(x, np.float64))))


def _rel(est, clean, benign):
    """Per benign client ‖est − clean‖/‖clean‖ over all layers (clients on axis -3)."""
    diff = np.moveaxis(np.asarray(est, np.float64) - clean, -3, 0)[benign]
    ref = np.moveaxis(np.asarray(clean, np.float64), -3, 0)[benign]
    flat = lambda x: x.reshape(x.shape[0], -1)  # noqa: E731
    num = np.linalg.norm(flat(diff), axis=1)
    den = np.linalg.norm(flat(ref), axis=1)
    return num / np.maximum(den, np.finfo(np.float64).tiny)


def _ratio(a, b):
    if b < 1e-6:  # the reference is exact (noiseless): report whether we are too
        return 1.0 if a < 1e-4 else float("inf")
    return a / b


def run_case(name, seed):
    cls, build, _ = CASES[name]
    rng = np.random.default_rng(seed)
    case = build(rng)
    updates = case["updates"]
    if not isinstance(updates, cj.LoRAFactors):
        updates = np.asarray(updates, np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        res = cj.clair(updates, **case.get("clair_kwargs", {}))
        seconds = time.perf_counter() - t0
    benign = np.asarray(case["benign"], bool)
    dense = np.asarray(updates.B @ updates.A if isinstance(updates, cj.LoRAFactors) else updates, np.float64)
    refined = res.refined
    refined = np.asarray(refined.B @ refined.A if isinstance(refined, cj.LoRAFactors) else refined, np.float64)
    clean = np.asarray(case["clean"], np.float64)
    subspace = np.asarray(case["subspace"], np.float64)
    det = cj.metrics.detection_rates(np.asarray(res.client_benign), benign)
    noisy = np.asarray(res.noisy).reshape(-1, len(benign)).any(axis=0)   # in any problem
    # The oracle: the true subspace and the true set, in float64 on the same input.
    oracle = np.asarray(cj.baselines.oracle(dense, subspace, benign))
    usable = benign & np.all(np.isfinite(np.moveaxis(dense, -3, 0).reshape(len(benign), -1)), axis=1)
    err = float(np.mean(_rel(refined, clean, usable)))
    local = float(np.mean(_rel(dense, clean, usable)))
    orc = float(np.mean(_rel(oracle, clean, usable)))
    ranks = np.asarray(res.rank).ravel()
    reported = dict(client_z=res.client_z, scores=res.scores, residual_z=res.residual_z, refined=refined,
                    subspace=res.subspace, noise_level=res.noise_level, objective=res.decomposition.objective)
    return dict(
        case=name, cls=cls, seed=seed,
        tpr=float(det["tpr"]), fpr=float(det["fpr"]),
        # The public verdict: honest clients whose status is "contaminated" (a flagged
        # but noise-like honest client is "noisy": refined, not accused).
        accused=float(np.mean(res.contaminated()[benign])) if benign.any() else 0.0,
        # Flagged clients refined by projection as noise-like honest ones (ClairResult.noisy).
        noisy_honest=float(np.mean(noisy[benign])),
        noisy_attackers=float(np.mean(noisy[~benign])) if (~benign).any() else 0.0,
        err=err, err_local=local, err_oracle=orc,
        vs_local=_ratio(err, local), vs_oracle=_ratio(err, orc),
        rank_min=int(ranks.min()), rank_max=int(ranks.max()), true_rank=int(case["rank"]),
        nonfinite=",".join(k for k, x in reported.items() if not _finite(x)),
        local_share=float(np.mean(np.asarray(getattr(res, "local_share", 0.0)))),
        converged=bool(np.all(np.asarray(res.converged))),
        warnings=sorted({str(w.message)[:80] for w in caught}),
        seconds=seconds,
    )


def run_copy_task(seed, quick):
    """Class 6: the copy task's pooled verdict (trains a small model: minutes)."""
    from clair_jax.experiments import copy_task as ct

    out = ct.run_copy_task(seed=seed, quick=quick, progress=False)
    labels = np.array(out["labels"])
    flagged = ~np.asarray(out["client_benign"], bool)
    bad = labels != "benign"
    m = out["methods"]
    loss = lambda name: m[name]["loss"]  # noqa: E731
    # What separates the foreign client from the honest client that looks most
    # contaminated: the two statistics the pooled verdict thresholds (mean and
    # largest module z). Where the honest one is above on both, no threshold on
    # them flags the foreign client alone.
    module_z = np.array(list(out["module_z"].values()))          # (modules, K)
    pooled_z, max_z = np.asarray(out["client_z"]), module_z.max(axis=0)
    foreign = int(np.flatnonzero(labels == "foreign")[0])
    honest = np.flatnonzero(~bad)
    top = int(honest[np.argmax(pooled_z[honest] + max_z[honest] / len(module_z))])
    return dict(
        case=f"copy task ({'quick' if quick else 'full'}), foreign flagged {bool(flagged[labels == 'foreign'].all())}",
        cls=6, seed=seed, tpr=float(np.mean(flagged[bad])), fpr=float(np.mean(flagged[~bad])),
        accused=float("nan"), noisy_honest=float("nan"), noisy_attackers=float("nan"),
        err=float("nan"), err_local=float("nan"), err_oracle=float("nan"),
        vs_local=loss("clair") / loss("local"), vs_oracle=loss("clair") / loss("oracle"),
        rank_min=int(min(out["rank"].values())), rank_max=int(max(out["rank"].values())), true_rank=-1,
        nonfinite="", converged=bool(out["converged"]), warnings=[], seconds=sum(out["timings"].values()),
        f1=out["detection"]["pooled"]["f1"],
        foreign_z=float(pooled_z[foreign]), foreign_max_z=float(max_z[foreign]),
        foreign_flagged=bool(flagged[foreign]),
        top_honest_z=float(pooled_z[top]), top_honest_max_z=float(max_z[top]),
        top_honest_flagged=bool(flagged[top]),
        false_alarms=int(np.sum(flagged[~bad])),
    )


def summarise(rows):
    """One row per case: TPR/FPR/ratios averaged over seeds, worst flags."""
    out = []
    for name in dict.fromkeys(r["case"] for r in rows):
        group = [r for r in rows if r["case"] == name]
        mean = lambda key: float(np.mean([r[key] for r in group]))  # noqa: E731
        worst = lambda key: float(np.max([r[key] for r in group]))  # noqa: E731
        out.append(dict(
            case=name, cls=group[0]["cls"], seeds=len(group), tpr=mean("tpr"), fpr=mean("fpr"), accused=mean("accused"),
            noisy=f"{mean('noisy_honest'):.2f} / {mean('noisy_attackers'):.2f}",
            err=mean("err"), vs_local=mean("vs_local"), worst_vs_local=worst("vs_local"), vs_oracle=mean("vs_oracle"),
            rank=f"{min(r['rank_min'] for r in group)}-{max(r['rank_max'] for r in group)} / {group[0]['true_rank']}",
            nonfinite=",".join(sorted({f for r in group for f in r["nonfinite"].split(",") if f})) or "-",
            converged=all(r["converged"] for r in group),
        ))
    return out


COLUMNS = [("cls", "class", "d"), ("case", "case", ""), ("tpr", "TPR", ".2f"), ("fpr", "FPR", ".2f"),
           ("accused", "honest reported contaminated", ".2f"), ("noisy", "noisy: honest / attackers", ""),
           ("err", "benign err", ".3f"), ("vs_local", "/ local", ".2f"), ("worst_vs_local", "worst / local", ".2f"),
           ("vs_oracle", "/ oracle", ".2f"), ("rank", "r̂ / r", ""), ("nonfinite", "non-finite fields", ""),
           ("converged", "converged", "")]


COPY_COLUMNS = [("run", "run", ""), ("f1", "pooled F1", ".3f"), ("false_alarms", "false alarms", "d"),
                ("foreign", "foreign client", ""), ("honest", "most contaminated-looking honest client", ""),
                ("above", "honest above on both", "")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, the cheapest cases (smoke test)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per case (full mode)")
    parser.add_argument("--copy-task", action="store_true", help="also run class 6 (copy task; trains models)")
    parser.add_argument("--only", default=None, help="run only cases whose name contains this")
    parser.add_argument("--json", default="bench_results/adversarial.json")
    args = parser.parse_args(argv)

    seeds = [0] if args.quick else list(range(args.seeds))
    names = [n for n, (_, _, cheap) in CASES.items() if cheap or not args.quick]
    if args.only:
        names = [n for n in names if args.only in n]
    rows, t0 = [], time.perf_counter()
    for name in names:
        for seed in seeds:
            rows.append(run_case(name, seed))
            r = rows[-1]
            print(f"[{r['cls']}] {name} seed={seed}: tpr={r['tpr']:.2f} fpr={r['fpr']:.2f} err={r['err']:.3f} "
                  f"/local={r['vs_local']:.2f} /oracle={r['vs_oracle']:.2f} r̂={r['rank_min']}-{r['rank_max']}/"
                  f"{r['true_rank']} nonfinite={r['nonfinite']} conv={r['converged']} ({r['seconds']:.1f} s)",
                  flush=True)
    if args.copy_task:
        copies = []
        for seed in ([0] if args.quick else range(5)):
            copies.append(run_copy_task(seed, quick=args.quick))
            print(copies[-1], flush=True)
        rows += copies
        print("\nClass 6: the foreign client against the honest client that looks most contaminated "
              "(pooled z, largest module z)\n")
        print(markdown_table([dict(r, run=f"{'quick' if args.quick else 'full'} seed {r['seed']}",
                                   foreign=f"{r['foreign_z']:.1f}, {r['foreign_max_z']:.1f}"
                                           f"{' (flagged)' if r['foreign_flagged'] else ''}",
                                   honest=f"{r['top_honest_z']:.1f}, {r['top_honest_max_z']:.1f}"
                                          f"{' (flagged)' if r['top_honest_flagged'] else ''}",
                                   above=r["top_honest_z"] >= r["foreign_z"] and r["top_honest_max_z"] >= r["foreign_max_z"])
                              for r in copies], COPY_COLUMNS))
    seconds = time.perf_counter() - t0
    summary = summarise(rows)
    print()
    print(markdown_table(summary, COLUMNS))
    print(f"\n{len(rows)} runs in {seconds:.0f} s (load average {os.getloadavg()[0]:.2f})")
    write_json(args.json, dict(benchmark="adversarial", machine=machine_info(), args=vars(args),
                               seconds=seconds, rows=rows, summary=summary))
    return summary


if __name__ == "__main__":
    main()
