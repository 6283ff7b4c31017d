"""clair_jax.flower.ClairStrategy against the real flwr (Message, ArrayRecord, RecordDict, Grid).

No Ray and no mocks: an in-process ``Grid`` subclass runs plain client functions.
Every test uses 8 nodes or fewer and one module shape, so CLAIR compiles once.
"""

import itertools
import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from clair_jax.flower import ClairStrategy  # noqa: E402

P, Q, R, SHARED = 16, 12, 4, 2
MODULES = ("layers.0.q_proj", "layers.0.v_proj")
NODES = [int(x) for x in np.random.default_rng(7).integers(2, 2**63 - 1, size=8)]


@pytest.fixture(autouse=True)
def task_identity():
    """What a ServerApp runtime sets before messages are built (flwr >= 1.38 reads it)."""
    try:
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:
        yield
        return
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield


class LocalGrid(Grid):
    """Runs ``clients[node_id](message) -> RecordDict | Error`` in process; records all traffic."""

    def __init__(self, clients):
        self.clients = clients
        self.sent, self.replies = [], []
        self._ids = itertools.count(1)
        self._run = None

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self):
        return list(self.clients)

    def push_messages(self, messages):
        return [self._deliver(m) for m in messages]

    def _deliver(self, msg):
        msg.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"
        self.sent.append(msg)
        out = self.clients[msg.metadata.dst_node_id](msg)
        if out is not None:
            self.replies.append(Message(out, reply_to=msg))
        return msg.metadata.message_id

    def pull_messages(self, message_ids):
        ids = set(message_ids)
        return [r for r in self.replies if r.metadata.reply_to_message_id in ids]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def shared_basis(module=0):
    return np.linalg.qr(np.random.default_rng(module).normal(size=(P, SHARED)))[0]


def adapter(seed, poisoned=False, noise=0.1):
    """A rank-R fit (truncated SVD) of the node's target, per module.

    Benign target: U (G + ½H_seed) + noise, one column space U per module. Poisoned: the
    same plus one backdoor direction outside span(U), shared by every attacker, at
    the honest update's scale.
    """
    rng, out = np.random.default_rng(seed), {}
    for i, m in enumerate(MODULES):
        base = np.random.default_rng(100 + i)
        g, v = base.normal(size=(SHARED, Q)), base.normal(size=(P, 1)) @ base.normal(size=(1, Q))
        w = shared_basis(i) @ (g + 0.5 * rng.normal(size=(SHARED, Q)))
        y = w + noise * rng.normal(size=w.shape)
        if poisoned:
            y = y + np.linalg.norm(w) * v / np.linalg.norm(v)
        u, s, vt = np.linalg.svd(y, full_matrices=False)
        out[f"{m}.lora_A.weight"] = vt[:R].astype(np.float32)
        out[f"{m}.lora_B.weight"] = (u[:, :R] * s[:R]).astype(np.float32)
    out["head.bias"] = rng.normal(size=(4,)).astype(np.float32)
    return out


def initial_arrays():
    return ArrayRecord({k: Array(np.zeros_like(v)) for k, v in adapter(0).items()})


def reply(arrays, num_examples=10, **metrics):
    return RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
                       "metrics": MetricRecord({"num-examples": num_examples, **metrics})})


def honest(seed):
    def client(msg):
        if msg.metadata.message_type.startswith("evaluate"):
            return RecordDict({"metrics": MetricRecord({"num-examples": 10, "loss": float(seed)})})
        return reply(adapter(seed + 100 * int(msg.content["config"]["server-round"])), 10 + seed)
    return client


def attacker(seed):
    def client(msg):
        if msg.metadata.message_type.startswith("evaluate"):
            return RecordDict({"metrics": MetricRecord({"num-examples": 10, "loss": 99.0})})
        return reply(adapter(seed + 100 * int(msg.content["config"]["server-round"]), poisoned=True), 50)
    return client


def federation(poisoned=(6, 7), n=8):
    return {NODES[i]: (attacker(i) if i in poisoned else honest(i)) for i in range(n)}


