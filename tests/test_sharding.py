"""Sharding the layer axis: same results as the single-device vmapped path.

The multi-device check runs in a subprocess because the host device count must be
fixed before JAX initialises.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clair_jax import sharding  # noqa: E402


def test_pad_layers_repeats_last():
    x = jnp.arange(5.0)[:, None]
    padded = sharding.pad_layers(x, 4)
    assert padded.shape == (8, 1)
    np.testing.assert_array_equal(padded[5:, 0], [4.0, 4.0, 4.0])


def test_single_device_is_plain_jit():
    f = sharding.map_over_layers(lambda a: jnp.sum(a**2), sharding.layer_mesh(jax.devices()[:1]))
    np.testing.assert_allclose(f(jnp.ones((3, 2, 2))), [4.0, 4.0, 4.0])


def _solve_until_small(x):
    """A per-problem while_loop whose trip count depends on the data (as the solvers' do)."""
    def body(c):
        y, n = c
        return 0.5 * y + 0.1 * jnp.tanh(y), n + 1
    y, n = jax.lax.while_loop(lambda c: jnp.max(jnp.abs(c[0])) > 1e-3, body, (x, jnp.asarray(0)))
    return {"y": y, "steps": n}


def test_over_problems_chunks_equal_a_python_loop():
    # 7 problems in chunks of 3 (the last chunk padded): every problem stops at its own
    # step count, as one after another, and the pytree comes back in order.
    x = jnp.asarray(np.random.default_rng(0).standard_normal((7, 4, 3)) * np.logspace(0, 3, 7)[:, None, None],
                    jnp.float32)
    loop = [_solve_until_small(a) for a in x]
    for how, batch in [("chunks", 3), ("chunks", 1), ("chunks", 7), ("chunks", 16), ("map", None), ("vmap", None)]:
        out = jax.jit(sharding.over_problems(_solve_until_small, how, batch=batch))(x)
        assert out["y"].shape == x.shape
        np.testing.assert_array_equal(out["steps"], [o["steps"] for o in loop])
        np.testing.assert_allclose(out["y"], np.stack([o["y"] for o in loop]), rtol=1e-6, atol=1e-12)
    assert len(set(np.asarray(out["steps"]).tolist())) > 1   # the members did stop at different steps


def test_over_problems_checks_its_options():
    with pytest.raises(ValueError, match="how must be"):
        sharding.over_problems(jnp.sum, "batched")
    for batch in (None, 0, 2.5):
        with pytest.raises(ValueError, match="batch"):
            sharding.over_problems(jnp.sum, "chunks", batch=batch)


SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    sys.path.insert(0, {root!r})
    import jax, jax.numpy as jnp, numpy as np
    from benchmarks._common import make_blocks
    from clair_jax import sharding
    from clair_jax.solvers import solve_exact
    from clair_jax.stack import to_stacked

    assert len(jax.devices()) == 4, jax.devices()

    def one(x):
        s = jnp.linalg.norm(to_stacked(x), ord=2)
        out = solve_exact(x / s, 0.7, tol=3e-6, max_iter=500)
        return out._replace(low_rank=out.low_rank * s, sparse=out.sparse * s,
                            objective=out.objective * s)

    blocks, benign = make_blocks(0, 12, 24, 6, rank=2, layers=6, noise=0.0)
    blocks = jnp.asarray(blocks)
    dense = jax.jit(jax.vmap(one))(blocks)
    mesh = sharding.layer_mesh()
    sharded_fn = sharding.map_over_layers(one, mesh)
    shard = sharded_fn(blocks)
    # The computation really is split: the compiled program holds a 2-problem shard per device.
    hlo = sharded_fn.lower(blocks).compile().as_text()
    assert "f32[2,12,24,6]" in hlo, "expected per-device shards of 2 layers"
    np.testing.assert_allclose(shard.objective, dense.objective, rtol=1e-5)
    # float32 reductions may be ordered differently once the batch is split, which can move
    # a stopping test by one iteration; the optimum and the verdicts must not move.
    assert np.abs(np.asarray(shard.iterations) - np.asarray(dense.iterations)).max() <= 2
    verdict = lambda o: np.linalg.norm(np.asarray(o.sparse), axis=(-2, -1)) > 1e-3
    np.testing.assert_array_equal(verdict(shard), verdict(dense))
    assert (verdict(shard) == ~benign).all()
    np.testing.assert_allclose(shard.low_rank, dense.low_rank, atol=1e-5)

    # The size that hung XLA:CPU with per-device vmap (4 problems of 64 × 512 per
    # device, 2 devices): per-device lax.map runs it.
    big, big_benign = make_blocks(0, 32, 64, 16, rank=4, layers=8, noise=0.0)
    two = sharding.map_over_layers(one, sharding.layer_mesh(jax.devices()[:2]))
    out = two(jnp.asarray(big))
    assert bool(np.all(out.converged))
    assert (verdict(out) == ~big_benign).all()
    print("OK")
    """
)


def test_sharded_equals_dense_on_4_host_devices():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(root=str(ROOT))],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout


@pytest.mark.slow   # recompiles the pipeline after clearing the caches; CPU runs one problem at a time (the chunk map itself is tested above)
def test_detection_in_chunks_of_vmapped_problems_gives_the_same_answer(monkeypatch):
    # detect.PROBLEM_BATCH: 3 problems in chunks of 2 (the last padded) against one at a time.
    import clair_jax as cj
    from clair_jax import detect

    feds = [cj.data.make_federation(seed, num_clients=12, p=16, q=4, rank=2, contamination=0.25, noise=0.05)
            for seed in (0, 1, 2)]
    updates = jnp.stack([f.updates for f in feds])
    one = cj.clair(updates)
    monkeypatch.setitem(detect.PROBLEM_BATCH, jax.default_backend(), 2)
    jax.clear_caches()
    chunked = cj.clair(updates)
    np.testing.assert_array_equal(chunked.client_benign, one.client_benign)
    np.testing.assert_array_equal(chunked.rank, one.rank)
    np.testing.assert_allclose(chunked.refined, one.refined, rtol=1e-5, atol=1e-6)


def test_chunks_carry_an_empty_leaf():
    # A zero-width leaf (the detection's carried basis when it holds no vectors) beside
    # real ones: chunks of vmapped problems give what one problem at a time gives.
    x = jnp.arange(10.0).reshape(5, 2)
    empty = jnp.zeros((5, 3, 0))

    def fn(a, e):
        return jnp.sum(a) + e.shape[-1] + jnp.sum(e), 2 * e   # an empty output too

    chunked = sharding.over_problems(fn, "chunks", batch=2)(x, empty)
    one_by_one = sharding.over_problems(fn, "map")(x, empty)
    np.testing.assert_array_equal(np.asarray(chunked[0]), np.asarray(one_by_one[0]))
    assert chunked[1].shape == one_by_one[1].shape == (5, 3, 0)
