import jax.numpy as jnp
import numpy as np
import pytest

import clair_jax as cj

GOOD = jnp.asarray(np.random.default_rng(0).standard_normal((6, 5, 3)))


@pytest.mark.parametrize("fn", [cj.clair, cj.decompose])
@pytest.mark.parametrize("bad, err, match", [
    (GOOD[0], ValueError, "at least 3 axes"),
    (GOOD[:1], ValueError, "at least 2 clients"),
    (GOOD.astype(jnp.int32), TypeError, "floating dtype"),
    ("nope", TypeError, "must be an array"),
])
def test_bad_arrays(fn, bad, err, match):
    with pytest.raises(err, match=match):
        fn(bad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(side="up"), "side"),
    (dict(lam=-1.0), "lam"),
    (dict(lam=float("nan")), "lam"),
    (dict(rank=0), "rank"),
    (dict(rank=1.5), "rank"),
    (dict(noise=-0.1), "noise"),
    (dict(noise="loud"), "noise"),
    (dict(threshold=2.0), "threshold"),
    (dict(max_iter=0), "max_iter"),
    (dict(min_gap=0.0), "min_gap"),
])
def test_bad_clair_options(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        cj.clair(GOOD, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mu=-1.0), "mu"), (dict(mu="sometimes"), "mu"), (dict(tol=0.0), "tol"), (dict(side=1), "side"),
])
def test_bad_decompose_options(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        cj.decompose(GOOD, **kwargs)


def test_mismatched_lora_factors():
    b = jnp.zeros((6, 5, 2))
    with pytest.raises(ValueError, match="LoRA rank mismatch"):
        cj.clair(cj.LoRAFactors(b, jnp.zeros((6, 3, 4))))
    with pytest.raises(ValueError, match="leading"):
        cj.clair(cj.LoRAFactors(b, jnp.zeros((7, 2, 4))))
    with pytest.raises(TypeError, match="floating"):
        cj.clair(cj.LoRAFactors(b.astype(jnp.int32), jnp.zeros((6, 2, 4), jnp.int32)))
    with pytest.raises(TypeError, match="same dtype"):
        cj.clair(cj.LoRAFactors(b.astype(jnp.float32), jnp.zeros((6, 2, 4), jnp.float64)))


def test_bad_federation_options():
    with pytest.raises(ValueError, match="kind"):
        cj.data.make_federation(0, kind="zombie")
    with pytest.raises(ValueError, match="contamination"):
        cj.data.make_federation(0, contamination=1.0)
    with pytest.raises(ValueError, match="rank"):
        cj.data.make_federation(0, p=4, q=1, num_clients=2, rank=5)
