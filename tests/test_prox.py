import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clair_jax as cj


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (3, 5, 7)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_svt_matches_closed_form(shape, dtype):
    x = np.random.default_rng(0).standard_normal(shape)
    tau = 0.8
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    expected = (u * np.maximum(s - tau, 0)[..., None, :]) @ vt
    got = cj.prox.svt(jnp.asarray(x, dtype), tau)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 1e-12
    np.testing.assert_allclose(np.asarray(got), expected, atol=tol * 10)


def test_svt_is_the_prox_of_the_nuclear_norm():
    # Optimality: X − Z ∈ τ ∂‖Z‖_*  ⇔  ‖X − Z‖_2 ≤ τ and ⟨X − Z, Z⟩ = τ‖Z‖_*.
    x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 5)))
    tau = 1.3
    z = cj.prox.svt(x, tau)
    g = x - z
    assert np.linalg.norm(np.asarray(g), 2) <= tau + 1e-10
    np.testing.assert_allclose(float(jnp.sum(g * z)), tau * float(jnp.linalg.norm(z, "nuc")), rtol=1e-10)


def test_svt_exact_zero_and_finite_gradient_at_zero():
    assert float(jnp.abs(cj.prox.svt(jnp.full((4, 3), 0.1), 5.0)).max()) == 0.0
    for x in (jnp.zeros((4, 3)), jnp.outer(jnp.arange(4.0), jnp.ones(3))):
        g = jax.jit(jax.grad(lambda x: jnp.sum(cj.prox.svt(x, 1.0) ** 2)))(x)
        assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_block_soft_threshold_by_hand(dtype):
    blocks = np.random.default_rng(2).standard_normal((5, 3, 2))
    blocks[1] *= 0.01  # below the threshold
    tau = 0.9
    expected = np.stack([max(0.0, 1 - tau / np.linalg.norm(b)) * b for b in blocks])
    got = cj.prox.block_soft_threshold(jnp.asarray(blocks, dtype), tau)
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(got[1]).max()) == 0.0


def test_block_soft_threshold_gradient_at_zero_is_finite():
    g = jax.jit(jax.grad(lambda x: jnp.sum(cj.prox.block_soft_threshold(x, 0.5) ** 2)))(jnp.zeros((3, 2, 2)))
    assert np.all(np.isfinite(np.asarray(g)))
    g = jax.jit(jax.grad(lambda x: jnp.sum(cj.prox.safe_frobenius_norm(x))))(jnp.zeros((3, 2, 2)))
    assert np.all(np.isfinite(np.asarray(g)))


def test_singular_values_match_the_svd_without_a_full_u():
    # A batch shaped like 32 LoRA blocks of a reduced 7B module: the values are the SVD's,
    # and the compiled call holds no m × m U (jnp.linalg.svd(compute_uv=False) alone does).
    x = jax.random.normal(jax.random.PRNGKey(0), (32, 512, 16))
    np.testing.assert_array_equal(cj.prox.singular_values(x), jnp.linalg.svd(x, compute_uv=False))
    spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
    scratch = jax.jit(cj.prox.singular_values).lower(spec).compile().memory_analysis().temp_size_in_bytes
    assert scratch < 32 * 512 * 512 * 4 / 4, scratch
