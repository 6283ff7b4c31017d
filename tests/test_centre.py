"""Pooling toward the benign centre (``pooling="centre"``, clair_jax.centre): the
factored form equals the dense one, the James–Stein weight does what its model
says, the geometric median resists a member far away, the size model recovers
its noise, errors name the argument, and ``clair aggregate --pooling centre``
writes loadable adapters of the new rank."""

import json
import os
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

import clair_jax as cj
from clair_jax import centre
from clair_jax.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from adapter_fixtures import PREFIX, write_federation  # noqa: E402

QS = [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]


def _factors(seed, lead=(3,), k=6, p=7, q=6, r=2):
    rng = np.random.default_rng(seed)
    return cj.LoRAFactors(jnp.asarray(rng.standard_normal(lead + (k, p, r)), jnp.float32),
                          jnp.asarray(rng.standard_normal(lead + (k, r, q)), jnp.float32))


def test_factored_equals_dense_at_full_centre_rank():
    f = _factors(0)
    members = jnp.array([1, 1, 1, 0, 1, 1], bool)
    noise = np.random.default_rng(1).uniform(0, 30, (3, 6))
    dense = centre.pool_toward_centre(f.B @ f.A, members, members, update_noise=noise, floor=0.0)
    fact = centre.pool_toward_centre(f, members, members, update_noise=noise, rank=12, floor=0.0)
    assert fact.refined.B.shape == (3, 6, 7, 2 + 12) and fact.refined.A.shape == (3, 6, 2 + 12, 6)
    np.testing.assert_allclose(fact.refined.B @ fact.refined.A, dense.refined, atol=2e-4)
    np.testing.assert_allclose(fact.weight, dense.weight, atol=1e-4)
    assert float(dense.weight[:, 3].min()) == 1.0                       # not served: keeps its own
    np.testing.assert_allclose(dense.refined[:, 3], (f.B @ f.A)[:, 3], atol=1e-5)
    assert 0.0 < float(dense.weight[:, members].mean()) < 1.0


def test_weight_follows_noise_and_centre_is_a_geometric_median():
    rng = np.random.default_rng(2)
    shared = rng.standard_normal((8, 5))
    x = np.stack([shared + 0.1 * rng.standard_normal((8, 5)) for _ in range(9)]
                 + [shared + 50.0])                                      # one member far away
    members = jnp.ones(10, bool)
    g = centre.gram(jnp.asarray(x))
    w = centre.geometric_median_weights(g, members)
    c = np.einsum("k,kpq->pq", np.asarray(w), x)
    assert np.linalg.norm(c - shared) < 0.5 < 5.0 < np.linalg.norm(x.mean(0) - shared)
    dev = np.asarray(centre._distances(g, w))
    # reported noise = the whole distance → the centre (James–Stein alone); no noise → own update
    nu = np.r_[dev[:5] * 2, np.zeros(5)]
    out = centre.pool_toward_centre(jnp.asarray(x), members, members, update_noise=nu, floor=0.0)
    np.testing.assert_allclose(out.weight[:5], 0.0)
    np.testing.assert_allclose(out.weight[5:], 1.0)
    np.testing.assert_allclose(out.refined[0], c, atol=1e-4)
    np.testing.assert_allclose(out.refined[7], x[7], atol=1e-5)
    # the default floor: never more than halfway; a quarter of the distance as noise → λ = ¾
    half = centre.pool_toward_centre(jnp.asarray(x), members, members, update_noise=np.r_[nu[:9], dev[9] / 4])
    np.testing.assert_allclose(half.weight[:5], centre.OWN_FLOOR)
    np.testing.assert_allclose(half.weight[9], 0.75, rtol=1e-4)
    np.testing.assert_allclose(half.refined[0], (x[0] + c) / 2, atol=1e-4)
    # no report at all: every served client halfway
    none = centre.pool_toward_centre(jnp.asarray(x), members, members.at[0].set(False))
    np.testing.assert_allclose(none.weight, np.r_[1.0, np.full(9, 0.5)])


def test_size_model_recovers_its_noise_and_refuses_equal_sizes():
    sizes = np.array([5.0, 10, 20, 40, 80, 160])
    dev = jnp.asarray((2.0 + 30.0 / sizes)[None])                        # τ² = 2, c = 30
    nu, ok = centre.size_noise(dev, jnp.ones(6, bool), jnp.asarray(sizes))
    np.testing.assert_allclose(nu[0], 30.0 / sizes, rtol=1e-4)
    assert bool(ok.all())
    _, ok = centre.size_noise(dev, jnp.ones(6, bool), jnp.full(6, 10.0))
    assert not bool(ok.any())
    x = jnp.asarray(np.random.default_rng(3).standard_normal((6, 4, 3)))
    with pytest.warns(RuntimeWarning, match="client_sizes do not differ"):
        out = centre.pool_toward_centre(x, jnp.ones(6, bool), jnp.ones(6, bool), client_sizes=np.full(6, 10.0))
    np.testing.assert_allclose(out.weight, centre.OWN_FLOOR)                # as without a report


