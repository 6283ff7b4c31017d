import functools

import cvxpy as cp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clair_jax as cj
from clair_jax.decompose import _decompose_jit


def _problem(seed=0, k=10, p=8, q=3, r=2, n_bad=3, noise=0.0):
    fed = cj.data.make_federation(seed, num_clients=k, p=p, q=q, rank=r, contamination=n_bad / k,
                                  noise=noise, dtype=jnp.float64)
    return fed


def _cvxpy_optimum(m_blocks, lam, mu):
    k, p, q = m_blocks.shape
    m = np.transpose(m_blocks, (1, 0, 2)).reshape(p, k * q)
    L, C = cp.Variable((p, k * q)), cp.Variable((p, k * q))
    block = cp.sum(cp.hstack([cp.norm(C[:, i * q:(i + 1) * q], "fro") for i in range(k)]))
    if mu is None:
        prob = cp.Problem(cp.Minimize(cp.normNuc(L) + lam * block), [L + C == m])
    else:
        prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(m - L - C) + mu * (cp.normNuc(L) + lam * block)))
    prob.solve(solver="CLARABEL")
    return prob.value


@pytest.mark.parametrize("mu", [None, 0.05])
@pytest.mark.parametrize("lam", [0.6, 1.0])
def test_reaches_cvxpy_optimum(mu, lam):
    fed = _problem(noise=0.1)
    m = np.asarray(fed.updates)
    dec = cj.decompose(fed.updates, lam=lam, mu=mu)
    ref = _cvxpy_optimum(m, lam, mu)
    assert bool(dec.converged)
    assert abs(float(dec.objective) - ref) / abs(ref) <= 1e-5


def test_exact_program_optimality_conditions():
    fed = _problem(noise=0.05)
    lam = 0.8
    dec = cj.decompose(fed.updates, lam=lam)
    m = fed.updates
    np.testing.assert_allclose(np.asarray(dec.low_rank + dec.sparse), np.asarray(m), atol=1e-7)
    # C_k ≠ 0 blocks get the same objective from moving mass into L: compare with CVXPY value
    assert float(dec.objective) == pytest.approx(
        float(jnp.linalg.norm(cj.stack.to_stacked(dec.low_rank), "nuc") + lam * dec.block_norms.sum()), rel=1e-9)


def test_penalised_program_optimality_conditions():
    fed = _problem(noise=0.1)
    lam, mu = 0.8, 0.05
    dec = cj.decompose(fed.updates, lam=lam, mu=mu)
    r = np.asarray(fed.updates - dec.low_rank - dec.sparse)
    l = np.asarray(cj.stack.to_stacked(dec.low_rank))
    rs = np.transpose(r, (1, 0, 2)).reshape(l.shape)
    # R/μ ∈ ∂‖L‖_*: spectral norm ≤ 1 and alignment with L.
    assert np.linalg.norm(rs, 2) <= mu * (1 + 1e-6)
    assert np.sum(rs * l) == pytest.approx(mu * np.linalg.norm(l, "nuc"), rel=1e-6)
    # R_k/μ ∈ λ ∂‖C_k‖_F block by block.
    for rk, ck in zip(r, np.asarray(dec.sparse)):
        if np.linalg.norm(ck) > 0:
            np.testing.assert_allclose(rk, mu * lam * ck / np.linalg.norm(ck), atol=1e-6)
        else:
            assert np.linalg.norm(rk) <= mu * lam * (1 + 1e-6)


def test_vmapped_equals_loop():
    fed = cj.data.make_federation(3, num_clients=10, p=8, q=3, rank=2, num_layers=3, noise=0.1, dtype=jnp.float64)
    lams = jnp.array([0.6, 0.9, 1.2])
    batched = cj.decompose(fed.updates, lam=lams, mu=0.03)
    for i in range(3):
        single = cj.decompose(fed.updates[i], lam=float(lams[i]), mu=0.03)
        np.testing.assert_allclose(np.asarray(batched.low_rank[i]), np.asarray(single.low_rank), atol=1e-9)
        np.testing.assert_allclose(np.asarray(batched.block_norms[i]), np.asarray(single.block_norms), atol=1e-9)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("mu", [None, "auto"])
def test_dtype_kept_and_converges(dtype, mu):
    fed = cj.data.make_federation(0, num_clients=12, p=10, q=4, rank=2, noise=0.1, dtype=dtype)
    dec = cj.decompose(fed.updates, mu=mu)
    assert dec.low_rank.dtype == dtype and dec.sparse.dtype == dtype and dec.objective.dtype == dtype
    assert bool(dec.converged)