def fedavg(replies):
    """Weighted per-key mean of the replies' arrays, by hand."""
    weights = np.array([r.content["metrics"]["num-examples"] for r in replies], float)
    keys = list(replies[0].content["arrays"].keys())
    return {k: sum(w * r.content["arrays"][k].numpy().astype(np.float64) for w, r in zip(weights, replies))
            / weights.sum() for k in keys}


def one_round(strategy, grid, server_round=1, arrays=None):
    arrays = initial_arrays() if arrays is None else arrays
    replies = grid.send_and_receive(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    return replies, strategy.aggregate_train(server_round, replies)


def test_import_clair_jax_does_not_import_flwr():
    code = "import sys, clair_jax; print('flwr' in sys.modules, 'clair_jax.flower' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.split() == ["False", "False"]


def test_verdicts_and_global_arrays_over_rounds():
    grid = LocalGrid(federation())
    strategy = ClairStrategy(min_available_nodes=8)
    result = strategy.start(grid=grid, initial_arrays=initial_arrays(), num_rounds=2)
    for i, node in enumerate(NODES):
        assert [v.benign for v in strategy.history[node]] == [i < 6, i < 6], i
        assert all(v.judged and v.reason == "clair" for v in strategy.history[node])
    assert result.train_metrics_clientapp[2]["clair-flagged"] == 2
    assert result.train_metrics_clientapp[2]["clair-judged"] == 8
    # The global arrays are the benign repliers' weighted FedAvg of round 2, every key.
    last = [r for r in grid.replies if r.metadata.message_type == "train"][-8:]
    expected = fedavg([r for r in last if NODES.index(r.metadata.src_node_id) < 6])
    for key, value in expected.items():
        np.testing.assert_allclose(result.arrays[key].numpy(), value, rtol=1e-5, atol=1e-6)
        assert result.arrays[key].numpy().dtype == np.float32


def test_personalised_payloads_refine_benign_nodes_only():
    grid = LocalGrid(federation())
    strategy = ClairStrategy(min_available_nodes=8)
    replies, (global_arrays, _) = one_round(strategy, grid)
    sent = {r.metadata.src_node_id: r.content["arrays"] for r in replies}
    messages = strategy.configure_train(2, global_arrays, ConfigRecord(), grid)
    assert len(messages) == 8 and len({m.metadata.dst_node_id for m in messages}) == 8
    payload = {m.metadata.dst_node_id: m.content["arrays"] for m in messages}
    refined_bs = []
    for i, node in enumerate(NODES):
        for j, m in enumerate(MODULES):
            u = shared_basis(j)
            a_key, b_key = f"{m}.lora_A.weight", f"{m}.lora_B.weight"
            got_a, got_b = payload[node][a_key].numpy(), payload[node][b_key].numpy()
            if i >= 6:  # flagged: the global arrays
                np.testing.assert_array_equal(got_b, global_arrays[b_key].numpy())
                np.testing.assert_array_equal(got_a, global_arrays[a_key].numpy())
                continue
            own_b = sent[node][b_key].numpy()
            np.testing.assert_array_equal(got_a, sent[node][a_key].numpy())  # same A
            signal = u @ u.T @ own_b
            assert np.linalg.norm(got_b - signal) < 0.5 * np.linalg.norm(own_b - signal)  # denoised
            if j == 0:
                refined_bs.append(got_b)
        np.testing.assert_array_equal(payload[node]["head.bias"].numpy(), global_arrays["head.bias"].numpy())
    # Every refined B lies in one SHARED-dimensional column space.
    sv = np.linalg.svd(np.concatenate(refined_bs, axis=1), compute_uv=False)
    assert sv[SHARED] < 1e-4 * sv[0] < sv[SHARED - 1]
    # Evaluate is personalised the same way; a new node gets the global arrays.
    evaluate = strategy.configure_evaluate(1, global_arrays, ConfigRecord(), grid)
    assert {m.metadata.dst_node_id: m.content["arrays"][f"{MODULES[0]}.lora_B.weight"].numpy().tobytes()
            for m in evaluate} == {n: a[f"{MODULES[0]}.lora_B.weight"].numpy().tobytes() for n, a in payload.items()}
    newcomer = ClairStrategy().personal_arrays(12345, global_arrays)
    assert newcomer is global_arrays
    # personalise=False sends everyone the global arrays, as FedAvg.
    strategy.personalise = False
    assert all(m.content["arrays"] is global_arrays
               for m in strategy.configure_train(2, global_arrays, ConfigRecord(), grid))


def test_flagged_nodes_can_be_left_out():
    grid = LocalGrid(federation())
    strategy = ClairStrategy(min_available_nodes=8, flagged_nodes="exclude")
    _, (global_arrays, _) = one_round(strategy, grid)
    messages = strategy.configure_train(2, global_arrays, ConfigRecord(), grid)
    assert sorted(m.metadata.dst_node_id for m in messages) == sorted(NODES[:6])


def _bad(kind):
    """A reply of node 0 that FedAvg could not aggregate, and the reason's words."""
    good = adapter(0)
    if kind == "error":
        return Error(code=1, reason="client crashed"), "error reply"
    if kind == "missing key":
        return reply({k: v for k, v in good.items() if k != "head.bias"}), "missing keys"
    if kind == "extra key":
        return reply({**good, "extra.weight": np.ones(3, np.float32)}), "extra keys"
    if kind == "shape":
        return reply({**good, f"{MODULES[0]}.lora_B.weight": np.ones((P, R + 1), np.float32)}), "shapes unlike"
    if kind == "nan":
        return reply({**good, f"{MODULES[1]}.lora_A.weight": np.full((R, Q), np.nan, np.float32)}), "NaN"
    if kind == "zero examples":
        return reply(good, num_examples=0), "> 0"
    if kind == "list examples":
        return reply(good, num_examples=[1, 2]), "one number"
    if kind == "no metrics":
        return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in good.items()})}), "MetricRecord"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["error", "missing key", "extra key", "shape", "nan", "zero examples",
                                  "list examples", "no metrics"])
