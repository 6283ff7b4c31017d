"""Several of CLAIR's programs at once on the CPU (lanes): same answers, order kept, errors
raised, no lanes inside lanes, and the detection compiled ahead compiles nothing more."""

import logging
import threading
import time

import jax
import numpy as np
import pytest

import clair_jax as cj
from clair_jax import _compile, detect, stack


@pytest.fixture
def one_lane(monkeypatch):
    """Every stage one program after another (a pool of one thread allows one lane)."""
    def use():
        monkeypatch.setattr(_compile, "_POOL", 1)
    return use


def _need_lanes():
    if _compile.host_lanes("cpu") < 2:
        pytest.skip("one lane on this machine (one core, or JAX started before clair_jax was imported)")


def test_the_pool_leaves_room_for_every_lane():
    # A waiting program holds one pool thread: lanes must stay below the pool's size.
    assert 1 <= _compile.host_lanes("cpu") <= max(1, _compile._POOL // 2)
    assert _compile.host_lanes("gpu") == 1


def test_lanes_give_the_one_lane_answer_dense(one_lane):
    _need_lanes()
    assert detect._lane_plan(16, "cpu") == (2, 2) or _compile.host_lanes("cpu") > 2   # lanes do run here
    fed = cj.data.make_federation(0, num_clients=16, p=12, q=4, rank=2, contamination=0.25, num_layers=16)
    updates = np.asarray(fed.updates)
    in_lanes = cj.clair(updates)
    assert bool((in_lanes.client_benign == fed.benign).all()) and bool((in_lanes.rank == 2).all())
    one_lane()
    alone = cj.clair(updates)
    np.testing.assert_array_equal(in_lanes.client_benign, alone.client_benign)
    np.testing.assert_array_equal(in_lanes.rank, alone.rank)
    np.testing.assert_array_equal(in_lanes.decomposition.iterations, alone.decomposition.iterations)
    np.testing.assert_allclose(in_lanes.refined, alone.refined, rtol=0, atol=1e-12)


def test_lanes_give_the_one_lane_answer_for_host_factors(one_lane, monkeypatch):
    # numpy LoRA factors go to the device in chunks (several per lane here) in stages 2 and 6.
    _need_lanes()
    rng = np.random.default_rng(3)
    n, k, p, r, q = 16, 10, 24, 2, 20
    shared = np.linalg.qr(rng.standard_normal((p, r)))[0]
    b = np.einsum("pr,nkrs->nkps", shared, rng.standard_normal((n, k, r, r))).astype(np.float32)
    b[:, :2] = rng.standard_normal((n, 2, p, r))        # two clients off the shared subspace
    b += 0.01 * rng.standard_normal(b.shape).astype(np.float32)
    a = rng.standard_normal((n, k, r, q)).astype(np.float32)
    monkeypatch.setattr(stack, "CHUNK_BYTES", 4 * (b[0].nbytes + a[0].nbytes))
    in_lanes = cj.clair(cj.LoRAFactors(b, a))
    one_lane()
    alone = cj.clair(cj.LoRAFactors(b, a))
    assert not bool(in_lanes.client_benign[:2].any()) and bool(in_lanes.client_benign[2:].all())
    np.testing.assert_array_equal(in_lanes.client_benign, alone.client_benign)
    np.testing.assert_array_equal(in_lanes.rank, alone.rank)
    np.testing.assert_allclose(in_lanes.refined.B, alone.refined.B, rtol=0, atol=1e-6)


def test_in_lanes_keeps_order_runs_at_once_and_raises():
    seen = set()

    def slow_square(x):
        seen.add(threading.current_thread().name)
        time.sleep(0.05)
        return x * x

    assert _compile.in_lanes(slow_square, range(6), 3) == [0, 1, 4, 9, 16, 25]
    assert len(seen) == 3 and all(name.startswith("clair-lane") for name in seen)

    def nested(x):   # lanes inside a lane run in that lane
        return {threading.current_thread().name for _ in _compile.in_lanes(lambda y: y, range(4), 3)}

    for names in _compile.in_lanes(nested, range(2), 2):
        assert len(names) == 1

    def fails(x):
        if x == 2:
            raise ValueError("client 2")
        return x

    with pytest.raises(ValueError, match="client 2"):
        _compile.in_lanes(fails, range(4), 2)


def test_compiled_ahead_the_detection_compiles_nothing_more(caplog):
    rng = np.random.default_rng(5)
    b = rng.standard_normal((3, 8, 40, 3)).astype(np.float32)   # a shape no other test uses
    a = rng.standard_normal((3, 8, 3, 36)).astype(np.float32)
    factors = cj.LoRAFactors(b, a)
    options = cj.ClairOptions.checked()
    detect.compile_ahead(*stack.problem_shape(factors, "left"), options)
    problems = stack.problems(factors, "left")
    assert problems.blocks.shape == stack.problem_shape(factors, "left")[0]
    with jax.log_compiles(True), caplog.at_level(logging.DEBUG, logger="jax"):
        detect.until_settled(problems, options)
    compiled = [r.getMessage() for r in caplog.records if "_pass_all" in r.getMessage()
                or "_prepare_all" in r.getMessage()]
    assert compiled == []