def test_no_recompilation_on_second_call():
    fed = cj.data.make_federation(0, num_clients=10, p=8, q=3, rank=2, dtype=jnp.float64)
    cj.decompose(fed.updates, lam=0.9)
    before = _decompose_jit._cache_size()
    cj.decompose(fed.updates * 2.0, lam=0.7)
    assert _decompose_jit._cache_size() == before


def test_scale_invariance_of_normalised_solution():
    fed = _problem(noise=0.05)
    a = cj.decompose(fed.updates, lam=0.8)
    b = cj.decompose(fed.updates * 1e4, lam=0.8)
    np.testing.assert_allclose(np.asarray(b.low_rank) / 1e4, np.asarray(a.low_rank), atol=1e-8)
    assert float(b.objective) == pytest.approx(1e4 * float(a.objective), rel=1e-8)


def test_side_right_is_transposed_left():
    fed = _problem(noise=0.05)
    right = cj.decompose(fed.updates, lam=0.8, side="right")
    left = cj.decompose(jnp.swapaxes(fed.updates, -1, -2), lam=0.8)
    np.testing.assert_allclose(np.asarray(right.sparse), np.asarray(jnp.swapaxes(left.sparse, -1, -2)), atol=1e-10)


def test_nonconvergence_is_reported():
    fed = _problem(noise=0.1)
    dec = cj.decompose(fed.updates, lam=0.8, max_iter=2)
    assert not bool(dec.converged) and int(dec.iterations) == 2


def test_nonfinite_input_is_flagged_not_crashed():
    fed = _problem()
    bad = fed.updates.at[0, 0, 0].set(jnp.nan)
    dec = cj.decompose(bad, lam=0.8)
    assert not bool(dec.converged)


def test_large_mu_is_solved_not_stopped_at_the_continuation_start():
    # μ above 0.6‖M‖₂ is reached in one continuation shrink; the first step (at
    # μ = ‖M‖₂) gives L = 0 and must not pass for convergence. With λ large enough
    # that C = 0 the optimum is closed form: L = SVT(M, μ).
    from clair_jax.solvers import solve_penalized
    from clair_jax.stack import to_stacked

    rng = np.random.default_rng(3)
    u = np.linalg.qr(rng.standard_normal((12, 3)))[0]
    m = np.einsum("pr,kqr->kpq", u * np.array([1.0, 0.95, 0.9]), rng.standard_normal((6, 4, 3)))
    m = jnp.asarray(m / np.linalg.norm(to_stacked(jnp.asarray(m)), ord=2))
    mu = 0.7
    out = solve_penalized(m, 50.0, mu, tol=1e-7, max_iter=500)
    expected = cj.prox.svt(to_stacked(m), mu)
    assert bool(out.converged) and int(out.iterations) > 1
    assert float(jnp.linalg.norm(expected)) > 0.1
    np.testing.assert_allclose(to_stacked(out.low_rank), expected, atol=1e-6)


def test_warm_started_lambda_path_reaches_each_optimum_in_fewer_iterations():
    from clair_jax.solvers import solve_penalized, solve_penalized_path
    from clair_jax.stack import to_stacked
    from clair_jax.tuning import lambda_grid

    fed = _problem(seed=4, k=12, p=10, q=4, r=2, n_bad=3, noise=0.05)
    m = fed.updates / jnp.linalg.norm(to_stacked(fed.updates), ord=2)
    lams = jnp.asarray(lambda_grid(12, 10, 4))
    path = solve_penalized_path(m, lams, 0.05, tol=1e-7, max_iter=3000)
    alone = jax.vmap(lambda lam: solve_penalized(m, lam, 0.05, tol=1e-7, max_iter=3000))(lams)
    assert bool(jnp.all(path.converged)) and bool(jnp.all(alone.converged))
    np.testing.assert_allclose(path.objective, alone.objective, rtol=1e-6)
    np.testing.assert_allclose(path.sparse, alone.sparse, atol=1e-4)
    assert int(jnp.sum(path.iterations)) < int(jnp.sum(alone.iterations))
    # ``until``: the path stops ``extra`` λ after the first hit; the rest stays unsolved.
    short = solve_penalized_path(m, lams, 0.05, tol=1e-7, max_iter=3000, until=lambda o: o.iterations > 0, extra=1)
    assert (np.asarray(short.iterations)[:2] > 0).all() and (np.asarray(short.iterations)[2:] == 0).all()
    np.testing.assert_allclose(short.objective[:2], path.objective[:2], rtol=1e-6)


