"""Partial SVT (clair_jax.linalg) against the full-SVD SVT, alone and inside the solvers."""

import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clair_jax import linalg  # noqa: E402
from clair_jax.prox import svt_with_spectrum  # noqa: E402

# Jitted once per shape: an eager call dispatches each of their operations on its own.
partial_svt = jax.jit(linalg.partial_svt_with_spectrum,
                      static_argnames=("power_iters", "rtol", "guard", "atol", "refine"))
svt_reference = jax.jit(svt_with_spectrum)


def _low_rank_plus_noise(m, n, r, noise, seed=0, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(k1, (m, r), dtype) @ jax.random.normal(k2, (r, n), dtype)
    return x + noise * jax.random.normal(k3, (m, n), dtype)


def test_partial_svt_matches_full_after_warm_start():
    x = _low_rank_plus_noise(96, 128, 5, 0.01)
    tau = 0.5
    state = linalg.init_subspace(x.shape, linalg.rank_budget(x.shape, 5))
    step = jax.jit(linalg.partial_svt_with_spectrum)
    for _ in range(4):
        (low, spec), state = step(x, tau, state)
    low_ref, spec_ref = svt_reference(x, tau)
    assert spec.shape == spec_ref.shape
    np.testing.assert_allclose(spec, spec_ref, atol=1e-4 * float(spec_ref[0]))
    assert float(jnp.linalg.norm(low - low_ref) / jnp.linalg.norm(low_ref)) < 1e-5
    assert int(jnp.sum(spec > 0)) == 5


def test_budget_too_small_falls_back_to_exact():
    # rank 20 above the threshold but a budget of 8: must not return a truncated answer.
    x = _low_rank_plus_noise(64, 80, 20, 0.0, seed=1)
    state = linalg.init_subspace(x.shape, 8)
    (low, spec), state = partial_svt(x, 1e-3, state)
    low_ref, spec_ref = svt_reference(x, 1e-3)
    assert int(state.fallbacks) == 1
    np.testing.assert_allclose(low, low_ref, atol=1e-4 * float(jnp.max(jnp.abs(low_ref))))


def test_zero_matrix_gives_exact_zero():
    x = jnp.zeros((32, 48))
    state = linalg.init_subspace(x.shape, 8)
    (low, spec), state = partial_svt(x, 0.1, state)
    assert float(jnp.max(jnp.abs(low))) == 0.0 and float(jnp.max(spec)) == 0.0
    assert bool(jnp.all(jnp.isfinite(state.basis)))


def test_vmapped_fallback_matches_loop():
    """Under vmap each problem keeps its own answer: one problem needing the full SVD
    (rank 20 > budget) does not change the others, and all match the exact SVT."""
    xs = jnp.stack([_low_rank_plus_noise(64, 64, r, 0.01, seed=s) for s, r in enumerate((3, 20, 2))])
    states = jax.vmap(lambda _: linalg.init_subspace((64, 64), 16))(jnp.arange(3))
    f = jax.jit(jax.vmap(lambda x, s: linalg.partial_svt_with_spectrum(x, 0.5, s)))
    for _ in range(3):
        (low, _), states = f(xs, states)
    for i in range(3):
        np.testing.assert_allclose(low[i], svt_reference(xs[i], 0.5)[0], atol=1e-4)
    fallbacks = np.asarray(states.fallbacks)
    assert fallbacks[1] == 3 and fallbacks[0] < 3 and fallbacks[2] < 3


def test_refinement_certifies_where_one_step_cannot():
    """A random start is far from the answer: one Rayleigh–Ritz step cannot certify,
    a few more steps (refine) can, and give the exact SVT without the full SVD."""
    x = _low_rank_plus_noise(64, 512, 4, 1e-3, seed=3)
    tau = 0.1 * float(jnp.linalg.norm(x, ord=2))
    start = linalg.init_subspace(x.shape, 16)
    (_, _), once = partial_svt(x, tau, start, refine=0)
    (low, spec), refined = partial_svt(x, tau, start, refine=4)
    assert int(once.fallbacks) == 1 and int(refined.fallbacks) == 0
    low_ref, spec_ref = svt_reference(x, tau)
    np.testing.assert_allclose(spec, spec_ref, atol=1e-4 * float(spec_ref[0]))
    assert float(jnp.linalg.norm(low - low_ref) / jnp.linalg.norm(low_ref)) < 1e-4


@pytest.mark.parametrize("shape", [(16, 160), (200, 24), (9, 9)])
def test_whole_spectrum_from_gram_is_certified(shape):
    """Budget = short side: the Gram eigendecomposition. Where τ is large enough
    against rounding (the certificate passes) it matches the float64 SVT to the
    certificate's tolerance; where τ is tiny it must fall back to the full SVD."""
    m, n = shape
    x = np.asarray(_low_rank_plus_noise(m, n, 3, 1e-2, seed=4), np.float64)
    x /= np.linalg.norm(x, 2)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    step = jax.jit(linalg.partial_svt_with_spectrum)
    for tau, certifies in ((0.05, True), (1e-4, False)):
        state = linalg.init_subspace(shape, min(shape))
        assert state.basis.shape == (n, 0)
        (low, spec), state = step(jnp.asarray(x, jnp.float32), tau, state)
        assert int(state.fallbacks) == (0 if certifies else 1)
        want = (u * np.maximum(s - tau, 0)) @ vt
        assert np.linalg.norm(np.asarray(low, np.float64) - want, 2) < 3e-5  # rtol·σ₁, σ₁ = 1
        np.testing.assert_allclose(spec, np.maximum(s - tau, 0), atol=3e-5)


def test_whole_spectrum_zero_and_vmapped():
    xs = jnp.stack([jnp.zeros((16, 40)), _low_rank_plus_noise(16, 40, 2, 0.0, seed=5)])
    states = jax.vmap(lambda _: linalg.init_subspace((16, 40), 16))(jnp.arange(2))
    (low, spec), states = jax.jit(jax.vmap(lambda x, s: linalg.partial_svt_with_spectrum(x, 0.5, s)))(xs, states)
    assert float(jnp.max(jnp.abs(low[0]))) == 0.0 and float(jnp.max(spec[0])) == 0.0
    np.testing.assert_allclose(low[1], svt_reference(xs[1], 0.5)[0], atol=1e-4)
    # A zero Gram matrix cannot tell a zero X from an underflowed one: that one takes the full SVD.
    assert np.asarray(states.fallbacks).tolist() == [1, 0]


@pytest.mark.parametrize("scale", [1e-25, 1e25])
def test_whole_spectrum_out_of_gram_range_falls_back(scale):
    """Entries whose squares underflow or overflow float32 must not give a silently
    wrong answer: the certificate fails and the full SVD answers."""
    x = _low_rank_plus_noise(16, 40, 2, 0.01, seed=6)
    state = linalg.init_subspace(x.shape, 16)
    (low, spec), state = partial_svt(x * scale, 0.5 * scale, state)
    assert int(state.fallbacks) == 1
    want, want_spec = svt_reference(x, 0.5)
    np.testing.assert_allclose(np.asarray(low) / scale, want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(spec) / scale, want_spec, atol=1e-5)


@pytest.mark.parametrize("shape", [(16, 160), (300, 20), (7, 7)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_spectral_norm_matches_svd(shape, dtype):
    x = np.random.default_rng(0).standard_normal(shape) * 1e15  # squaring unscaled would overflow float32
    got = float(linalg.spectral_norm(jnp.asarray(x, dtype)))
    want = np.linalg.norm(np.asarray(x, dtype).astype(np.float64), 2)
    assert abs(got / want - 1) < (1e-6 if dtype == np.float32 else 1e-12)
    assert float(linalg.spectral_norm(jnp.zeros(shape, dtype))) == 0.0


def test_rule():
    assert not linalg.use_partial_svt((16, 32), 16)
    assert linalg.use_partial_svt((512, 512), linalg.rank_budget((512, 512), 16))
    assert linalg.choose_svt_budget((512, 512), "full") is None
    # A budget that covers the short side is the whole spectrum, from the Gram matrix.
    assert linalg.choose_svt_budget((16, 160), "partial") == 16
    assert linalg.choose_svt_budget((16, 160), "auto") == 16
    assert linalg.choose_svt_budget((64, 640), "auto") == linalg.rank_budget((64, 640))
    assert [linalg.svt_method((16, 160), b) for b in (None, 16, 8)] == ["full", "gram", "partial"]
    assert linalg.choose_svt_budget((512, 512), "auto") == linalg.rank_budget((512, 512))
    with pytest.raises(ValueError, match="svt must be one of"):
        linalg.choose_svt_budget((512, 512), "fast")


def test_scheduler_flag_set_on_import():
    # clair_jax (imported by conftest's jax config before any computation) asks XLA
    # for the scheduler that does not wedge on control flow in the solver loop.
    assert linalg.partial_svt_supported()


@pytest.mark.parametrize("program", ["exact", "penalized"])
def test_fast_svt_solver_same_verdicts_and_refined(program):
    """Fast-SVT solver path (svt_budget) = dense full-SVD path, to tolerance."""
    from benchmarks._common import make_blocks
    from benchmarks._fast_solvers import fast_solvers
    from clair_jax.stack import to_stacked

    solve_exact, solve_penalized = fast_solvers()
    blocks, benign = make_blocks(3, 24, 64, 8, rank=3, contaminated=0.25,
                                 noise=0.0 if program == "exact" else 0.05)
    m = jnp.asarray(blocks)
    m = m / jnp.linalg.norm(to_stacked(m), ord=2)
    outs = []
    for budget in (None, 16, 64):  # full SVD, rank-16 partial, whole spectrum from the Gram matrix
        if program == "exact":
            out = solve_exact(m, 0.7, tol=3e-6, max_iter=1000, svt_budget=budget)
        else:
            out = solve_penalized(m, 1.2, 0.02, tol=3e-6, max_iter=1000, svt_budget=budget)
        outs.append(out)
    full = outs[0]
    assert all(bool(o.converged) for o in outs)
    for fast in outs[1:]:
        rel = abs(float(fast.objective - full.objective)) / abs(float(full.objective))
        assert rel < 1e-4
    assert int(outs[2].svt_fallbacks) < int(outs[2].iterations)  # the Gram path did answer
    scores = [np.linalg.norm(np.asarray(o.sparse), axis=(1, 2)) / np.linalg.norm(blocks, axis=(1, 2))
              for o in outs]
    verdicts = [s <= 1e-3 * (1 if program == "exact" else 1e2) for s in scores]
    # Refined updates: project the benign blocks on the top-r left singular space of L.
    refined = []
    for o, v in zip(outs, verdicts):
        u = np.linalg.svd(np.asarray(to_stacked(o.low_rank)), full_matrices=False)[0][:, :3]
        refined.append(np.einsum("pr,sr,ksq->kpq", u, u, np.asarray(m)[v]))
    for v, r in zip(verdicts[1:], refined[1:]):
        np.testing.assert_array_equal(v, verdicts[0])
        np.testing.assert_allclose(r, refined[0], atol=1e-4)


def test_decompose_svt_modes_agree():
    """cj.decompose over stacked layers: svt="partial" equals svt="full" to tolerance."""
    import clair_jax as cj
    from benchmarks._common import make_blocks

    blocks, benign = make_blocks(1, 16, 64, 8, rank=3, contaminated=0.25, noise=0.0, layers=3)
    full = cj.decompose(jnp.asarray(blocks), lam=0.7, svt="full")
    fast = cj.decompose(jnp.asarray(blocks), lam=0.7, svt="partial")
    assert bool(jnp.all(full.converged)) and bool(jnp.all(fast.converged))
    np.testing.assert_allclose(fast.objective, full.objective, rtol=1e-6)
    # float32 input, solver tolerance 3e-6: agreement to 1e-5 of the largest entry.
    np.testing.assert_allclose(fast.low_rank, full.low_rank, atol=1e-5 * float(jnp.max(jnp.abs(full.low_rank))))
    flag = lambda d: np.asarray(d.block_norms) > 1e-6 * np.linalg.norm(blocks, axis=(-2, -1))  # noqa: E731
    np.testing.assert_array_equal(flag(fast), flag(full))
    assert (flag(full) == ~benign).all()


@pytest.mark.slow
def test_clair_fast_svt_and_factored_paths_equal_dense_full():
    """cj.clair: partial SVT (dense), partial SVT (LoRA factors) and the plain dense
    full-SVD path give the same verdicts and refined updates (slow tier: three whole
    calls, 13.5 s; the fast tier keeps the solver-level partial-vs-full checks above)."""
    import clair_jax as cj
    from clair_jax.lora import dense

    rng = np.random.default_rng(0)
    k, p, q, r, bad = 16, 64, 16, 4, 3
    u, _ = np.linalg.qr(rng.standard_normal((p, r)))
    b = np.einsum("pr,krs->kps", u, rng.standard_normal((k, r, r)))
    b[:bad] = rng.standard_normal((bad, p, r)) / np.sqrt(p / r)
    a = rng.standard_normal((k, r, q)) / np.sqrt(q)
    factors = cj.LoRAFactors(B=jnp.asarray(b), A=jnp.asarray(a))
    blocks = dense(factors)
    # Dense stacked 64 × 256, reduced 64 × 64: "auto" takes the partial SVT on both.
    assert linalg.choose_svt_budget((p, k * q), "auto") is not None
    assert linalg.choose_svt_budget((k * r, k * r), "auto") is not None
    full = cj.clair(blocks, svt="full")
    fast = cj.clair(blocks, svt="partial")
    fact = cj.clair(factors, svt="partial")
    truth = np.arange(k) >= bad
    for res in (full, fast, fact):
        np.testing.assert_array_equal(res.client_benign, truth)
    np.testing.assert_array_equal(fast.benign, full.benign)
    np.testing.assert_array_equal(fact.benign, full.benign)
    scale = float(jnp.max(jnp.abs(blocks)))
    np.testing.assert_allclose(fast.refined, full.refined, atol=1e-6 * scale)
    np.testing.assert_allclose(dense(fact.refined), full.refined, atol=1e-6 * scale)


def test_clair_gram_svt_equals_full_on_small_federation():
    """Small stacks (short side < 64): "auto" takes the whole spectrum from the Gram
    matrix; verdicts and refined updates equal the full-SVD path's."""
    import clair_jax as cj

    # The float32 shape of tests/test_clair.py (16 clients of 12 × 4): its "auto" program compiles once per run.
    fed = cj.data.make_federation(2, num_clients=16, p=12, q=4, rank=2, noise=0.05)
    assert linalg.choose_svt_budget((12, 16 * 4), "auto") == 12
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # not the crowded fallback, where refined = local
        full = cj.clair(fed.updates, svt="full")
        gram = cj.clair(fed.updates, svt="auto")
    np.testing.assert_array_equal(gram.client_benign, full.client_benign)
    np.testing.assert_array_equal(gram.client_benign, np.asarray(fed.benign))
    scale = float(jnp.max(jnp.abs(fed.updates)))
    np.testing.assert_allclose(gram.refined, full.refined, atol=1e-5 * scale)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_ritz_svd_by_eigh_matches_svd(dtype):
    # The accelerators' k × k SVD (eigh of t tᵀ, V from a QR): same factorisation as LAPACK's.
    rng = np.random.default_rng(3)
    t = jnp.asarray(rng.standard_normal((40, 40)) * np.logspace(0, -2, 40)[None, :], dtype)
    u, s, vt = linalg.ritz_svd(t, "eigh")
    u0, s0, vt0 = linalg.ritz_svd(t, "svd")
    eps = float(jnp.finfo(dtype).eps)
    # Squaring: |Δsᵢ| ≈ eps·s₁²/sᵢ (what the partial SVT's certificate guards against).
    s0_np = np.asarray(s0)
    assert np.all(np.abs(np.asarray(s) - s0_np) <= 20 * eps * s0_np[0] * (1 + s0_np[0] / s0_np))
    np.testing.assert_allclose((u * s) @ vt, t, atol=50 * eps * float(s0[0]))
    np.testing.assert_allclose(vt @ vt.T, np.eye(40), atol=1e3 * eps)
    lead = 10   # well separated leading pairs agree up to sign
    np.testing.assert_allclose(np.abs(np.sum(u[:, :lead] * u0[:, :lead], axis=0)), 1.0, atol=1e3 * eps)
    np.testing.assert_allclose(np.abs(np.sum(vt[:lead] * vt0[:lead], axis=1)), 1.0, atol=1e3 * eps)
    with pytest.raises(ValueError, match="method"):
        linalg.ritz_svd(t, "qr")


def test_partial_svt_with_eigh_ritz_matches_full():
    # The GPU default (k × k SVD by eigh), forced on CPU: the certified answer is the exact SVT.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((128, 6)) @ rng.standard_normal((6, 96))
                    + 0.01 * rng.standard_normal((128, 96)), jnp.float32)
    state = linalg.init_subspace(x.shape, 16)
    step = jax.jit(lambda x, s: linalg.partial_svt_with_spectrum(x, 1.0, s, small_svd="eigh"))
    for _ in range(4):
        (low, spec), state = step(x, state)
    ref, ref_spec = svt_with_spectrum(x, 1.0)
    assert int(state.fallbacks) == 0
    np.testing.assert_allclose(spec, ref_spec, atol=5e-5 * float(ref_spec[0]))
    np.testing.assert_allclose(low, ref, atol=5e-5 * float(jnp.max(jnp.abs(ref))))
