"""The Transformer LoRA text-copying experiment (issue 4)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clair_jax.experiments import copy_task as ct
from clair_jax.experiments import transformer as tfm

SMALL = ct.QUICK._replace(d_model=32, n_heads=2, d_mlp=64, client_train=6, client_test=32)


@pytest.fixture(scope="module")
def base_model():
    """The quick-configuration base model (trained once for the module)."""
    params, losses = ct.train_base(jax.random.key(0), ct.QUICK)
    return params, losses


def _identity_copies(cfg, n, seed=1):
    identity = jnp.arange(cfg.n_tokens + 1, dtype=jnp.int32)
    return ct.make_sequences(jax.random.key(seed), identity, jnp.int32(ct.KIND_MAP), n, cfg)


def test_base_model_learns_to_copy(base_model):
    params, losses = base_model
    cfg = ct.QUICK
    untrained = ct.evaluate(tfm.init_params(jax.random.key(0), cfg.model), _identity_copies(cfg, 256), cfg)
    scores = ct.evaluate(params, _identity_copies(cfg, 256), cfg)
    chance = 1.0 / cfg.n_tokens
    assert float(untrained["token_accuracy"]) < 3 * chance
    assert float(scores["token_accuracy"]) > 0.95, scores
    assert float(scores["exact_match"]) > 0.8, scores
    assert float(losses[-1]) < 0.1 * float(losses[0])


def test_sequences_follow_their_task():
    cfg = SMALL
    mapping = jnp.arange(cfg.n_tokens + 1, dtype=jnp.int32).at[0].set(1).at[1].set(0)
    key = jax.random.key(3)
    seqs = {kind: ct.make_sequences(key, mapping, jnp.int32(kind), 8, cfg) for kind in range(4)}
    L = cfg.seq_len
    x = seqs[ct.KIND_MAP][:, :L]
    for kind, s in seqs.items():
        assert s.shape == (8, 2 * L + 1)
        np.testing.assert_array_equal(s[:, :L], x)  # same key → same prompts
        assert np.all(s[:, L] == cfg.separator)
    np.testing.assert_array_equal(seqs[ct.KIND_MAP][:, L + 1 :], mapping[x])
    np.testing.assert_array_equal(seqs[ct.KIND_REVERSE][:, L + 1 :], x[:, ::-1])
    np.testing.assert_array_equal(seqs[ct.KIND_SHIFT][:, L + 1 :], jnp.roll(x, -1, axis=1))
    noisy = ct.make_sequences(key, mapping, jnp.int32(ct.KIND_MAP), 400, cfg, label_noise=0.5)
    clean = ct.make_sequences(key, mapping, jnp.int32(ct.KIND_MAP), 400, cfg)
    flipped = np.mean(np.asarray(noisy != clean))
    assert 0.15 < flipped < 0.35  # 0.5 · (1 − 1/16) of the target half, diluted by the prompt half


def test_federation_structure():
    cfg = ct.DEFAULT
    fed = ct.make_federation(cfg, 20, 0.3, seed=4)
    assert fed.benign.sum() == 14 and len(fed.labels) == 20
    active = np.arange(cfg.n_active)
    others = np.arange(cfg.n_active, cfg.n_tokens + 1)
    for k in np.flatnonzero(fed.benign):
        m = np.asarray(fed.mapping[k])
        assert sorted(m[active]) == list(active) and np.any(m[active] != active)
        np.testing.assert_array_equal(m[others], others)
    assert set(np.array(fed.labels)[~fed.benign]) == set(ct.CONTAMINATION_KINDS)


@pytest.mark.parametrize(
    "kwargs",
    [dict(clients=1, contamination=0.3, seed=0), dict(clients=10, contamination=1.2, seed=0)],
)
def test_make_federation_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ct.make_federation(ct.DEFAULT, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [dict(clients=2), dict(contamination=0.7), dict(contamination=-0.1), dict(seed=-1), dict(clients=10.5)],
)
def test_run_copy_task_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ct.run_copy_task(progress=False, **kwargs)


def test_run_copy_task_rejects_bad_config():
    with pytest.raises(ValueError, match="label_noise"):
        ct.run_copy_task(progress=False, config=ct.QUICK._replace(label_noise=1.5))
    with pytest.raises(ValueError, match="client_steps"):
        ct.run_copy_task(progress=False, config=ct.QUICK._replace(client_steps=0))


def test_lora_with_zero_b_leaves_outputs_unchanged():
    cfg = SMALL
    params = tfm.init_params(jax.random.key(0), cfg.model)
    tokens = _identity_copies(cfg, 4)[:, :-1]
    adapter = tfm.init_lora(jax.random.key(1), cfg.model, cfg.lora)
    assert np.all(np.asarray(adapter["B"]) == 0) and np.any(np.asarray(adapter["A"]) != 0)
    forward = jax.jit(tfm.forward, static_argnums=2)
    plain = forward(params, tokens, cfg.model)
    adapted = forward(params, tokens, cfg.model, tfm.lora_deltas(adapter, cfg.lora))
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(adapted))
    # and a non-zero B does change them (the check above can fail)
    moved = dict(adapter, B=adapter["B"] + 0.1)
    changed = forward(params, tokens, cfg.model, tfm.lora_deltas(moved, cfg.lora))
    assert float(jnp.max(jnp.abs(changed - plain))) > 1e-3


def test_lora_delta_is_scaled_product():
    cfg = SMALL._replace(lora_rank=2, lora_alpha=6.0)
    adapter = tfm.init_lora(jax.random.key(1), cfg.model, cfg.lora)
    adapter["B"] = jax.random.normal(jax.random.key(2), adapter["B"].shape)
    delta = tfm.lora_deltas(adapter, cfg.lora)
    np.testing.assert_allclose(delta[1, 2], 3.0 * adapter["B"][1, 2] @ adapter["A"][1, 2], rtol=1e-6)


@pytest.mark.slow   # trains every client twice (vmapped and in a loop)
def test_vmapped_client_training_equals_per_client_loop():
    cfg = SMALL
    base = tfm.init_params(jax.random.key(0), cfg.model)
    fed = ct.make_federation(cfg, 3, 0.34, seed=1)
    gen = jax.vmap(ct.make_sequences, in_axes=(0, 0, 0, None, None, None))
    seqs = gen(jax.random.split(jax.random.key(2), 3), fed.mapping, fed.kind, 4, cfg, 0.1)
    k = seqs.shape[0]
    # distinct adapters per client, so the check is not trivially symmetric
    adapters = {
        "B": 0.05 * jax.random.normal(jax.random.key(3), (k, cfg.n_layers, 4, cfg.d_model, cfg.lora_rank)),
        "A": 0.1 * jax.random.normal(jax.random.key(4), (k, cfg.n_layers, 4, cfg.lora_rank, cfg.d_model)),
    }
    opt = optax.adam(cfg.client_lr)
    states = jax.vmap(opt.init)(adapters)
    vstep = jax.jit(jax.vmap(ct.client_train_step, in_axes=(None, 0, 0, 0, None)), static_argnums=4)
    new_adapters, _, losses = vstep(base, adapters, states, seqs, cfg)
    step = jax.jit(ct.client_train_step, static_argnums=4)
    for i in range(k):
        one = jax.tree.map(lambda a: a[i], adapters)
        new_one, _, loss = step(base, one, opt.init(one), seqs[i], cfg)
        np.testing.assert_allclose(losses[i], loss, rtol=1e-5)
        for name in ("A", "B"):
            np.testing.assert_allclose(new_adapters[name][i], new_one[name], rtol=1e-4, atol=1e-6)
    assert not np.allclose(new_adapters["B"][0], new_adapters["B"][1])


def test_client_training_fits_private_data(base_model):
    params, _ = base_model
    cfg = ct.QUICK._replace(client_steps=40, chunk=40, label_noise=0.0)
    fed = ct.make_federation(cfg, 4, 0.0, seed=2)
    gen = jax.vmap(ct.make_sequences, in_axes=(0, 0, 0, None, None, None))
    seqs = gen(jax.random.split(jax.random.key(5), 4), fed.mapping, fed.kind, cfg.client_train, cfg, 0.0)
    adapters, losses = ct.train_clients(params, seqs, jax.random.key(6), cfg)
    assert losses.shape == (cfg.client_steps, 4)
    assert np.all(np.asarray(losses[-1]) < 0.5 * np.asarray(losses[0]))
    shared_a = np.asarray(tfm.init_lora(jax.random.key(6), cfg.model, cfg.lora)["A"])
    assert not np.allclose(np.asarray(adapters["A"][0]), shared_a)  # A is trained too


def test_module_stacking_round_trip():
    cfg = SMALL
    k = 3
    adapters = {
        "B": jax.random.normal(jax.random.key(0), (k, cfg.n_layers, 4, cfg.d_model, cfg.lora_rank)),
        "A": jax.random.normal(jax.random.key(1), (k, cfg.n_layers, 4, cfg.lora_rank, cfg.d_model)),
    }
    factors = ct.to_module_factors(adapters, cfg)
    assert factors.B.shape == (cfg.n_layers * 4, k, cfg.d_model, cfg.lora_rank)
    back = ct.to_client_deltas(factors.B @ factors.A, cfg)
    np.testing.assert_allclose(back, tfm.lora_deltas(adapters, cfg.lora), rtol=1e-5, atol=1e-5)
    names = ct.module_names(cfg)
    assert names[1] == "layer0.key" and names[4] == "layer1.query"
    np.testing.assert_allclose(factors.B[5, 2], cfg.lora.scale * adapters["B"][2, 1, 1], rtol=1e-6)


def test_oracle_subspace_spans_benign_blocks_only():
    rng = np.random.default_rng(0)
    p, q, k = 6, 3, 5
    u = np.linalg.qr(rng.normal(size=(p, 2)))[0]
    blocks = np.stack([u @ rng.normal(size=(2, q)) for _ in range(k)])
    blocks[4] = rng.normal(size=(p, q))  # contaminated
    benign = np.array([1, 1, 1, 1, 0], bool)
    basis = ct.oracle_subspace(jnp.asarray(blocks)[None], benign, jnp.array([2]))[0]
    proj = np.asarray(basis @ basis.T)
    np.testing.assert_allclose(proj, u @ u.T, atol=1e-5)


def test_detection_scores():
    truth = np.array([1, 1, 0, 0, 0], bool)
    d = ct.detection_scores(np.array([1, 0, 1, 0, 0], bool), truth)
    assert d["precision"] == 0.5 and d["recall"] == 0.5 and d["f1"] == 0.5
    assert d["false_alarms"] == 1 and d["missed"] == 1
    perfect = ct.detection_scores(truth, truth)
    assert perfect["f1"] == 1.0
    nothing = ct.detection_scores(np.zeros(5, bool), np.zeros(5, bool))
    assert nothing["precision"] == nothing["recall"] == 1.0


@pytest.mark.slow  # the quick experiment also runs in notebooks/copy_task.ipynb's test
def test_quick_experiment_cli(tmp_path, capsys):
    """The quick configuration end to end through ``clair copy-task`` (what CI runs)."""
    from clair_jax import cli

    out = tmp_path / "copy.json"
    rc = cli.main(["copy-task", "--quick", "--no-progress", "--seed", "0", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "CLAIR" in printed and "F1" in printed
    results = json.loads(out.read_text())
    k = results["clients"]
    assert len(results["client_scores"]) == k and len(results["benign"]) == k
    assert set(results["methods"]) == set(ct.METHOD_LABELS)
    assert len(results["detection"]["per_module"]) == 4 * ct.QUICK.n_layers
    n_benign = sum(results["benign"])
    for m in results["methods"].values():
        assert 0.0 <= m["token_accuracy"] <= 1.0 and 0.0 <= m["exact_match"] <= 1.0
        assert len(m["per_client"]["token_accuracy"]) == n_benign
    acc = {name: m["token_accuracy"] for name, m in results["methods"].items()}
    # fine-tuning helps the benign clients, and FedAvg cannot serve heterogeneous clients
    assert acc["local"] > acc["base"] + 0.05
    assert acc["clair"] > acc["fedavg_dw"] and acc["clair"] > acc["fedavg_ab"]
    assert results["detection"]["pooled"]["f1"] >= 0.8
    assert results["base_accuracy"]["token_accuracy"] > 0.95


def test_cli_reports_bad_arguments(capsys):
    from clair_jax import cli

    assert cli.main(["copy-task", "--quick", "--no-progress", "--clients", "2"]) == 2
    assert "clients" in capsys.readouterr().err


@pytest.mark.slow
def test_default_experiment_meets_targets():
    """The full configuration (a few minutes): the issue's targets on one seed."""
    results = ct.run_copy_task(seed=1, progress=False)
    acc = {name: m["token_accuracy"] for name, m in results["methods"].items()}
    assert acc["clair"] > acc["local"] > acc["fedavg_dw"]
    assert acc["clair"] > acc["fedavg_ab"]
    assert results["detection"]["pooled"]["f1"] >= 0.9
    assert results["detection"]["pooled"]["precision"] == 1.0
