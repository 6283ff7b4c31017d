"""cj.clair(..., devices=...): problems split over devices give the single-device results.

Host devices must be fixed before JAX initialises, so each check runs in a subprocess.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest

import clair_jax as cj

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count={n}"
    sys.path.insert(0, {root!r})
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    import clair_jax as cj
    assert len(jax.devices()) == {n}
    fed = cj.data.make_federation(0, num_clients=14, p=12, q=4, rank=2, contamination=0.25, noise=0.1)
    dense = fed.updates[None] * jnp.linspace(0.5, 2.0, 5)[:, None, None, None]      # 5 layers: uneven chunks
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((20, 2)))[0]
    b = np.einsum("pr,lkrs->lkps", basis, rng.standard_normal((3, 14, 2, 3)))
    b[:, :3] = rng.standard_normal((3, 3, 20, 3))
    lora = cj.LoRAFactors(jnp.asarray(b), jnp.asarray(rng.standard_normal((3, 14, 3, 6))))
    for one, many in zip(cj.clair_groups([dense, lora]), cj.clair_groups([dense, lora], devices=jax.devices())):
        np.testing.assert_array_equal(np.asarray(one.benign), np.asarray(many.benign))
        np.testing.assert_array_equal(np.asarray(one.client_benign), np.asarray(many.client_benign))
        np.testing.assert_array_equal(np.asarray(one.rank), np.asarray(many.rank))
        for a, c in zip(jax.tree_util.tree_leaves(one.refined), jax.tree_util.tree_leaves(many.refined)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-7, atol=1e-10)
    assert not bool(many.client_benign[:3].any())
    print("OK")
    """
)


@pytest.mark.slow   # a fresh process per device count (~50 s of compilation on 2 cores); the argument checks below stay fast
@pytest.mark.parametrize("n", [2, 4])
def test_devices_give_single_device_results(n):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(n=n, root=str(ROOT))], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_devices_argument_is_checked():
    # The shape of the other float32 tests (tests/test_clair.py): its programs compile once.
    fed = cj.data.make_federation(0, num_clients=16, p=12, q=4, rank=2)
    with pytest.raises(TypeError, match="devices"):
        cj.clair(fed.updates, devices=["cpu:0"])
    with pytest.raises(ValueError, match="distinct"):
        cj.clair(fed.updates, devices=[jax.devices()[0]] * 2)
    res = cj.clair(fed.updates, devices=jax.devices()[:1])
    assert res.client_benign.shape == (16,)
