"""Local estimators: regression (OLS / ridge) and MLP fine-tuning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clair_jax.estimators import mlp as M
from clair_jax.estimators import regression as R


def _rng(seed=0):
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------- regression


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-9), (np.float32, 1e-4)])
def test_ols_recovers_coefficients_on_noiseless_data(dtype, tol):
    rng = _rng(0)
    k, n, p, q = 5, 30, 6, 3
    x = rng.standard_normal((k, n, p)).astype(dtype)
    theta = rng.standard_normal((k, p, q)).astype(dtype)
    with jax.enable_x64(dtype == np.float64):
        est = R.fit_ols(x, x @ theta)
        assert est.dtype == dtype
        np.testing.assert_allclose(np.asarray(est), theta, atol=tol, rtol=tol)


def test_ridge_matches_closed_form_and_tends_to_ols():
    rng = _rng(1)
    k, n, p, q = 4, 25, 5, 2
    x = rng.standard_normal((k, n, p))
    y = rng.standard_normal((k, n, q))
    alpha = np.array([0.1, 1.0, 10.0, 100.0])
    with jax.enable_x64(True):
        est = np.asarray(R.fit_ridge(x, y, alpha=alpha))
        for i in range(k):
            expect = np.linalg.solve(x[i].T @ x[i] + alpha[i] * np.eye(p), x[i].T @ y[i])
            np.testing.assert_allclose(est[i], expect, rtol=1e-9, atol=1e-12)
        tiny = np.asarray(R.fit_ridge(x, y, alpha=1e-10))
        np.testing.assert_allclose(tiny, np.asarray(R.fit_ols(x, y)), atol=1e-8)


def test_vmapped_fit_equals_per_client_fits():
    rng = _rng(2)
    k, n, p, q = 7, 20, 4, 3
    x = rng.standard_normal((k, n, p))
    y = rng.standard_normal((k, n, q))
    with jax.enable_x64(True):
        batched = np.asarray(R.fit_ols(x, y))
        batched_ridge = np.asarray(R.fit_ridge(x, y, alpha=0.5))
        for i in range(k):
            single = np.asarray(R.fit_ols(x[i : i + 1], y[i : i + 1]))[0]
            np.testing.assert_allclose(batched[i], single, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(batched[i], np.linalg.lstsq(x[i], y[i], rcond=None)[0], atol=1e-10)
            np.testing.assert_allclose(
                batched_ridge[i], np.asarray(R.fit_ridge(x[i : i + 1], y[i : i + 1], alpha=0.5))[0], atol=1e-12
            )


def test_unequal_sample_sizes_padding_changes_nothing():
    rng = _rng(3)
    p, q = 5, 2
    sizes = [8, 15, 30, 11]
    xs = [rng.standard_normal((n, p)) for n in sizes]
    ys = [rng.standard_normal((n, q)) for n in sizes]
    with jax.enable_x64(True):
        data = R.pad_clients(xs, ys)
        assert data.x.shape == (4, 30, p)
        assert data.num_samples.tolist() == sizes
        # Garbage in the padded rows must not leak into the fit.
        x_dirty = np.where(np.asarray(data.mask)[..., None], np.asarray(data.x), 1e3)
        y_dirty = np.where(np.asarray(data.mask)[..., None], np.asarray(data.y), -1e3)
        ols = np.asarray(R.fit_ols(x_dirty, y_dirty, data.mask))
        ridge = np.asarray(R.fit_ridge(x_dirty, y_dirty, data.mask, alpha=2.0))
        for i, (a, b) in enumerate(zip(xs, ys)):
            np.testing.assert_allclose(ols[i], np.linalg.lstsq(a, b, rcond=None)[0], atol=1e-9)
            np.testing.assert_allclose(ridge[i], np.linalg.solve(a.T @ a + 2.0 * np.eye(p), a.T @ b), atol=1e-9)


def test_single_response_q1():
    rng = _rng(4)
    k, n, p = 6, 40, 5
    x = rng.standard_normal((k, n, p))
    beta = rng.standard_normal((k, p))
    y = np.einsum("knp,kp->kn", x, beta)
    with jax.enable_x64(True):
        vec = np.asarray(R.fit_ols(x, y))
        assert vec.shape == (k, p)
        np.testing.assert_allclose(vec, beta, atol=1e-9)
        blocks = np.asarray(R.fit_ols(x, y[..., None]))
        assert blocks.shape == (k, p, 1)
        np.testing.assert_allclose(blocks[..., 0], beta, atol=1e-9)


def test_simulated_data_and_poisoning():
    rng = _rng(5)
    k, p, q = 8, 6, 3
    theta = jnp.asarray(rng.standard_normal((k, p, q)), jnp.float32)
    poisoned = np.array([False] * 4 + [True] * 4)
    kinds = ["none"] * 4 + ["shuffled", "other_task", "heavy_noise", "sign_flip"]
    train, test = R.simulate_regression(
        jax.random.key(0), theta, [400] * 4 + [300] * 4, noise=0.1, poisoned=poisoned, poison=kinds, num_test=200
    )
    est = np.asarray(R.fit_ols(train.x, train.y, train.mask))
    err = np.sum((est - np.asarray(theta)) ** 2, (1, 2)) / np.sum(np.asarray(theta) ** 2, (1, 2))
    assert np.all(err[:4] < 1e-3)          # clean clients: close to the truth
    assert np.all(err[[4, 5, 7]] > 0.3)    # shuffled, other task, sign flip: a different Θ
    assert err[6] > 20 * err[:4].max()     # heavy noise: 10× noise, ~100× the error
    mse = np.asarray(R.prediction_mse(jnp.asarray(theta), test))
    np.testing.assert_allclose(mse, 0.01, rtol=0.3)  # clean test data: noise floor σ² = 0.01


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: R.fit_ols(np.ones((3, 4)), np.ones((3, 4))), "x must have shape"),
        (lambda: R.fit_ols(np.ones((3, 4, 2)), np.ones((3, 5, 1))), "y must have the same"),
        (lambda: R.fit_ols(np.ones((3, 4, 2)), np.ones((3, 4, 1)), np.ones((3, 5))), "mask must have shape"),
        (lambda: R.fit_ridge(np.ones((3, 4, 2)), np.ones((3, 4, 1)), alpha=-1.0), "alpha must be > 0"),
        (lambda: R.fit_ridge(np.ones((3, 4, 2)), np.ones((3, 4, 1)), alpha=np.ones(2)), "alpha must be a scalar"),
        (lambda: R.pad_clients([np.ones((3, 2))], [np.ones((4, 1))]), r"ys\[0\] must have 3 rows"),
        (lambda: R.simulate_regression(jax.random.key(0), np.ones((2, 3, 1)), 5, poison="bogus"), "poison must be"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_second_call_does_not_recompile():
    rng = _rng(6)
    x = rng.standard_normal((3, 10, 4)).astype(np.float32)
    y = rng.standard_normal((3, 10, 2)).astype(np.float32)
    R.fit_ols(x, y)
    before = R._fit_ols._cache_size()
    R.fit_ols(x + 1.0, y)
    assert R._fit_ols._cache_size() == before


# --------------------------------------------------------------------------- MLP


@pytest.fixture(scope="module")
def small_federation():
    return M.make_mlp_federation(
        0, num_clients=8, contamination=0.25, num_samples=[60, 80, 100, 120] * 2, num_test=50, base_steps=300
    )


def test_base_training_lowers_loss(small_federation):
    losses = np.asarray(small_federation.base_losses)
    assert losses[-1] < 0.2 * losses[0]


def test_poison_kinds_match_the_collaborative_set(small_federation):
    kinds = np.asarray(small_federation.poison_kinds)
    benign = np.asarray(small_federation.benign)
    assert kinds.shape == benign.shape
    assert np.all(kinds[benign] == "none")
    assert set(kinds[~benign]) <= set(M.MLP_POISON_KINDS) and len(set(kinds[~benign])) == (~benign).sum()


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fine_tuning_lowers_every_clients_training_loss(small_federation, mode):
    fed = small_federation
    out = M.fine_tune(jax.random.key(1), fed.params, fed.x_train, fed.y_train, fed.mask_train, mode=mode, steps=200)
    k = fed.x_train.shape[0]
    assert out.deltas.shape == (2, k, 16, 16)  # layer axis leading
    assert np.all(np.asarray(out.final_loss) < np.asarray(out.initial_loss))
    assert np.all(np.isfinite(np.asarray(out.losses)))
    if mode == "lora":
        np.testing.assert_allclose(
            np.asarray(out.deltas), np.asarray(out.lora_b @ out.lora_a), atol=1e-5
        )
        assert np.linalg.matrix_rank(np.asarray(out.deltas[0, 0]), tol=1e-5) <= 4


def test_vmapped_fine_tuning_equals_per_client(small_federation):
    fed = small_federation
    sl = slice(2, 4)
    both = M.fine_tune(jax.random.key(1), fed.params, fed.x_train, fed.y_train, fed.mask_train, steps=50)
    part = M.fine_tune(
        jax.random.key(1), fed.params, fed.x_train[sl], fed.y_train[sl], fed.mask_train[sl], steps=50
    )
    # Full mode starts at 0 for every client: the batch must not couple clients.
    np.testing.assert_allclose(np.asarray(both.deltas[:, sl]), np.asarray(part.deltas), rtol=2e-4, atol=2e-6)


def test_fine_tuning_ignores_padded_rows(small_federation):
    fed = small_federation
    dirty_y = jnp.where(fed.mask_train[..., None], fed.y_train, 1e3)
    a = M.fine_tune(jax.random.key(1), fed.params, fed.x_train, fed.y_train, fed.mask_train, steps=30)
    b = M.fine_tune(jax.random.key(1), fed.params, fed.x_train, dirty_y, fed.mask_train, steps=30)
    np.testing.assert_allclose(np.asarray(a.deltas), np.asarray(b.deltas), atol=1e-6)


def test_benign_fine_tuned_deltas_concentrate_on_shared_subspace():
    fed = M.make_mlp_federation(1, num_clients=10, contamination=0.0, num_samples=2000, noise=0.05, base_steps=300)
    out = M.fine_tune(jax.random.key(0), fed.params, fed.x_train, fed.y_train, fed.mask_train)
    u = np.asarray(fed.subspace)
    d = np.asarray(out.deltas)
    inside = np.sum(np.einsum("lpr,lkpq->lkrq", u, d) ** 2)
    # Isotropic error would put r/p = 1/8 of the energy inside span(U).
    assert inside / np.sum(d**2) > 0.6


def test_mlp_bad_input():
    params = M.init_mlp(jax.random.key(0), 8, 2, 16, 4)
    with pytest.raises(ValueError, match="mode must be"):
        M.fine_tune(jax.random.key(0), params, np.ones((2, 5, 16)), np.ones((2, 5, 4)), mode="bogus")
    with pytest.raises(ValueError, match="x must have L·d = 16"):
        M.fine_tune(jax.random.key(0), params, np.ones((2, 5, 8)), np.ones((2, 5, 4)))
    with pytest.raises(ValueError, match="out_dim"):
        M.fine_tune(jax.random.key(0), params, np.ones((2, 5, 16)), np.ones((2, 5, 3)))
    with pytest.raises(ValueError, match="contamination"):
        M.make_mlp_federation(0, contamination=1.5)
    with pytest.raises(ValueError, match="num_modules"):
        M.init_mlp(jax.random.key(0), 8, 0, 16, 4)
