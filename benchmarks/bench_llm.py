"""LLM-shaped aggregation: LoRA factors of a 7B decoder through the exact factored reduction.

Workload (issue 5): 32 layers × {q, k, v, o} = 128 modules of 4096 × 4096, LoRA
rank r = 16, K = 32 clients, 20 % contaminated, synthetic factors. Benign clients
share the column space: B_k = U W_k, A_k arbitrary; contaminated clients send
random B_k. No dense ΔW is ever formed:

1. per module, Q = orth[B_1 … B_K] (p × Kr) and R_k = orth(A_kᵀ) (q × r);
2. the reduced problem has blocks (QᵀB_k)(A_k R_k) ∈ R^{Kr × r}: a 512 × 512 stacked
   matrix instead of 4096 × 131072, with the same nuclear / Frobenius / block norms;
3. exact program on the reduced blocks (jitted, vmapped over a chunk of modules),
   with the partial SVT where :func:`clair_jax.linalg.use_partial_svt` picks it;
4. verdicts from block scores ‖Ĉ_k‖_F/‖Θ̂_k‖_F; refined factors (Û ÛᵀB_k, A_k).

The engine is ``cj.clair(cj.LoRAFactors(B, A), ...)`` when the package exports it
(``--engine clair``); ``--engine reference`` runs the reduction written here (the
same maths, used until the factored path lands and as a cross-check).

The dense path (``cj.decompose`` on the formed ΔW_k blocks) is timed on one module
at growing d while it fits, and the ratio to the factored path at the same d is reported.

Usage::

    python benchmarks/bench_llm.py [--quick] [--json PATH] [--modules 128] [--chunk 8] [--noise 0.05]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._common import machine_info, markdown_table, write_json



def lam_for(k, r):
    """Geometric middle of the window: above √(r/K) (benign blocks stay in L), below
    ≈ 0.9√r, the nuclear/Frobenius ratio of a rank-r attack block (it stays in C)."""
    return float(np.sqrt(np.sqrt(r / k) * 0.9 * np.sqrt(r)))


def peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB → GiB


def make_factors(seed, modules, k, d, r, contaminated=0.2, noise=0.0):
    """(B (modules, K, d, r), A (modules, K, r, d), benign (K,)) in float32, no dense ΔW.

    ``noise``: each benign B_k gets its own error G_k (entries N(0, r/d), so that
    ‖G_k‖_F ≈ ‖U W_k‖_F) times ``noise``: a relative estimation error that lives
    in the client's own r directions, as a trained LoRA update's does.
    """
    rng = np.random.default_rng(seed)
    n_bad = int(round(contaminated * k))
    b = np.empty((modules, k, d, r), np.float32)
    a = np.empty((modules, k, r, d), np.float32)
    for m in range(modules):
        u, _ = np.linalg.qr(rng.standard_normal((d, r), dtype=np.float32))
        w = rng.standard_normal((k, r, r), dtype=np.float32)
        b[m] = np.einsum("dr,kre->kde", u, w)
        if noise:
            b[m] += noise * np.sqrt(r / d) * rng.standard_normal((k, d, r), dtype=np.float32)
        b[m, :n_bad] = rng.standard_normal((n_bad, d, r), dtype=np.float32) * np.sqrt(r / d)
        a[m] = rng.standard_normal((k, r, d), dtype=np.float32) / np.sqrt(d)
    return b, a, np.arange(k) >= n_bad


def _reference_fn(k, r, svt_budget):
    from benchmarks._fast_solvers import fast_solvers
    from clair_jax.stack import to_stacked

    solve_exact, _ = fast_solvers()

    def one(b, a):
        # b: (K, d, r), a: (K, r, d)
        q, _ = jnp.linalg.qr(jnp.transpose(b, (1, 0, 2)).reshape(b.shape[1], k * r))  # (d, Kr)
        rk, _ = jnp.linalg.qr(jnp.swapaxes(a, -1, -2))                                  # (K, d, r)
        reduced = jnp.einsum("dn,kdr,krs,kse->kne", q, b, a, rk)                        # (K, Kr, r)
        scale = jnp.linalg.norm(to_stacked(reduced), ord=2)
        out = solve_exact(reduced / scale, lam_for(k, r), tol=3e-6, max_iter=1000, svt_budget=svt_budget)
        norms = jnp.linalg.norm(reduced, axis=(-2, -1))
        scores = jnp.linalg.norm(out.sparse, axis=(-2, -1)) * scale / norms
        benign = scores <= 1e-3
        # Subspace from the benign reduced blocks (rank r), mapped back through Q.
        weights = benign.astype(reduced.dtype)[:, None, None]
        u_red = jnp.linalg.svd(to_stacked(reduced * weights), full_matrices=False)[0][:, :r]
        u_hat = q @ u_red                                                              # (d, r)
        refined_b = jnp.where(benign[:, None, None], u_hat @ (u_hat.T @ b), b)
        return benign, scores, refined_b, out.iterations, out.converged

    return jax.vmap(one)


def run_factored(b, a, chunk, engine):
    modules, k, d, r = b.shape
    from clair_jax import linalg

    reduced_shape = (min(d, k * r), k * r)
    auto_budget = linalg.choose_svt_budget(reduced_shape, "auto", r)
    use_partial = auto_budget is not None
    budget = auto_budget or linalg.rank_budget(reduced_shape, r)
    if engine == "clair":
        import clair_jax as cj

        def call(bc, ac):
            res = cj.clair(cj.LoRAFactors(B=bc, A=ac))
            return jax.block_until_ready((res.benign, res.scores, res.refined.B))
    else:
        fn = jax.jit(_reference_fn(k, r, budget if use_partial else None))

        def call(bc, ac):
            return jax.block_until_ready(fn(bc, ac)[:3])

    # warm-up compile on the first chunk (not timed: a model has one compile per shape)
    t0 = time.perf_counter()
    call(jnp.asarray(b[:chunk]), jnp.asarray(a[:chunk]))
    compile_s = time.perf_counter() - t0
    verdicts, t_total = [], 0.0
    t0 = time.perf_counter()
    for start in range(0, modules, chunk):
        out = call(jnp.asarray(b[start:start + chunk]), jnp.asarray(a[start:start + chunk]))
        verdicts.append(np.asarray(out[0]))
    t_total = time.perf_counter() - t0
    return dict(seconds=t_total, compile_s=compile_s, verdicts=np.concatenate(verdicts),
                partial_svt=use_partial, budget=budget)


def dense_cost(d, k, r, seed=1):
    """Dense path (form ΔW_k, decompose the (K, d, d) blocks) on one module; seconds."""
    from benchmarks._fast_solvers import fast_solvers
    from clair_jax.stack import to_stacked

    solve_exact, _ = fast_solvers()
    b, a, _ = make_factors(seed, 1, k, d, r)

    @jax.jit
    def dense(b, a):
        blocks = jnp.einsum("kdr,kre->kde", b, a)
        scale = jnp.linalg.norm(to_stacked(blocks), ord=2)
        out = solve_exact(blocks / scale, lam_for(k, r), tol=3e-6, max_iter=1000)
        return out.iterations

    bj, aj = jnp.asarray(b[0]), jnp.asarray(a[0])
    jax.block_until_ready(dense(bj, aj))
    t0 = time.perf_counter()
    it = jax.block_until_ready(dense(bj, aj))
    return time.perf_counter() - t0, int(it)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default="bench_results/bench_llm.json")
    parser.add_argument("--modules", type=int, default=128)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--noise", type=float, default=0.0,
                        help="relative error of each benign B_k in its own directions (0: noiseless factors)")
    parser.add_argument("--engine", choices=["auto", "clair", "reference"], default="auto")
    parser.add_argument("--dense-sizes", type=int, nargs="*", default=[128, 256, 512])
    parser.add_argument("--clair-modules", type=int, default=None,
                        help="with --engine clair, time only this many modules and extrapolate")
    args = parser.parse_args(argv)
    if args.quick:
        args.modules, args.d, args.clients, args.rank, args.chunk = 2, 64, 16, 4, 2
        args.dense_sizes = [32]
    engine = args.engine
    if engine == "auto":
        import clair_jax as cj

        engine = "clair" if hasattr(cj, "clair") and hasattr(cj, "LoRAFactors") else "reference"
    info = machine_info()
    print(f"bench_llm on {info['cpu_count']} CPU(s), backend {info['jax_backend']}, "
          f"load {info['loadavg_at_start']}, engine {engine}")

    t0 = time.perf_counter()
    b, a, benign = make_factors(0, args.modules, args.clients, args.d, args.rank, noise=args.noise)
    gen_s = time.perf_counter() - t0
    input_gib = (b.nbytes + a.nbytes) / 2**30
    timed = args.modules
    if engine == "clair" and args.clair_modules:
        timed = min(args.clair_modules, args.modules)
    res = run_factored(b[:timed], a[:timed], min(args.chunk, timed), engine)
    seconds = res["seconds"] * args.modules / timed
    correct = bool(np.all(res["verdicts"] == benign[None, :]))
    model = dict(modules=args.modules, timed_modules=timed, d=args.d, K=args.clients, r=args.rank, noise=args.noise,
                 engine=engine + ("" if timed == args.modules else f" ({timed} modules timed, extrapolated)"),
                 seconds=seconds, compile_s=res["compile_s"], generate_s=gen_s,
                 input_gib=input_gib, peak_rss_gib=peak_rss_gib(), verdicts_correct=correct,
                 partial_svt=res["partial_svt"], svt_budget=res["budget"],
                 per_module_ms=seconds / args.modules * 1e3)
    print(f"  whole model: {seconds:.1f} s ({model['per_module_ms']:.0f} ms/module), "
          f"peak RSS {model['peak_rss_gib']:.2f} GiB, verdicts correct: {correct}", flush=True)

    dense_rows = []
    for d in args.dense_sizes:
        try:
            t_dense, it = dense_cost(d, args.clients, args.rank)
        except Exception as err:  # out of memory / too slow is a result, not a crash
            dense_rows.append(dict(d=d, dense_s=None, note=f"failed: {type(err).__name__}"))
            break
        bd, ad, _ = make_factors(1, 1, args.clients, d, args.rank)
        fact = run_factored(bd, ad, 1, engine)
        dense_rows.append(dict(d=d, stacked=f"{d}x{args.clients * d}", dense_s=t_dense,
                               dense_iters=it, factored_s=fact["seconds"],
                               ratio=t_dense / fact["seconds"]))
        print(f"  dense d={d}: {t_dense:.2f} s vs factored {fact['seconds']*1e3:.1f} ms", flush=True)

    print()
    print(markdown_table([model], [
        ("modules", "modules", "d"), ("d", "d×d", "d"), ("K", "K", "d"), ("r", "r", "d"), ("noise", "noise", ".2f"),
        ("engine", "engine", ""), ("seconds", "time (s)", ".1f"), ("per_module_ms", "ms/module", ".0f"),
        ("compile_s", "compile (s)", ".1f"), ("input_gib", "input (GiB)", ".2f"),
        ("peak_rss_gib", "peak RSS (GiB)", ".2f"), ("verdicts_correct", "verdicts correct", "")]))
    print()
    print(markdown_table(dense_rows, [
        ("d", "d", "d"), ("stacked", "dense stacked", ""), ("dense_s", "dense (s)", ".2f"),
        ("factored_s", "factored (s)", ".3f"), ("ratio", "dense / factored", ".0f")]))
    write_json(args.json, dict(benchmark="bench_llm", machine=info, args=vars(args),
                               model=model, dense=dense_rows))
    return model, dense_rows


if __name__ == "__main__":
    main()
