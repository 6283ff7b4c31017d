"""``clair shakespeare`` end to end on a tiny Llama in SmolLM2's file format and a
trimmed copy of two plays (offline); the real-model run is slow-marked."""

import json
import os
import pathlib

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from clair_jax import llm  # noqa: E402
from clair_jax.experiments import shakespeare as sh  # noqa: E402

FIXTURE = pathlib.Path(__file__).parent / "data" / "shakespeare_mini"

TINY = sh.ShakespeareConfig(
    plays=("hamlet", "lear"), clients=8, contamination=0.25, min_speeches=15, seq_len=32, max_train_seqs=8,
    max_heldout_seqs=4, adapted_layers=1, rank=4, alpha=8.0, steps=6, batch=4, lr=5e-3, probes=4,
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = llm.write_tiny_gguf(str(tmp_path_factory.mktemp("model") / "tiny.gguf"), seed=0)
    return llm.load_model(path)


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tmp_path_factory):
    adapters = tmp_path_factory.mktemp("run") / "adapters"
    out = sh.run_shakespeare(seed=0, model=tiny_model, texts=str(FIXTURE), config=TINY, adapters_dir=str(adapters),
                             progress=False)
    return out, adapters


def test_json_holds_every_method_and_client(tiny_run):
    out, _ = tiny_run
    json.dumps(out)  # JSON-ready
    assert set(out["methods"]) == set(sh.METHODS)
    honest = [c["name"] for c in out["clients"] if c["benign"]]
    assert len(out["clients"]) == TINY.clients and len(honest) == TINY.clients - 2
    for name, m in out["methods"].items():
        assert set(m["ppl_per_client"]) == set(honest), name
        assert all(np.isfinite(v) and v > 1 for v in m["ppl_per_client"].values()), name
        assert m["ppl"] == pytest.approx(np.mean(list(m["ppl_per_client"].values())))
        assert 0.0 <= m["backdoor"] <= 1.0 and 0.0 <= m["worse_than_local"] <= 1.0
    kinds = {c["kind"] for c in out["clients"]}
    assert kinds == {"honest", "backdoor", "noise"}  # mixed with two contaminated clients
    for c in out["clients"]:
        assert set(c) >= {"name", "kind", "benign", "flagged", "lines"}
        assert set(c["module_z"]) and all(np.isfinite(v) for v in c["module_z"].values())
    assert out["detection"]["fpr"] == pytest.approx(np.mean([c["flagged"] for c in out["clients"] if c["benign"]]))
    assert set(out["timings"]) >= {"cache_hidden_states", "train_clients", "clair_aggregate", "evaluate"}