def test_a_bad_reply_is_flagged_and_the_rest_aggregate(kind):
    clients = federation(poisoned=())
    bad, words = _bad(kind)
    clients[NODES[0]] = lambda msg: bad
    if kind == "error":  # an error reply is a Message carrying an Error, not content
        grid = LocalGrid(clients)
        grid._deliver = lambda msg, _orig=grid._deliver: _error_reply(grid, msg) if \
            msg.metadata.dst_node_id == NODES[0] else _orig(msg)
    else:
        grid = LocalGrid(clients)
    strategy = ClairStrategy(min_available_nodes=8)
    replies, (arrays, metrics) = one_round(strategy, grid)
    verdict = strategy.history[NODES[0]][-1]
    assert not verdict.benign and not verdict.judged and words in verdict.reason, verdict
    assert all(strategy.history[n][-1].benign for n in NODES[1:])
    assert metrics["clair-flagged"] == 1 and metrics["clair-invalid"] == 1 and metrics["clair-judged"] == 7
    expected = fedavg([r for r in replies if r.metadata.src_node_id != NODES[0]])
    for key, value in expected.items():
        np.testing.assert_allclose(arrays[key].numpy(), value, rtol=1e-5, atol=1e-6)
    if kind in ("missing key", "extra key", "list examples"):  # FedAvg sinks the whole round
        with pytest.raises(Exception, match="(?i)keys|single value"):
            FedAvg().aggregate_train(1, replies)


def _error_reply(grid, msg):
    msg.metadata.__dict__["_message_id"] = f"m{next(grid._ids)}"
    grid.sent.append(msg)
    grid.replies.append(Message(Error(code=1, reason="client crashed"), reply_to=msg))
    return msg.metadata.message_id


def test_shapes_checked_against_the_majority_without_a_template():
    strategy = ClairStrategy()
    grid = LocalGrid(federation(poisoned=()))
    messages = [Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), n, "train") for n in NODES]
    replies = grid.send_and_receive(messages)  # sent without arrays: no template
    odd = {**adapter(3), "head.bias": np.ones(5, np.float32)}
    replies[3] = Message(reply(odd), reply_to=messages[3])
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert "shapes unlike the majority's" in strategy.history[NODES[3]][-1].reason
    assert arrays["head.bias"].shape == (4,) and metrics["clair-flagged"] == 1


