"""The verdict contract: every client is "benign", "noisy" (honest but noisier) or "contaminated".

An honest client whose update is the shared signal plus several times more
noise than the rest is kept out of Û but is not accused: its status is
"noisy", it gets its refined update (the projection onto Û) in the core, in
``clair aggregate`` and in ``ClairStrategy``. Federations: the K = 40, p = 64,
q = 16, r = 4 shape of the other tests (compiled once), with a share of the
honest clients carrying ``factor``× the others' noise.
"""

import json
import os
import sys

import numpy as np
import pytest

import clair_jax as cj

sys.path.insert(0, os.path.dirname(__file__))
from adapter_fixtures import config_for, module_names, shapes_for, write_client  # noqa: E402


def noisy_federation(seed, frac, factor, contamination=0.0, kind="full_rank"):
    """make_federation with ``frac`` of the honest clients ``factor``× noisier."""
    fed = cj.data.make_federation(seed, contamination=contamination, kind=kind)
    rng = np.random.default_rng(1000 + seed)
    honest = np.asarray(fed.benign)
    loud = rng.choice(np.flatnonzero(honest), int(round(frac * honest.sum())), replace=False)
    clean = np.asarray(fed.clean, np.float64)
    updates = np.asarray(fed.updates, np.float64)
    updates[loud] = clean[loud] + factor * (updates[loud] - clean[loud])
    noisy = np.zeros(len(updates), bool)
    noisy[loud] = True
    return updates.astype(np.float32), clean, honest, noisy


def _errors(est, clean):
    return np.linalg.norm((np.asarray(est, np.float64) - clean).reshape(len(clean), -1), axis=1)


@pytest.mark.parametrize("frac,factor,contamination", [(0.1, 10, 0.0), (0.3, 3, 0.0), (0.2, 5, 0.3)])
def test_noisy_honest_clients_are_refined_and_not_accused(frac, factor, contamination):
    updates, clean, honest, noisy = noisy_federation(0, frac, factor, contamination)
    res = cj.clair(updates)
    status = np.array(res.statuses())
    assert not np.any(status[honest] == "contaminated")
    assert np.all(status[noisy] == "noisy")
    assert np.all(status[~honest] == "contaminated")                   # full-rank attackers
    np.testing.assert_array_equal(res.contaminated(), ~honest)
    # A noisy client never enters Û: it is outside the collaborative set.
    assert not np.any(np.asarray(res.client_benign)[noisy])
    # ... and its refined update is no worse than its own (here: far better).
    refined, local = _errors(res.refined, clean), _errors(updates, clean)
    assert np.all(refined[noisy] <= local[noisy])
    assert f"flagged contaminated: {int((~honest).sum())} " in res.summary()
    assert "honest but noisy" in res.summary()
    # The same status pooled from results (pool_verdicts) and the int codes.
    pooled = cj.pool_verdicts([res])
    np.testing.assert_array_equal(np.asarray(pooled.status), np.asarray(res.client_status))
    assert res.client_status.dtype == np.int8 and cj.pool.STATUSES[cj.pool.NOISY] == "noisy"


def test_status_pools_over_problems():
    """A client noise-like in one problem but not another is contaminated (contamination
    confined to one problem is structured there); problems without a subspace do not count."""
    benign = np.array([True, False, False, False])
    noisy = np.array([[False, True, True, False], [False, True, False, False]])
    status = cj.pool.status_names(cj.pool.client_status(benign, noisy, np.array([2, 2])))
    assert status == ["benign", "noisy", "contaminated", "contaminated"]
    status = cj.pool.status_names(cj.pool.client_status(benign, noisy, np.array([2, 0])))
    assert status == ["benign", "noisy", "noisy", "contaminated"]
    assert cj.pool.status_names(cj.pool.client_status(benign, noisy, np.array([0, 0]))) == \
        ["benign", "contaminated", "contaminated", "contaminated"]


# ---------------------------------------------------------------- clair aggregate

NAMES = [n for n in module_names(2) if n.endswith(("q_proj", "o_proj"))]
SHAPES = shapes_for(NAMES, d=64)


def write_noisy_federation(root, *, clients=10, loud=(3, 7), factor=5.0, poisoned=(0,), sigma=0.05, seed=0):
    """LoRA adapters B_k = U G_k + σE_k (× ``factor`` for the loud clients), A_k random;
    poisoned clients have a random B. Returns (dirs, {(k, module): clean ΔW})."""
    rng = np.random.default_rng(seed)
    us = {m: np.linalg.qr(rng.standard_normal((SHAPES[m][0], 2)))[0] for m in NAMES}
    dirs, clean = [], {}
    for k in range(clients):
        facs = {}
        for m in NAMES:
            p, q = SHAPES[m]
            a = rng.standard_normal((4, q)) / np.sqrt(q)
            b0 = rng.standard_normal((p, 4)) if k in poisoned else us[m] @ rng.standard_normal((2, 4))
            b = b0 + (factor if k in loud else 1.0) * sigma * rng.standard_normal((p, 4))
            facs[m] = (b, a)
            clean[(k, m)] = b0 @ a
        dirs.append(write_client(os.path.join(root, f"client{k:02d}"), config_for(), facs))
    return dirs, clean


