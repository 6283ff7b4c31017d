"""Red-team classes of issue 30, each on a federation unlike the zoo's row that found it.

The zoo (benchmarks/adversarial.py) found them on its dense K = 40 case with
Gaussian attackers; here: the doctests' small federation (K = 12, p = 10, q = 3,
r = 2, compiled once for the whole suite) with rank-one attackers, and LoRA factors.
"""

import warnings

import numpy as np
import pytest

import clair_jax as cj


def small_federation(kind="rank_one"):
    return cj.data.make_federation(0, num_clients=12, p=10, q=3, rank=2, contamination=0.25, kind=kind)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(*args, **kwargs)


@pytest.mark.parametrize("case", ["all x1e19", "all x1e30", "one client x1e30", "lora x1e15 (ΔW x1e30)"])
def test_no_result_reports_converged_with_a_nonfinite_field(case):
    fed = small_federation()
    x = np.asarray(fed.updates, np.float32)
    reference = _quiet(cj.clair, x)
    if case.startswith("all"):
        scale = np.float32(1e19 if "1e19" in case else 1e30)
        res = _quiet(cj.clair, x * scale)
    elif case.startswith("one"):
        y = x.copy()
        y[0] *= np.float32(1e30)
        res = _quiet(cj.clair, y)
    else:
        u, s, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
        b = (u * np.sqrt(s)[..., None, :] * 1e15).astype(np.float32)
        a = (np.sqrt(s)[..., :, None] * vt * 1e15).astype(np.float32)
        res = _quiet(cj.clair, cj.LoRAFactors(b, a))
    dec = res.decomposition
    converged = np.asarray(res.converged)
    finite = np.isfinite(np.asarray(dec.objective, np.float64)) & \
        np.all(np.isfinite(np.asarray(dec.block_norms, np.float64)), axis=-1)
    assert not np.any(converged & ~finite)                                    # the promise
    assert np.all(np.isfinite(np.asarray(dec.block_norms, np.float64)))       # norms rescaled: finite
    assert np.all(np.isfinite(np.asarray(res.client_z, np.float64)))
    if not case.startswith("one"):       # scale changes no verdict
        np.testing.assert_array_equal(np.asarray(res.client_benign), np.asarray(reference.client_benign))
        np.testing.assert_array_equal(np.asarray(res.client_benign), np.asarray(fed.benign))
    else:                                # the outsized client is out of the set; the others as before
        np.testing.assert_array_equal(np.asarray(res.client_benign)[1:], np.asarray(reference.client_benign)[1:])
    if not converged.all():
        assert "overflows the dtype" in res.summary()


@pytest.mark.parametrize("kind", ["dense", "one nan per client", "lora", "groups"])
def test_no_finite_client_is_an_error_naming_the_argument(kind):
    x = np.full((12, 10, 3), np.nan, np.float32)
    name = "updates"
    if kind == "one nan per client":
        x = np.asarray(small_federation().updates, np.float32).copy()
        x[np.arange(12), np.arange(12) % 10, 0] = np.inf
    with pytest.raises(ValueError, match="no client has finite data") as err:
        if kind == "lora":
            cj.clair(cj.LoRAFactors(np.full((12, 10, 2), np.nan, np.float32), np.ones((12, 2, 3), np.float32)))
        elif kind == "groups":
            name = "groups"
            cj.clair_groups([x, x[..., :2]])
        else:
            cj.clair(x)
    assert str(err.value).startswith(name + ":")