def test_adapters_and_heldout_written_and_scored_from_disk(tiny_run, tiny_model):
    out, adapters = tiny_run
    assert out["adapters_dir"] == os.path.abspath(adapters)
    report = json.loads((adapters / "report.json").read_text())
    for c, row in zip(out["clients"], report["clients"]):
        d = adapters / "clients" / c["name"]
        assert (d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file()
        assert (d / "heldout.txt").is_file()
        assert row["name"] == c["name"] and c["status"] == row["status"]
        assert c["flagged"] == (row["status"] == "contaminated")
        assert (row["output"] is not None) == (row["status"] != "contaminated")  # noisy clients are refined too
        if row["output"]:
            lora, spec = llm.load_peft_adapter(row["output"], tiny_model.config)
            assert spec.layers == (tiny_model.config.n_layers - 1,)
    honest_text = (adapters / "clients" / out["clients"][0]["name"] / "heldout.txt").read_text()
    assert honest_text.strip()


def test_centre_pooled_clair_and_the_projection_row(tiny_run, tiny_model):
    """The scored CLAIR row is ``clair aggregate --pooling centre``: every served client's
    adapter has rank r + 2r and kept at least half of its own update; the projection row
    is the plain call (rank r); each client reported its training sequences."""
    out, adapters = tiny_run
    assert out["aggregate_args"] == ["--pooling", "centre"]
    report = json.loads((adapters / "report.json").read_text())
    plain = json.loads((adapters / "report_projection.json").read_text())
    assert [r["status"] for r in report["clients"]] == [r["status"] for r in plain["clients"]]
    for c, row, row_p in zip(out["clients"], report["clients"], plain["clients"]):
        assert json.loads((adapters / "clients" / c["name"] / "clair_client.json").read_text())["num_examples"] \
            == c["train_seqs"]
        if row["output"]:
            _, spec = llm.load_peft_adapter(row["output"], tiny_model.config)
            _, spec_p = llm.load_peft_adapter(row_p["output"], tiny_model.config)
            assert spec.rank == 3 * TINY.rank and spec_p.rank == TINY.rank
            assert all(0.5 <= w <= 1.0 for w in row["centre_weight"].values())


@pytest.mark.slow   # a second end-to-end run of the tiny federation
def test_judged_again_from_saved_adapters(tiny_run, tiny_model, tmp_path):
    """``--from DIR``: the kept adapters judged and scored again without training give the same table."""
    out, adapters = tiny_run
    again = sh.run_shakespeare(seed=0, model=tiny_model, texts=str(FIXTURE), config=TINY, progress=False,
                               adapters_from=str(adapters), adapters_dir=str(tmp_path / "again"))
    for name in ("local", "fedavg_ab", "clair", "clair_projection"):
        for role, ppl in out["methods"][name]["ppl_per_client"].items():
            assert again["methods"][name]["ppl_per_client"][role] == pytest.approx(ppl, rel=1e-4), (name, role)
    assert "train_clients" in again["timings"] and not np.isfinite(again["clients"][0]["final_loss"])
    with pytest.raises(FileNotFoundError, match="adapters_from"):
        sh.run_shakespeare(seed=1, model=tiny_model, texts=str(FIXTURE), config=TINY, progress=False,
                           adapters_from=str(adapters))


def test_local_training_lowers_the_loss(tiny_run):
    out, _ = tiny_run
    base, local = out["methods"]["base"], out["methods"]["local"]
    # on the tiny random model a few AdamW steps on a role's lines lower its held-out perplexity
    assert local["ppl"] < base["ppl"]
    # the FedAvg over the true honest clients differs from every client's own adapter
    assert out["methods"]["fedavg_benign"]["ppl_per_client"] != local["ppl_per_client"]


def test_method_deltas_follow_their_definitions():
    rng = np.random.default_rng(0)
    spec = llm.LoRASpec(layers=(1,), modules=("q", "v"), rank=2, alpha=4.0)
    adapters = [{m: {"A": rng.standard_normal((1, 2, 5)).astype(np.float32),
                     "B": rng.standard_normal((1, 3, 2)).astype(np.float32)} for m in spec.modules} for _ in range(5)]
    local = [sh.dense_deltas(a, spec) for a in adapters]
    benign = np.array([True, True, True, False, False])
    out = sh.method_deltas(local, adapters, spec, benign, refined={0: {m: np.ones((1, 3, 5)) for m in spec.modules}})
    a_bar = np.mean([a["q"]["A"] for a in adapters], 0)
    np.testing.assert_allclose(out["fedsa_lora"][4]["q"], 2.0 * adapters[4]["q"]["B"][0] @ a_bar[0][None], rtol=1e-5)
    np.testing.assert_allclose(out["fedavg_benign"][0]["v"], np.mean([d["v"] for d in local[:3]], 0), rtol=1e-5)
    np.testing.assert_allclose(out["fedavg_dw"][0]["v"], np.mean([d["v"] for d in local], 0), rtol=1e-5)
    assert np.all(out["clair"][0]["q"] == 1.0) and out["clair"][1] is local[1]  # flagged / unrefined keep local
    assert np.all(out["base"][2]["q"] == 0.0)


def test_free_rider_has_the_honest_median_norm():
    rng = np.random.default_rng(1)
    spec = llm.LoRASpec(layers=(0, 1), modules=("o",), rank=2, alpha=2.0)
    honest = [{"o": {"A": rng.standard_normal((2, 2, 6)).astype(np.float32),
                     "B": s * rng.standard_normal((2, 4, 2)).astype(np.float32)}} for s in (1.0, 2.0, 3.0)]
    rider = sh.free_rider_adapter(honest, spec, seed=0)
    norms = np.linalg.norm(sh.dense_deltas(rider, spec)["o"], axis=(-1, -2))
    median = np.median([np.linalg.norm(sh.dense_deltas(h, spec)["o"], axis=(-1, -2)) for h in honest], 0)
    np.testing.assert_allclose(norms, median, rtol=1e-4)


def test_bad_arguments_are_named(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="kind"):
        sh.run_shakespeare(model=tiny_model, texts=str(FIXTURE), config=TINY, kind="poison", progress=False)
    with pytest.raises(ValueError, match="min_speeches"):
        sh.run_shakespeare(model=tiny_model, texts=str(FIXTURE), config=TINY._replace(min_speeches=10_000),
                           progress=False)
    with pytest.raises(ValueError, match="clients"):
        sh.run_shakespeare(model=tiny_model, texts=str(FIXTURE), config=TINY._replace(clients=2), progress=False)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("")
    with pytest.raises(ValueError, match="adapters_dir"):
        sh.run_shakespeare(model=tiny_model, texts=str(FIXTURE), config=TINY, adapters_dir=str(tmp_path / "x"),
                           progress=False)