def test_aggregate_writes_an_adapter_for_every_noisy_honest_client(tmp_path, capsys):
    from safetensors.numpy import load_file

    from clair_jax.adapters import load_federation
    from clair_jax.cli import main

    dirs, clean = write_noisy_federation(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["aggregate", *dirs, "--out", str(out), "--json", str(tmp_path / "r.json"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    status = [c["status"] for c in report["clients"]]
    assert status == ["contaminated"] + ["noisy" if k in (3, 7) else "benign" for k in range(1, 10)]
    assert [c["output"] is not None for c in report["clients"]] == [s != "contaminated" for s in status]
    assert not report["clients"][3]["benign"] and report["clients"][3]["local_modules"] == 0
    table = {line.split()[0]: line.split()[1] for line in printed.splitlines()[1:11]}
    assert table["client03"] == "noisy" and table["client00"] == "contaminated"
    (summary,) = [line for line in printed.splitlines() if "refined adapter(s) written" in line]
    assert "honest but noisy" in summary and "client03, client07" in summary and "no output: client00" in summary
    # The noisy clients' refined ΔW is closer to their clean ΔW than their own.
    fed = load_federation(dirs)
    for k in (3, 7):
        client = fed.clients[k]
        written = load_file(os.path.join(out, client.name, "adapter_model.safetensors"))
        own = load_file(client.weights_path)
        for m in NAMES:
            e = client.modules[m]
            dw = lambda t: t[e.key_b].astype(np.float64) * e.scaling @ t[e.key_a].astype(np.float64)  # noqa: E731
            assert np.linalg.norm(dw(written) - clean[(k, m)]) < np.linalg.norm(dw(own) - clean[(k, m)])


# ---------------------------------------------------------------- Flower

def test_flower_sends_noisy_nodes_their_refined_adapter():
    pytest.importorskip("flwr")
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    import test_flower as tf
    from clair_jax.flower import ClairStrategy

    try:
        from flwr.supercore.task_identity import TaskIdentity
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    except ImportError:
        pass

    def loud(seed):
        def client(msg):
            if msg.metadata.message_type.startswith("evaluate"):
                return RecordDict({"metrics": MetricRecord({"num-examples": 10, "loss": 1.0})})
            return tf.reply(tf.adapter(seed + 100 * int(msg.content["config"]["server-round"]), noise=0.5), 10)
        return client

    nodes = tf.NODES
    grid = tf.LocalGrid({nodes[i]: (loud(i) if i in (4, 5) else tf.honest(i)) for i in range(8)})
    strategy = ClairStrategy(min_available_nodes=8, flagged_nodes="exclude")
    replies, (global_arrays, metrics) = tf.one_round(strategy, grid)
    assert [strategy.history[n][-1].status for n in nodes] == ["benign"] * 4 + ["noisy"] * 2 + ["benign"] * 2
    assert metrics["clair-flagged"] == 0 and metrics["clair-noisy"] == 2
    assert not any(strategy.is_flagged(n) for n in nodes)
    assert not strategy.history[nodes[4]][-1].benign                  # out of Û and of the FedAvg
    expected = tf.fedavg([r for r in replies if nodes.index(r.metadata.src_node_id) not in (4, 5)])
    for key, value in expected.items():
        np.testing.assert_allclose(global_arrays[key].numpy(), value, rtol=1e-5, atol=1e-6)
    sent = {r.metadata.src_node_id: r.content["arrays"] for r in replies}
    payload = {m.metadata.dst_node_id: m.content["arrays"]
               for m in strategy.configure_train(2, global_arrays, ConfigRecord(), grid)}
    assert set(payload) == set(nodes)                                   # nobody left out
    for i in (4, 5):
        for j, m in enumerate(tf.MODULES):
            u = tf.shared_basis(j)
            own_b = sent[nodes[i]][f"{m}.lora_B.weight"].numpy()
            got_b = payload[nodes[i]][f"{m}.lora_B.weight"].numpy()
            assert not np.array_equal(got_b, global_arrays[f"{m}.lora_B.weight"].numpy())
            signal = u @ u.T @ own_b
            assert np.linalg.norm(got_b - signal) < 0.5 * np.linalg.norm(own_b - signal)


def test_copies_of_an_honest_update_accuse_no_one_and_copies_of_an_attack_are_accused():
    """Issue 30: an honest client whose copies carry lower numbers was accused with
    them (the copies cannot be told from their original). Copies now follow the
    noise-like rule: those of an honest update are served, those of an attack not."""
    fed = cj.data.make_federation(11, contamination=0.2)      # the default shapes: programs already compiled
    x = np.array(fed.updates, np.float32)
    benign = np.array(fed.benign)
    honest = np.flatnonzero(benign)
    original = honest[-1]
    copiers = honest[:6]                      # lower-numbered than the original
    x[copiers] = x[original]
    attacker = np.flatnonzero(~benign)[0]
    attack_copiers = np.flatnonzero(~benign)[1:3]
    x[attack_copiers] = x[attacker]
    res = cj.clair(x)
    status = np.array(res.statuses())
    copies = np.asarray(res.copies).reshape(-1, len(x)).any(axis=0)
    assert copies[np.r_[copiers[1:], original]].all()    # all but the group's first are counted once
    assert not (status[np.r_[copiers, original]] == "contaminated").any(), status
    assert (status[honest] != "contaminated").all(), status
    assert (status[np.r_[attacker, attack_copiers]] == "contaminated").all(), status