def test_noise_from_halves_dense_and_factored_agree():
    a, b = _factors(4), _factors(5)
    np.testing.assert_allclose(centre.noise_from_halves(a, b),
                               centre.noise_from_halves(a.B @ a.A, b.B @ b.A), rtol=1e-4)
    with pytest.raises(TypeError, match="half_a and half_b"):
        centre.noise_from_halves(a, b.B @ b.A)


def test_clair_centre_on_lora_factors(tmp_path):
    """The contaminated client keeps its update; every other client's refined update is
    C + λ(Θ̃ − C) of rank r + r_c, with λ reported as centre_weight (the adapter tests'
    federation and shapes, so the programs are compiled once)."""
    dirs, _ = write_federation(tmp_path, names=QS)
    f = cj.adapters.load_federation(dirs).factors(0)
    f = cj.LoRAFactors(jnp.asarray(f.B), jnp.asarray(f.A))
    sizes = np.arange(6) + 5.0
    (plain,) = cj.clair_groups([f])
    (res,) = cj.clair_groups([f], pooling="centre", client_sizes=sizes, centre_rank=3)
    assert res.refined.B.shape == (2, 6, 16, 4 + 3)
    lam = np.asarray(res.centre_weight)
    bad = np.asarray(res.client_status) == cj.pool.CONTAMINATED
    assert bad.any() and (lam[:, bad] == 1.0).all() and ((lam >= centre.OWN_FLOOR) & (lam <= 1)).all()
    np.testing.assert_allclose(np.asarray(res.refined.B @ res.refined.A)[:, bad],
                               np.asarray(plain.refined.B @ plain.refined.A)[:, bad], atol=1e-4)
    assert plain.centre_weight is None
    assert (np.asarray(res.client_status) == np.asarray(plain.client_status)).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(client_sizes=np.ones(12)), "pass pooling='centre'"),
    (dict(pooling="centre", client_sizes=-np.ones(12)), "client_sizes must be finite and > 0"),
    (dict(pooling="centre", update_noise=np.ones(5)), "update_noise must have shape"),
    (dict(pooling="centre", update_noise=np.r_[np.ones(11), np.nan]), "for client 11"),
])
def test_centre_errors_name_the_argument(kwargs, message):
    fed = cj.data.make_federation(0, num_clients=12, p=16, q=8, rank=2, contamination=0.25)
    with pytest.raises((ValueError, TypeError), match=message):
        cj.clair(fed.updates, **kwargs)


def test_aggregate_pooling_centre_writes_loadable_adapters(tmp_path, capsys):
    dirs, _ = write_federation(tmp_path / "in", names=QS)
    out = tmp_path / "out"
    with open(os.path.join(dirs[0], "clair_client.json"), "w") as fh:
        json.dump({"num_examples": 10}, fh)
    assert main(["aggregate", *dirs, "--out", str(out), "--pooling", "centre", "--quiet"]) == 2
    assert "clair_client.json is missing" in capsys.readouterr().err        # refused: all clients or none
    for k, d in enumerate(dirs):
        with open(os.path.join(d, "clair_client.json"), "w") as fh:
            json.dump({"num_examples": 10 + 5 * k}, fh)
    code = main(["aggregate", *dirs, "--out", str(out), "--json", str(tmp_path / "r.json"),
                 "--pooling", "centre", "--centre-rank", "3", "--global-rank", "2", "--quiet"])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    served = [c for c in report["clients"] if c["output"]]
    assert served and all(c["output_rank"] == 4 + 3 for c in served)
    fed = cj.adapters.load_federation([c["output"] for c in served])     # PEFT's rules: r matches the tensors
    assert fed.groups[0].rank == 7
    for c in served:
        cfg = json.loads(Path(c["output"], "adapter_config.json").read_text())
        assert cfg["r"] == cfg["lora_alpha"] == 7
        with safe_open(os.path.join(c["output"], "adapter_model.safetensors"), framework="numpy") as fh:
            assert fh.get_tensor(PREFIX + QS[0] + ".lora_A.weight").shape == (7, 16)
    assert os.path.isdir(report["global_adapter"]["path"])