def test_partial_participation_judges_against_the_bank():
    random.seed(3)  # flwr samples nodes with random.sample
    grid = LocalGrid(federation(poisoned=(7,)))
    strategy = ClairStrategy(fraction_train=0.5, min_train_nodes=4, min_available_nodes=8, max_staleness=3)
    arrays, judged = initial_arrays(), []
    for server_round in (1, 2, 3):
        _, (new, metrics) = one_round(strategy, grid, server_round, arrays)
        arrays = new if new is not None else arrays
        judged.append(metrics["clair-judged"])
        assert metrics["clair-replies"] == 4
    assert judged[0] == 4 and judged[1] > 4 and judged[2] >= judged[1]  # the bank joins the pool
    for i, node in enumerate(NODES):
        for v in strategy.history.get(node, []):
            assert v.benign == (i != 7), (i, v)
    # Flagged nodes' adapters never serve as a reference; a staleness limit of 0 empties the bank.
    assert all(b.benign == (n != NODES[7]) for n, b in strategy.bank.items())
    fresh = ClairStrategy(fraction_train=0.5, min_train_nodes=4, min_available_nodes=8, max_staleness=0,
                          min_judged=2)
    random.seed(3)
    for server_round in (1, 2):
        _, (_, metrics) = one_round(fresh, grid, server_round)
        assert metrics["clair-judged"] == 4


def test_too_few_adapters_are_averaged_unjudged():
    grid = LocalGrid(federation(poisoned=(), n=2))
    strategy = ClairStrategy(min_train_nodes=2, min_available_nodes=2)
    replies, (arrays, metrics) = one_round(strategy, grid)
    assert metrics["clair-judged"] == 0 and metrics["clair-flagged"] == 0
    assert all(not strategy.history[n][-1].judged and "min_judged" in strategy.history[n][-1].reason
               for n in NODES[:2])
    np.testing.assert_allclose(arrays["head.bias"].numpy(), fedavg(replies)["head.bias"], rtol=1e-6)


def test_aggregate_evaluate_skips_bad_replies():
    clients = federation(poisoned=())
    clients[NODES[0]] = lambda msg: RecordDict({"metrics": MetricRecord({"loss": 1.0})})  # no weight
    grid = LocalGrid(clients)
    strategy = ClairStrategy(min_available_nodes=8)
    replies = grid.send_and_receive(strategy.configure_evaluate(1, initial_arrays(), ConfigRecord(), grid))
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics["loss"] == pytest.approx(np.mean(range(1, 8)))


@pytest.mark.parametrize("kwargs, words", [
    ({"flagged_nodes": "drop"}, "flagged_nodes"),
    ({"clair_options": {"rnak": 2}}, "rnak"),
    ({"lora_scaling": -1.0}, "lora_scaling"),
    ({"max_staleness": -1}, "max_staleness"),
    ({"min_judged": 1}, "min_judged"),
    ({"pad_clients": 0}, "pad_clients"),
])
def test_bad_options_name_the_argument(kwargs, words):
    with pytest.raises(ValueError, match=words):
        ClairStrategy(**kwargs)


def test_scaling_is_folded_and_unfolded():
    base = ClairStrategy(min_available_nodes=8)
    scaled = ClairStrategy(min_available_nodes=8, lora_scaling=lambda module: 4.0 if "q_proj" in module else 0.5)
    payloads = []
    for strategy in (base, scaled):
        grid = LocalGrid(federation())
        _, (arrays, _) = one_round(strategy, grid)
        payloads.append({m.metadata.dst_node_id: m.content["arrays"]
                         for m in strategy.configure_train(2, arrays, ConfigRecord(), grid)})
    assert [v.benign for n in NODES for v in base.history[n]] == [v.benign for n in NODES for v in scaled.history[n]]
    key = f"{MODULES[0]}.lora_B.weight"
    for node in NODES:  # refined B comes back in the adapter's own units
        np.testing.assert_allclose(payloads[0][node][key].numpy(), payloads[1][node][key].numpy(), atol=1e-4)
    from clair_jax.flower.options import module_scaling

    assert module_scaling(None, {"lora-alpha": 16, "lora-r": 4}, "m") == 4.0


