"""Partial pooling inside the subspace (refine.partial_pool) against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clair_jax import refine

# Jitted once per shape: an eager call dispatches each of their operations on its own.
partial_pool = jax.jit(refine.partial_pool, static_argnames=("pooling",))
project = jax.jit(refine.project)
pool_members = jax.jit(refine.pool_members)


def _federation(seed, k=30, p=12, q=6, r=2, spread=1.0, noise=0.1, dtype=np.float64):
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((p, r)))[0]
    centre = rng.standard_normal((r, q))
    v = centre + spread * rng.standard_normal((k, r, q))
    blocks = np.einsum("pr,krq->kpq", u, v) + noise * rng.standard_normal((k, p, q))
    return jnp.asarray(u, dtype), jnp.asarray(blocks, dtype), centre


def test_identical_coordinates_pool_to_the_centre():
    # No between-client spread and no noise inside the subspace: V̄ = V_k, and Λ = 0
    # (τ² = 0) changes nothing: the refinement is the projection.
    u, blocks, _ = _federation(0, spread=0.0, noise=0.0)
    benign = jnp.ones(blocks.shape[0], bool)
    refined, lam = partial_pool(u, blocks, benign, 0.1)
    np.testing.assert_allclose(lam, 0.0)
    np.testing.assert_allclose(refined, project(u, blocks, benign), atol=1e-12)


def test_noise_only_spread_gives_the_benign_mean_in_the_subspace():
    # V_k = V + noise: τ² is estimated at 0, so every benign client gets Û × (mean of the
    # benign V_k), i.e. the benign FedAvg projected on Û; the contaminated client is untouched.
    u, blocks, _ = _federation(1, spread=0.0, noise=0.3)
    benign = jnp.arange(blocks.shape[0]) >= 2
    blocks = blocks.at[:2].set(50.0)   # far away: must not enter V̄
    refined, lam = partial_pool(u, blocks, benign, 0.3)
    assert np.all(np.asarray(lam)[2:] == 0.0) and np.all(np.asarray(lam)[:2] == 1.0)
    mean = jnp.mean(blocks[2:], axis=0)
    np.testing.assert_allclose(refined[2:], jnp.broadcast_to(u @ (u.T @ mean), refined[2:].shape), atol=1e-10)
    np.testing.assert_array_equal(refined[:2], blocks[:2])


def test_huge_spread_keeps_each_clients_coordinates():
    u, blocks, _ = _federation(2, spread=100.0, noise=0.01)
    benign = jnp.ones(blocks.shape[0], bool)
    refined, lam = partial_pool(u, blocks, benign, 0.01)
    assert float(jnp.min(lam)) > 0.999
    np.testing.assert_allclose(refined, project(u, blocks, benign), rtol=1e-3, atol=1e-3)


def test_shrinkage_matches_the_empirical_bayes_formula():
    # Λ_kj = τ_j² / (τ_j² + σ_k² c_k) with τ_j² = median(‖V_kj − V̄_j‖² − σ_k² c_k): by hand.
    u, blocks, _ = _federation(3, spread=0.3, noise=0.2)
    k, _, q = blocks.shape
    benign = jnp.ones(k, bool)
    sigma = jnp.linspace(0.1, 0.3, k)
    cols = jnp.full(k, q)
    refined, lam = partial_pool(u, blocks, benign, sigma, cols)
    v = np.einsum("pr,kpq->krq", np.asarray(u), np.asarray(blocks))
    # The centre is a Huber mean; recover it from the "full" mode (Λ = 0 gives Û V̄).
    full, _ = partial_pool(u, blocks, benign, sigma, cols, pooling="full")
    centre = np.asarray(u).T @ np.asarray(full[0])
    nu = np.asarray(sigma) ** 2 * q
    excess = np.sum((v - centre) ** 2, axis=-1) - nu[:, None]
    tau2 = np.maximum(np.sort(excess, axis=0)[(k - 1) // 2], 0.0)
    np.testing.assert_allclose(lam, tau2 / (tau2 + nu[:, None]), rtol=1e-10)
    np.testing.assert_allclose(refined, np.einsum("pr,krq->kpq", np.asarray(u),
                                                  centre + np.asarray(lam)[..., None] * (v - centre)), atol=1e-10)


def test_modes_none_and_full_and_zero_columns():
    u, blocks, _ = _federation(4)
    basis = jnp.concatenate([u, jnp.zeros((u.shape[0], 1))], axis=1)   # a padded basis column
    benign = jnp.ones(blocks.shape[0], bool)
    none, lam_none = partial_pool(basis, blocks, benign, 0.1, pooling="none")
    np.testing.assert_allclose(none, project(u, blocks, benign), atol=1e-12)
    assert np.all(np.asarray(lam_none) == 1.0)
    full, lam_full = partial_pool(basis, blocks, benign, 0.1, pooling="full")
    assert np.all(np.asarray(lam_full)[:, :2] == 0.0) and np.all(np.asarray(lam_full)[:, 2] == 1.0)
    np.testing.assert_allclose(full, jnp.broadcast_to(full[0], full.shape), atol=1e-12)
    with pytest.raises(ValueError, match="pooling"):
        partial_pool(u, blocks, benign, 0.1, pooling="half")


def test_a_contaminated_minority_inside_the_set_barely_moves_the_centre():
    # Huber weights: 20% of the "benign" set far away moves V̄ far less than a mean would.
    u, blocks, centre = _federation(5, spread=0.1, noise=0.05)
    blocks = blocks.at[:6].add(30.0 * u[:, :1] @ jnp.ones((1, blocks.shape[-1])))
    benign = jnp.ones(blocks.shape[0], bool)
    full, _ = partial_pool(u, blocks, benign, 0.05, pooling="full")
    got = np.asarray(u).T @ np.asarray(full[10])
    mean_shift = np.linalg.norm(np.mean(np.einsum("pr,kpq->krq", u, blocks), 0) - centre)
    assert np.linalg.norm(got - centre) < 0.25 * mean_shift


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_dtype_kept_and_vmap_equals_loop(dtype):
    feds = [_federation(s, dtype=dtype) for s in (6, 7, 8)]
    us = jnp.stack([f[0] for f in feds])
    bs = jnp.stack([f[1] for f in feds])
    benign = jnp.stack([jnp.arange(30) % 7 != 0] * 3)
    sig = jnp.asarray([0.1, 0.2, 0.3], dtype)
    out, lam = jax.jit(jax.vmap(refine.partial_pool))(us, bs, benign, sig)
    assert out.dtype == dtype and lam.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 1e-12
    for i in range(3):
        o, lm = partial_pool(us[i], bs[i], benign[i], sig[i])
        np.testing.assert_allclose(out[i], o, rtol=tol, atol=tol)
        np.testing.assert_allclose(lam[i], lm, rtol=tol, atol=tol)


def test_clair_pooling_option_reports_shrinkage():
    import clair_jax as cj

    fed = cj.data.make_federation(0, num_clients=16, p=12, q=4, rank=2, contamination=0.25, noise=0.3)
    plain = cj.clair(fed.updates)
    assert np.all(np.asarray(plain.shrinkage) == 1.0)
    auto = cj.clair(fed.updates, pooling="auto")
    np.testing.assert_array_equal(auto.client_benign, plain.client_benign)
    used = np.asarray(auto.client_benign)
    assert auto.shrinkage.shape == (16, auto.subspace.shape[-1])
    assert np.all(np.asarray(auto.shrinkage)[~used] == 1.0)
    # The same as pooling from outside with the reported σ̂ (full-rank blocks: q noise columns).
    expect, lam = partial_pool(auto.subspace, fed.updates, auto.client_benign, auto.noise_level)
    # float32 federation: the stage and this call are two programs, which round differently.
    tol = 1e-6 if fed.updates.dtype == np.float32 else 1e-10
    np.testing.assert_allclose(auto.refined, expect, atol=tol)
    np.testing.assert_allclose(auto.shrinkage, lam, atol=tol)
    with pytest.raises(ValueError, match="pooling"):
        cj.clair(fed.updates, pooling="half")


# ------------------------------------------- noise reported by the clients (coordinate_noise)


def test_reported_noise_per_direction_matches_the_formula():
    # ν_kj given per client and direction replaces σ_k² c_k in both τ_j² and Λ_kj.
    u, blocks, _ = _federation(9, spread=0.3, noise=0.2)
    k = blocks.shape[0]
    benign = jnp.ones(k, bool)
    nu = np.stack([np.linspace(0.05, 0.5, k), np.linspace(2.0, 3.0, k)], axis=1)   # direction 1 much noisier
    refined, lam = partial_pool(u, blocks, benign, 0.2, coordinate_noise=nu)
    full, _ = partial_pool(u, blocks, benign, 0.2, pooling="full")
    centre = np.asarray(u).T @ np.asarray(full[0])
    v = np.einsum("pr,kpq->krq", np.asarray(u), np.asarray(blocks))
    tau2 = np.maximum(np.sort(np.sum((v - centre) ** 2, axis=-1) - nu, axis=0)[(k - 1) // 2], 0.0)
    np.testing.assert_allclose(lam, tau2 / (tau2 + nu), rtol=1e-10)
    # More noise along a direction pools it more.
    assert float(jnp.mean(lam[:, 1])) < float(jnp.mean(lam[:, 0]))
    # Reported noise equal to σ² q is the default rule.
    same, lam_same = partial_pool(u, blocks, benign, 0.2, coordinate_noise=np.full((k, 2), 0.2 ** 2 * 6))
    default, lam_default = partial_pool(u, blocks, benign, 0.2)
    np.testing.assert_allclose(same, default, atol=1e-12)
    np.testing.assert_allclose(lam_same, lam_default, atol=1e-12)


def _pooled_federation():
    import clair_jax as cj

    fed = cj.data.make_federation(0, num_clients=16, p=12, q=4, rank=2, contamination=0.25, noise=0.3)
    return cj, fed


def test_clair_asks_for_the_noise_once_the_subspace_is_known():
    cj, fed = _pooled_federation()
    seen = []

    def report(basis):
        seen.append(np.asarray(basis))
        return np.full((16, basis.shape[-1]), 1e6)   # huge noise: full pooling

    res = cj.clair(fed.updates, pooling="auto", coordinate_noise=report)
    (basis,) = seen
    np.testing.assert_allclose(basis, res.subspace)
    used = np.asarray(res.client_benign) & (int(res.rank) > 0)
    live = np.arange(basis.shape[-1]) < int(res.rank)
    assert np.all(np.asarray(res.shrinkage)[used][:, live] < 1e-3)
    assert np.all(np.asarray(res.shrinkage)[~used] == 1.0)
    # No noise reported: every benign client keeps its coordinates (the projection plus α_k).
    quiet = cj.clair(fed.updates, pooling="auto", coordinate_noise=lambda b: np.zeros((16, b.shape[-1])))
    plain = cj.clair(fed.updates)
    np.testing.assert_allclose(quiet.refined, plain.refined, atol=1e-5)


@pytest.mark.parametrize("kwargs, answer, error, match", [
    ({}, None, ValueError, "pooling='auto'"),
    ({"pooling": "auto"}, "not callable", TypeError, "coordinate_noise"),
    ({"pooling": "auto"}, lambda b: np.zeros((15, b.shape[-1])), ValueError, "shape"),
    ({"pooling": "auto"}, lambda b: -np.ones((16, b.shape[-1])), ValueError, "client 0"),
    ({"pooling": "auto"}, lambda b: np.full((16, b.shape[-1]), np.nan), ValueError, "finite"),
])
def test_coordinate_noise_errors_name_the_argument(kwargs, answer, error, match):
    cj, fed = _pooled_federation()
    report = (lambda b: np.zeros((16, b.shape[-1]))) if answer is None else answer
    with pytest.raises(error, match=match):
        cj.clair(fed.updates, coordinate_noise=report, **kwargs)


def test_coordinate_noise_needs_dense_updates():
    import clair_jax as cj

    rng = np.random.default_rng(0)
    factors = cj.LoRAFactors(rng.standard_normal((8, 16, 2)), rng.standard_normal((8, 2, 12)))
    with pytest.raises(ValueError, match="dense"):
        cj.clair(factors, pooling="auto", coordinate_noise=lambda b: np.zeros((8, b.shape[-1])))


def test_jackknife_reads_the_ols_noise_along_each_direction():
    from clair_jax.estimators import coordinate_noise

    rng = np.random.default_rng(1)
    n, p, q, sigma = 400, 5, 3, 0.7
    x = rng.standard_normal((n, p)) * np.array([1.0, 1.0, 1.0, 0.2, 0.2])   # two weak inputs: noisier there
    basis = np.linalg.qr(rng.standard_normal((p, 2)))[0]
    basis[:, 1] = 0.0                                                           # a padded column gives 0
    ols = lambda a, b: np.linalg.lstsq(a, b, rcond=None)[0]                     # noqa: E731
    truth = sigma ** 2 * q * np.einsum("pj,pq,qj->j", basis, np.linalg.inv(x.T @ x), basis)
    for groups in (None, 40):
        got = [coordinate_noise(ols, x, x @ np.ones((p, q)) + sigma * rng.standard_normal((n, q)), basis,
                                groups=groups) for _ in range(20)]
        np.testing.assert_allclose(np.mean(got, axis=0)[0], truth[0], rtol=0.2)
        assert np.all(np.asarray(got)[:, 1] == 0.0)
    # side="right" reads Θ̂ᵀ: the fit's columns.
    right = coordinate_noise(lambda a, b: ols(a, b).T, x, x @ np.ones((p, q)), basis, side="right")
    assert right.shape == (2,)
    with pytest.raises(ValueError, match="groups"):
        coordinate_noise(ols, x, x, basis, groups=1)
    with pytest.raises(ValueError, match="rows to match basis"):
        coordinate_noise(ols, x, x[:, :2], basis.T)
    with pytest.raises(ValueError, match="same samples"):
        coordinate_noise(ols, x, x[:10], basis)


def test_in_subspace_attackers_are_set_aside_with_the_reported_noise():
    # 3 of 16 clients send -3 × the benign mean coordinates inside the true subspace:
    # nothing of them is off Û, so the verdict keeps them; with the noise the clients
    # report, their coordinates are out of the pooling model's reach (pool_members), they
    # are left out of Û and the centre (outlying) and the honest clients pool without them.
    import clair_jax as cj

    rng = np.random.default_rng(3)
    k, p, q, r, sigma = 16, 12, 4, 2, 0.3        # the shape of _pooled_federation: programs compile once
    u = np.linalg.qr(rng.standard_normal((p, r)))[0]
    centre = 2.0 * rng.standard_normal((r, q))
    v = centre + 0.1 * rng.standard_normal((k, r, q))
    v[:3] = -3.0 * centre
    x = (np.einsum("pr,krq->kpq", u, v) + sigma * rng.standard_normal((k, p, q))).astype(np.float32)
    res = cj.clair(x, pooling="auto", coordinate_noise=lambda b: np.full((k, b.shape[-1]), sigma ** 2 * q))
    assert np.asarray(res.client_benign)[:3].all()                 # invisible to the detection
    np.testing.assert_array_equal(np.asarray(res.outlying), np.arange(k) < 3)
    np.testing.assert_array_equal(np.asarray(res.refined)[:3], x[:3])   # they keep their update
    truth = np.einsum("pr,krq->kpq", u, v)
    err = lambda e: np.mean(np.sum((e - truth)[3:] ** 2, axis=(1, 2)))   # noqa: E731
    assert err(np.asarray(res.refined)) < 0.5 * err(np.asarray(cj.clair(x).refined))
    assert "not explained inside Û" in res.summary()
    # Without the reported noise nobody is set aside.
    assert not np.asarray(cj.clair(x, pooling="auto").outlying).any()


def test_pool_members_keeps_everyone_when_the_model_fits():
    u, blocks, _ = _federation(10, spread=0.3, noise=0.2)
    benign = jnp.ones(blocks.shape[0], bool)
    assert bool(jnp.all(pool_members(u, blocks, benign, 0.2)))
