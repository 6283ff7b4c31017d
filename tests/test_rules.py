"""Rules of docs/method.md's table that no other test file shows on its own."""

import jax
import jax.numpy as jnp
import numpy as np

import clair_jax as cj
from clair_jax import basis, detect


def test_the_screen_tolerance_gives_the_verdict_of_a_tight_solve():
    # float32: the λ path is solved to SCREEN_TOL unless ``tol`` is given.
    assert detect.SCREEN_TOL == 1e-4
    fed = cj.data.make_federation(3, num_clients=16, p=12, q=4, rank=2, contamination=0.25, noise=0.15,
                                  dtype=jnp.float32)
    screen = cj.clair(fed.updates)
    tight = cj.clair(fed.updates, tol=1e-6)
    np.testing.assert_array_equal(np.asarray(screen.benign), np.asarray(fed.benign))
    np.testing.assert_array_equal(np.asarray(screen.benign), np.asarray(tight.benign))
    assert int(screen.rank) == int(tight.rank) == 2
    np.testing.assert_allclose(np.asarray(screen.scores), np.asarray(tight.scores), atol=5e-3)


def test_majority_check_takes_a_rank_above_its_limit_as_is():
    rng = np.random.default_rng(0)
    r = basis.MAJORITY_MAX_RANK + 1
    k, p, q = 12, 40, 4
    u = np.linalg.qr(rng.normal(size=(p, r)))[0]
    blocks = jnp.asarray(rng.normal(size=(k, p, q)))
    everyone = jnp.ones(k, bool)
    kept, rank = jax.jit(basis.majority_basis)(jnp.asarray(u), r, blocks, everyone, p, rel_floor=1e-10)
    assert int(rank) == r
    np.testing.assert_array_equal(np.asarray(kept), u)


def test_a_second_pass_runs_while_the_benign_stack_moves_mu():
    # 45 % mixed contamination at high noise: the benign stack's σ̂ gives a μ more than
    # STACK_NOISE_RATIO away from the clients' median one, so detection runs again at it.
    from clair_jax import stack
    from clair_jax.options import ClairOptions

    opts = ClairOptions.checked()
    fed = cj.data.make_federation(0, num_clients=16, p=12, q=4, rank=2, noise=0.33, contamination=0.45, kind="mixed")
    assert 1 < detect.until_settled(stack.problems(fed.updates, "left"), opts).passes <= detect.MAX_PASSES