@pytest.mark.slow
def test_flwr_run_of_the_example_app(tmp_path):
    """``flwr run .`` of examples/flower_lora against a SuperLink in simulation mode (Ray): 10 nodes, 3 a
    round, 6 rounds. Every honest node that trained is sent its own refined adapter at every later message;
    no poisoned node is sent its own upload back."""
    pytest.importorskip("ray")
    import shutil
    import signal
    import socket

    if shutil.which("flower-superlink") is None or shutil.which("flwr") is None:
        pytest.skip("flwr's command-line tools are not on PATH")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with socket.socket() as sock:  # a free port for this SuperLink's HTTP API
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (tmp_path / "config.toml").write_text(f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
                                          f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(tmp_path), "OPENBLAS_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    superlink = subprocess.Popen(["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
                                  "--host", "127.0.0.1", "--port", str(port), "--database", ":memory:",
                                  "--disable-runtime-dependency-installation"], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        out = None
        for _ in range(30):  # until the SuperLink accepts the run
            out = subprocess.run(["flwr", "run", ".", "test", "--stream", "--federation-config",
                                  "num-supernodes=10"], cwd=os.path.join(root, "examples", "flower_lora"),
                                 env=env, capture_output=True, text=True, timeout=900)
            if "Successfully started run" in out.stdout:
                break
            time.sleep(1)
    finally:
        os.killpg(superlink.pid, signal.SIGTERM)
        superlink.wait(timeout=60)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    lines = out.stdout.splitlines()
    check = json.loads(next(line for line in lines if line.startswith("check: "))[len("check: "):])
    assert check["honest-trained-not-personalised"] == [], out.stdout[-3000:]
    assert check["poisoned-sent-own-upload"] == [], out.stdout[-3000:]

def _sampler(rounds, **options):
    """A grid whose nodes are drawn by hand: ``rounds[r]`` are the node indices that train at round r."""
    grid = LocalGrid(federation())
    strategy = ClairStrategy(min_available_nodes=8, min_train_nodes=1, fraction_train=0.01,
                             **{"max_staleness": 2, **options})
    arrays = initial_arrays()
    for server_round, drawn in enumerate(rounds, start=1):
        messages = [m for m in strategy.configure_train(server_round, arrays, ConfigRecord(), grid)]
        payload = {m.metadata.dst_node_id: m for m in messages}
        chosen = [payload[NODES[i]] if NODES[i] in payload else
                  Message(RecordDict({"arrays": strategy.personal_arrays(NODES[i], arrays),
                                      "config": ConfigRecord({"server-round": server_round})}), NODES[i], "train")
                  for i in drawn]
        new, _ = strategy.aggregate_train(server_round, grid.send_and_receive(chosen))
        arrays = new if new is not None else arrays
        yield server_round, strategy, arrays


def test_every_node_that_trained_keeps_its_refined_adapter_across_rounds():
    """Few replies a round: every benign node ever seen is sent its own refined adapter, refreshed each
    round, also once its adapter is older than max_staleness (then refined with the pool's Û, out of it)."""
    rounds = [(0, 1, 6), (2, 3, 7), (4, 5, 6), (0, 2, 7), (1, 3, 4), (5, 6, 7)]
    seen, key = set(), f"{MODULES[0]}.lora_B.weight"
    for server_round, strategy, arrays in _sampler(rounds):
        seen |= set(rounds[server_round - 1])
        for i in seen:
            payload = strategy.personal_arrays(NODES[i], arrays)
            if i >= 6:  # poisoned: never its own upload back
                assert payload is arrays, (server_round, i)
                continue
            assert payload is not arrays, (server_round, i)
            b, own = payload[key].numpy(), strategy.bank[NODES[i]].arrays[key]
            u = shared_basis(0)
            error, local = (np.linalg.norm(x - u @ u.T @ own) for x in (b, own))
            assert error <= local * (1 + 1e-5) and (server_round < 3 or error < 0.5 * local), (server_round, i)
        judged = server_round - 1
        if server_round >= 3:
            assert strategy.records[NODES[7]].flagged >= 2
    # Round 6's pool held rounds 4-6 only (max_staleness=2): node 0 (round 4) in, node 2 (round 4) in too,
    # nodes trained last at round 3 or before were refined outside the pool.
    assert judged == 5 and strategy.bank[NODES[2]].server_round == 4
    assert strategy.is_excluded(NODES[7]) and strategy.is_excluded(NODES[6])
    assert not any(strategy.is_excluded(NODES[i]) for i in range(6))