@pytest.mark.parametrize("lam", [0.6, 1.0])
def test_alm_penalised_reaches_cvxpy_optimum(lam):
    # The ALM with μ > 0 (the two-block ADMM cj.clair's λ path uses) solves the
    # same penalised program as FISTA.
    from clair_jax.solvers import solve_alm
    from clair_jax.stack import to_stacked

    fed = _problem(noise=0.1)
    m = np.asarray(fed.updates)
    scale = float(np.linalg.norm(np.asarray(to_stacked(fed.updates)), 2))
    mu = 0.05
    out = jax.jit(lambda x: solve_alm(x, lam, mu / scale, tol=1e-9, max_iter=5000))(fed.updates / scale)
    ref = _cvxpy_optimum(m, lam, mu)
    assert bool(out.converged)
    assert abs(float(out.objective) * scale**2 - ref) / abs(ref) <= 1e-5
    # μ = 0 is the exact program, step for step.
    from clair_jax.solvers import solve_exact
    a = solve_alm(fed.updates / scale, lam, 0.0, tol=1e-9, max_iter=5000)
    b = solve_exact(fed.updates / scale, lam, tol=1e-9, max_iter=5000)
    assert int(a.iterations) == int(b.iterations)
    np.testing.assert_allclose(np.asarray(a.low_rank), np.asarray(b.low_rank), atol=1e-12)


# The ALM path and independent solves of the next two tests, one program each for both
# μ (a traced argument) and both tests (16 clients of 72 × 8, five λ, float32).
_ALM = dict(tol=3e-6, max_iter=3000, svt_budget=16)


@functools.partial(jax.jit, static_argnames=("skip_empty",))
def _alm_path(m, lams, mu, skip_empty=True):
    from clair_jax.solvers import solve_alm_path

    return solve_alm_path(m, lams, mu, skip_empty=skip_empty, **_ALM)


@jax.jit
def _alm_alone(m, lams, mu):
    from clair_jax.solvers import solve_alm

    return jax.vmap(lambda lam: solve_alm(m, lam, mu, **_ALM))(lams)


@pytest.mark.parametrize("mu", [0.0, 0.05])
def test_alm_path_matches_independent_solves_with_the_partial_svt(mu):
    # The path carries the partial SVT's subspace from one λ to the next: same
    # optima as cold independent solves, with fewer full-SVD fallbacks.
    from clair_jax.stack import to_stacked
    from clair_jax.tuning import lambda_grid

    fed = _problem(seed=2, k=16, p=72, q=8, r=3, n_bad=4, noise=0.05)
    m = (fed.updates / jnp.linalg.norm(to_stacked(fed.updates), ord=2)).astype(jnp.float32)
    lams = jnp.asarray(lambda_grid(16, 72, 8), jnp.float32)[:5]
    path = _alm_path(m, lams, jnp.float32(mu))
    alone = _alm_alone(m, lams, jnp.float32(mu))
    assert bool(jnp.all(path.converged)) and bool(jnp.all(alone.converged))
    np.testing.assert_allclose(path.objective, alone.objective, rtol=2e-5)
    assert int(jnp.sum(path.svt_fallbacks)) <= int(jnp.sum(alone.svt_fallbacks))


@pytest.mark.parametrize("mu", [0.0, 0.05])
def test_alm_path_writes_the_empty_low_rank_solution_below_the_limit_in_closed_form(mu):
    # Below λ₀ = 1/‖N‖_2 (N: the blocks at unit norm) L̂ = 0 solves both programs:
    # the path writes that solution without iterating, and it is what ALM finds there.
    from clair_jax.solvers.path import empty_low_rank_limit
    from clair_jax.stack import to_stacked

    fed = _problem(seed=3, k=16, p=72, q=8, r=3, n_bad=4, noise=0.05)
    m = (fed.updates / jnp.linalg.norm(to_stacked(fed.updates), ord=2)).astype(jnp.float32)
    limit = float(empty_low_rank_limit(m))
    lams = jnp.asarray([0.4 * limit, 0.8 * limit, 0.99 * limit, 1.5 * limit, 3 * limit], jnp.float32)
    path = _alm_path(m, lams, jnp.float32(mu))
    full = _alm_path(m, lams, jnp.float32(mu), skip_empty=False)
    np.testing.assert_array_equal(np.asarray(path.iterations[:3]), 0)
    assert bool(jnp.all(path.iterations[3:] > 0)) and bool(jnp.all(path.converged))
    np.testing.assert_allclose(path.objective, full.objective, rtol=2e-5)
    assert float(jnp.max(jnp.abs(full.low_rank[:3]))) < 1e-4 * float(jnp.max(jnp.abs(m)))
    np.testing.assert_allclose(path.sparse[:3], full.sparse[:3], atol=1e-4 * float(jnp.max(jnp.abs(m))))
    # Just above the limit L̂ has rank: the limit is where the closed form ends.
    assert float(full.singular_values[3, 0]) > 0
    alone = _alm_alone(m, lams, jnp.float32(mu))    # lams[3] = 1.5 × the limit
    np.testing.assert_allclose(path.objective[3], alone.objective[3], rtol=2e-5)