def test_a_node_flagged_once_is_not_excluded_one_flagged_repeatedly_is():
    from clair_jax.flower import NodeRecord, NodeVerdict

    record = NodeRecord()
    verdicts = [False, True, True, True, True, True]  # benign? per judgement: flagged once, then benign
    for r, benign in enumerate(verdicts, start=1):
        record.add(NodeVerdict(r, benign, True, "clair"))
    assert record.flagged == 1 and not record.excluded(3)
    for r in range(7, 12):
        record.add(NodeVerdict(r, False, True, "clair"))
    assert record.flagged == 6 and record.judged == 11 and record.excluded(3)
    record.add(NodeVerdict(12, False, False, "error reply"))  # a rejected reply is a strike too
    assert record.flagged == 7 and record.latest.status == "rejected"


def test_attackers_that_outnumber_a_round_are_flagged_against_the_trusted_bank():
    """Round 2's replies are three poisoned nodes, its pool five adapters: the trusted bank still decides."""
    rounds = [(0, 1, 2, 3), (5, 6, 7), (4, 6, 7)]
    for server_round, strategy, _ in _sampler(rounds):
        if server_round >= 2:
            assert all(strategy.latest_verdict(NODES[i]).flagged for i in (6, 7)), server_round
            assert not strategy.latest_verdict(NODES[5]).flagged


def test_rounds_after_the_first_compile_nothing(monkeypatch):
    """The pool is padded to the grid's node count and Û's widths bucketed: the first judged round
    compiles every program the run needs, later rounds compile none, though the cap on r̂
    (rank(L̂), a static width of the refinement before bucketing) moves between them."""
    from clair_jax import refine
    from clair_jax.flower.timing import compiling

    caps = set()

    def spy(problems, detection, *args, **kwargs):
        caps.add(int(np.max(np.asarray(detection.rank_cap))))
        return real_refine(problems, detection, *args, **kwargs)

    real_refine = refine.refine
    monkeypatch.setattr(refine, "refine", spy)
    rounds = [(0, 1, 6), (2, 3, 7), (4, 5), (0, 1, 2, 3, 4, 6), (5, 7), (1, 2, 3)]
    counts = {}
    with compiling() as compiled:
        for server_round, strategy, _ in _sampler(rounds, pad_clients=24):  # a pool size no other test uses
            counts[server_round] = compiled.count
    assert len(caps) > 1, caps
    assert counts[1] > 0 and all(counts[r] == counts[1] for r in counts), counts
    assert all(strategy.clair_seconds[r] < strategy.clair_seconds[1] / 5 for r in (2, 3, 4, 5, 6))
    # The strategy reports the compiling apart.
    assert 0 < strategy.compile_seconds[1] < strategy.clair_seconds[1]
    assert all(strategy.compile_seconds[r] == 0.0 for r in (2, 3, 4, 5, 6)), strategy.compile_seconds


def test_centre_pooling_sends_rank_r_adapters_in_the_nodes_row_space():
    """clair_options={"pooling": "centre"}: the pooled update has rank r + r_c, a node's model
    holds rank r: each served node gets B̃ = Θ̃ A_k⁺ (its own A), exact in A_k's row space."""
    import clair_jax as cj
    from clair_jax.flower import bank

    rng = np.random.default_rng(3)
    u = np.linalg.qr(rng.standard_normal((P, SHARED)))[0]
    pool = {}
    for n in range(6):
        b = (u @ rng.standard_normal((SHARED, R)) if n else rng.standard_normal((P, R))).astype(np.float32)
        pool[n] = {"m.lora_A": rng.standard_normal((R, Q)).astype(np.float32), "m.lora_B": b}
    modules = [bank.Module("m", "m.lora_A", "m.lora_B")]
    options = {"pooling": "centre"}
    size = 8   # padded as the strategy pads its pools (the other tests' shapes: one compile)
    out = bank.judge(1, pool, modules, lambda name: 2.0, options, size, {n: "reply" for n in pool})
    dtype = np.float64 if bank._x64() else np.float32
    b = np.full((1, size, P, R), np.nan, dtype)
    a = np.full((1, size, R, Q), np.nan, dtype)
    for j, n in enumerate(pool):
        b[0, j], a[0, j] = 2.0 * pool[n]["m.lora_B"], pool[n]["m.lora_A"]
    (res,) = cj.clair_groups([cj.LoRAFactors(b, a)], **options)
    pooled = np.asarray(res.refined.B @ res.refined.A)[0]
    assert out.refined and 0 not in out.refined                       # the poisoned node is not served
    for n, arrays in out.refined.items():
        a = pool[n]["m.lora_A"]
        assert arrays["m.lora_B"].shape == (P, R) and arrays["m.lora_A"] is a
        np.testing.assert_allclose(2.0 * arrays["m.lora_B"] @ a, pooled[n] @ np.linalg.pinv(a) @ a, atol=1e-4)
    with pytest.raises(ValueError, match="pooling must be 'none' or 'centre'"):
        ClairStrategy(clair_options={"pooling": "auto"})


def test_a_poisoned_majority_in_round_one_never_gets_its_own_upload_back():
    """Round 1 draws two attackers and one honest node: the pool of three clears all three (their shared
    backdoor looks shared), but only the honest node is vouched for; the attackers get the global arrays,
    the FedAvg of the vouched adapter, until later rounds flag them. Every honest node is sent its refined
    adapter from the round it is vouched for on."""
    rounds = [(0, 6, 7), (1, 2, 6), (3, 4, 7), (0, 5, 6), (1, 7, 2)]
    vouched, seen = {}, set()
    for server_round, strategy, arrays in _sampler(rounds):
        drawn = rounds[server_round - 1]
        seen |= set(drawn)
        if server_round == 1:
            assert not any(strategy.latest_verdict(NODES[i]).flagged for i in drawn)  # no verdict can tell
            assert [strategy.latest_verdict(NODES[i]).vouched for i in drawn] == [True, False, False]
            own = strategy.bank[NODES[0]].arrays
            assert all(np.array_equal(arrays[k].numpy(), v) for k, v in own.items())  # the vouched FedAvg
        for i in seen:
            vouched.setdefault(i, server_round if strategy.is_vouched(NODES[i]) else None)
            payload = strategy.personal_arrays(NODES[i], arrays)
            if i >= 6:
                assert payload is arrays and not strategy.is_vouched(NODES[i]), (server_round, i)
            else:
                assert payload is not arrays and strategy.is_vouched(NODES[i]), (server_round, i)
    assert all(vouched[i] == next(r for r, d in enumerate(rounds, 1) if i in d) for i in range(6))  # at once
    assert strategy.is_excluded(NODES[6]) and strategy.is_excluded(NODES[7])


def test_held_by_the_others_against_hand_built_subspaces():
    """Two nodes carry e1, e2 and a shared e3, one carries e1, e2 only: the third holds two thirds of
    each of the first two (e3 is a third of their update), they hold all of it; node scales do not count."""
    from clair_jax.flower import bank

    rng = np.random.default_rng(0)
    basis = np.eye(P)[:, :3]                        # Û = span(e1, e2, e3)
    coeffs = {0: np.diag([1.0, 1.0, 1.0]), 1: np.diag([1.0, 1.0, 1.0]), 2: np.diag([1.0, 1.0, 0.0])}
    pool = {}
    for n, c in coeffs.items():
        a = np.linalg.qr(rng.standard_normal((Q, 3)))[0].T       # orthonormal rows: ‖C_k‖ is ‖c‖
        pool[n] = {"m.lora_A": a, "m.lora_B": basis @ c * (1 + n)}
    modules = [bank.Module("m", "m.lora_A", "m.lora_B")]
    shares = bank.held_by_the_others(pool, modules, lambda name: 3.0, {"m": basis}, [0, 1, 2], [0, 1, 2])
    assert shares == pytest.approx({0: 2 / 3, 1: 2 / 3, 2: 1.0})
    assert bank.held_by_the_others(pool, modules, lambda name: 3.0, {"m": basis[:, :0]}, [0], [0, 1]) == {0: 1.0}
