"""clair_jax.adapters and ``clair aggregate``: PEFT-layout directories built with
safetensors alone (tests/adapter_fixtures.py). The solver runs on few shapes
(6 clients, 16×16 modules, r = 4) so one pytest process compiles them once."""

import json
import os
import stat
import sys
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import clair_jax as cj
from clair_jax import adapters
from clair_jax.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from adapter_fixtures import (  # noqa: E402
    PREFIX, config_for, federation_deltas, module_names, shapes_for, write_client, write_federation,
)

QS = [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]   # one shape group: 2 × (16 × 16)


def _tensors(path):
    with safe_open(os.path.join(path, "adapter_model.safetensors"), framework="numpy") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()


def _expected_refined(deltas, names, clients):
    """CLAIR on the fixture's own ΔW factors (not read through the adapters package)."""
    b = np.stack([np.stack([np.asarray(deltas[m][0][k], np.float32) for k in range(clients)]) for m in names])
    a = np.stack([np.stack([np.asarray(deltas[m][1][k], np.float32) for k in range(clients)]) for m in names])
    factors = cj.LoRAFactors(jnp.asarray(b), jnp.asarray(a))
    (res,) = cj.clair_groups([factors])
    return res, np.asarray(res.refined.B)


# ------------------------------------------------------------ PEFT's reading rules


def test_pattern_value_first_match_whole_components():
    patterns = {"layers.0.q_proj": 2, "q_proj": 8, "proj": 99}
    assert adapters.pattern_value(patterns, "model.layers.0.q_proj", 4) == 2      # first key that matches
    assert adapters.pattern_value(patterns, "model.layers.1.q_proj", 4) == 8
    assert adapters.pattern_value(patterns, "model.layers.1.k_proj", 4) == 4      # "proj" is not a component
    assert adapters.pattern_value({r"layers\.\d+\.v_proj": 3}, "model.layers.7.v_proj", 4) == 3
    assert adapters.pattern_value({"q": 3}, "model.layers.0.q_proj", 4) == 4


def test_peft_scaling_rslora_and_patterns():
    assert adapters.peft_scaling(config_for(r=16, alpha=32), "m.q_proj") == (16, 2.0)
    assert adapters.peft_scaling(config_for(r=16, alpha=32, use_rslora=True), "m.q_proj") == (16, 8.0)
    cfg = config_for(r=16, alpha=32, rank_pattern={"v_proj": 4}, alpha_pattern={"v_proj": 16})
    assert adapters.peft_scaling(cfg, "model.layers.0.v_proj") == (4, 4.0)
    cfg["use_rslora"] = True
    assert adapters.peft_scaling(cfg, "model.layers.0.v_proj") == (4, 8.0)


def test_factors_fold_scaling_pad_ranks_and_read_every_encoding(tmp_path):
    """Every client holds the same ΔW, written in a different PEFT encoding: the
    factors read back must give the same s·B·A for all of them."""
    names = QS
    shapes = shapes_for(names)
    deltas = federation_deltas(0, names, shapes, clients=1, poisoned=())
    base = {m: (deltas[m][0][0], deltas[m][1][0]) for m in names}
    low = {m: (np.linalg.svd(b @ a)[0][:, :2] * np.linalg.svd(b @ a)[1][:2], np.linalg.svd(b @ a)[2][:2])
           for m, (b, a) in base.items()}
    encodings = [
        (config_for(), base, "float32", True),
        (config_for(use_rslora=True, lora_alpha=6), base, "float32", False),                    # rslora, no prefix
        (config_for(alpha_pattern={"layers.1.self_attn.q_proj": 3}, fan_in_fan_out=True), base, "float16", True),
        (config_for(r=2), low, "bfloat16", True),                                                # rank 2, padded
    ]
    dirs = [write_client(tmp_path / f"c{i}", cfg, facs, dtype=dt, prefix=pre)
            for i, (cfg, facs, dt, pre) in enumerate(encodings)]
    fed = adapters.load_federation(dirs)
    assert len(fed.groups) == 1 and fed.groups[0].rank == 4 and fed.groups[0].modules == tuple(names)
    (factors,) = fed.factors()
    assert factors.B.shape == (2, 4, 16, 4) and factors.A.shape == (2, 4, 4, 16)
    assert np.all(factors.B[:, 3, :, 2:] == 0) and np.all(factors.A[:, 3, 2:, :] == 0)
    dense = np.einsum("mkpr,mkrq->mkpq", factors.B, factors.A)
    truth = np.stack([base[m][0] @ base[m][1] for m in names])
    tol = {0: 1e-6, 1: 1e-6, 2: 2e-3, 3: 2e-2}
    for k in range(4):
        err = np.linalg.norm(dense[:, k] - truth) / np.linalg.norm(truth)
        assert err < tol[k], (k, err)
    assert fed.clients[1].modules[names[0]].key_a == names[0] + ".lora_A.weight"
    assert fed.clients[0].modules[names[0]].key_a == PREFIX + names[0] + ".lora_A.weight"


def test_shape_groups_grouped_query_attention(tmp_path):
    dirs, _ = write_federation(tmp_path, layers=2)
    fed = adapters.load_federation(dirs)
    shapes = {g.shape: g.modules for g in fed.groups}
    assert set(shapes) == {(16, 16), (8, 16)}
    assert all(m.endswith(("k_proj", "v_proj")) for m in shapes[(8, 16)]) and len(shapes[(8, 16)]) == 4
    b_shapes = {f.B.shape[2:] for f in fed.factors()}
    assert b_shapes == {(8, 4), (16, 4)}


def test_plan_chunks_even_split(tmp_path):
    dirs, _ = write_federation(tmp_path, layers=4)
    fed = adapters.load_federation(dirs)
    one = adapters.plan_chunks(fed)
    assert len(one) == 1 and sum(len(c.modules) for c in one[0]) == 16
    per_module = 6 * 4 * (16 + 16) * 4
    calls = adapters.plan_chunks(fed, chunk_bytes=4 * per_module)
    assert len(calls) == 4 and all(len(c.modules) == 2 for call in calls for c in call)
    covered = sorted(m for call in calls for c in call for m in c.modules)
    assert covered == sorted(module_names(4))


# ------------------------------------------------------------------- refusals


def _refused(capsys, tmp_path, dirs, *extra):
    out = tmp_path / "out"
    code = main(["aggregate", *map(str, dirs), "--out", str(out), "--json", str(tmp_path / "r.json"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("clair aggregate: refused: ")
    assert not out.exists() and not (tmp_path / "r.json").exists()
    return err[0]


def _fed(tmp_path, **kw):
    dirs, _ = write_federation(tmp_path / "in", names=QS, **kw)
    return dirs


def test_refuses_missing_directory_and_files(tmp_path, capsys):
    dirs = _fed(tmp_path)
    assert "no such directory" in _refused(capsys, tmp_path, dirs[:5] + [tmp_path / "nowhere"])
    os.remove(os.path.join(dirs[2], "adapter_model.safetensors"))
    line = _refused(capsys, tmp_path, dirs)
    assert dirs[2] in line and "missing adapter_model.safetensors" in line
    os.remove(os.path.join(dirs[3], "adapter_config.json"))
    line = _refused(capsys, tmp_path, [d for i, d in enumerate(dirs) if i != 2])
    assert dirs[3] in line and "missing adapter_config.json" in line


def test_refuses_corrupt_safetensors(tmp_path, capsys):
    dirs = _fed(tmp_path)
    weights = os.path.join(dirs[1], "adapter_model.safetensors")
    data = Path(weights).read_bytes()
    Path(weights).write_bytes(data[: len(data) - 100])          # truncated
    line = _refused(capsys, tmp_path, dirs)
    assert dirs[1] in line and "corrupt" in line
    Path(weights).write_bytes(b"not a safetensors file at all")
    assert "corrupt" in _refused(capsys, tmp_path, dirs)


@pytest.mark.parametrize("change, reason", [
    (dict(peft_type="IA3"), "peft_type is 'IA3'"),
    (dict(use_dora=True), "DoRA"),
    (dict(base_model_name_or_path="other/model"), "base_model_name_or_path 'other/model' differs"),
    (dict(r=8), "rank 4 but adapter_config.json gives it r = 8"),
])
def test_refuses_config(tmp_path, capsys, change, reason):
    dirs = _fed(tmp_path, configs={4: config_for(**change)})
    line = _refused(capsys, tmp_path, dirs)
    assert dirs[4] in line and reason in line, line


def test_refuses_dora_weights_modules_and_shapes(tmp_path, capsys):
    dirs = _fed(tmp_path)
    deltas = federation_deltas(1, QS, shapes_for(QS), clients=1, poisoned=())
    facs = {m: (deltas[m][0][0], deltas[m][1][0]) for m in QS}
    dora = write_client(tmp_path / "dora", config_for(), facs,
                        extra_tensors={PREFIX + QS[0] + ".lora_magnitude_vector": np.ones(16, np.float32)})
    assert "DoRA" in _refused(capsys, tmp_path, dirs[:3] + [dora])
    fewer = write_client(tmp_path / "fewer", config_for(), {QS[0]: facs[QS[0]]})
    line = _refused(capsys, tmp_path, dirs[:3] + [fewer])
    assert str(fewer) in line and "target modules differ" in line and "lacks model.layers.1.self_attn.q_proj" in line
    wide = {m: (np.ones((16, 4)), np.ones((4, 32))) for m in QS}
    odd = write_client(tmp_path / "wide", config_for(), wide)
    line = _refused(capsys, tmp_path, dirs[:3] + [odd])
    assert str(odd) in line and "shape (out, in) = (16, 32)" in line


def test_refuses_fewer_than_three_clients_and_name_clash(tmp_path, capsys):
    dirs = _fed(tmp_path)
    assert "at least 3" in _refused(capsys, tmp_path, dirs[:2])
    clash = write_federation(tmp_path / "other", names=QS, clients=1)[0][0]
    assert "same directory name" in _refused(capsys, tmp_path, dirs[:3] + [clash])


def test_refuses_existing_output(tmp_path, capsys):
    dirs = _fed(tmp_path)
    (tmp_path / "out" / "client03").mkdir(parents=True)
    code = main(["aggregate", *dirs, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "already exists" in err[0] and dirs[3] in err[0]
    assert os.listdir(tmp_path / "out") == ["client03"]


# ------------------------------------------------------------------ end to end


def test_aggregate_end_to_end(tmp_path, capsys):
    """Poisoned client 0 gets no adapter; every benign adapter has the client's keys,
    shapes, dtype and config, lora_A byte for byte, lora_B = CLAIR's refined B / s;
    modules_to_save and lora_bias are copied through and reported."""
    keep = {PREFIX + "lm_head.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
            PREFIX + QS[0] + ".lora_B.bias": np.full(16, 0.5, np.float32)}
    cfg = config_for(lora_alpha=12, modules_to_save=["lm_head"], lora_bias=True)
    dirs, deltas = write_federation(tmp_path / "in", names=QS, configs={k: cfg for k in range(6)})
    for d in dirs:  # add the full weights to every client
        tensors, meta = _tensors(d)
        save_file({**tensors, **keep}, os.path.join(d, "adapter_model.safetensors"), metadata=meta)
    out, report_path, kept = tmp_path / "out", tmp_path / "report.json", tmp_path / "kept"
    code = main(["aggregate", *dirs, "--out", str(out), "--json", str(report_path), "--keep-flagged", str(kept)])
    printed = capsys.readouterr()
    assert code == 0
    report = json.loads(report_path.read_text())
    names = [c["name"] for c in report["clients"]]
    assert names == [f"client{k:02d}" for k in range(6)]
    res, refined = _expected_refined(deltas, QS, 6)
    benign = np.asarray(res.client_benign)
    assert not benign[0]
    assert [c["benign"] for c in report["clients"]] == benign.tolist()
    assert "client00" in printed.out and "contaminated" in printed.out and str(out) in printed.out
    assert "module groups" in printed.err                                     # the progress bar
    assert report["groups"][0]["modules"] == QS and len(report["groups"][0]["rank"]) == 2
    assert set(report["groups"][0]) >= {"shape", "modules", "rank", "lam", "noise_level", "converged"}
    assert report["clients"][0]["output"] is None and report["clients"][0]["flagged_copy"] == str(kept / "client00")
    assert sorted(os.listdir(out)) == [n for n, b in zip(names, benign) if b]
    assert Path(kept / "client00" / "adapter_model.safetensors").read_bytes() == \
        Path(dirs[0], "adapter_model.safetensors").read_bytes()
    s = 12 / 4
    for k, entry in enumerate(report["clients"]):
        assert sorted(entry["passthrough"]) == sorted(keep)
        if not entry["benign"]:
            continue
        assert entry["output"] == str(out / entry["name"])
        mode = os.stat(out / entry["name"] / "adapter_model.safetensors").st_mode
        assert mode & stat.S_IRGRP and mode & stat.S_IROTH
        assert (out / entry["name"] / "adapter_config.json").read_bytes() == Path(dirs[k], "adapter_config.json").read_bytes()
        before, meta_in = _tensors(dirs[k])
        after, meta_out = _tensors(out / entry["name"])
        assert list(after) == list(before) and meta_out == meta_in
        for key, value in before.items():
            assert after[key].shape == value.shape and after[key].dtype == value.dtype
            if ".lora_B.weight" not in key:
                assert after[key].tobytes() == value.tobytes(), key
        for i, m in enumerate(QS):
            np.testing.assert_allclose(after[PREFIX + m + ".lora_B.weight"], refined[i, k] / s, rtol=2e-4, atol=2e-6)
    assert report["seconds"]["total"] > 0


def test_heterogeneous_encodings_give_the_plain_verdict(tmp_path):
    """The same ΔW written with rslora, alpha_pattern, another rank, bf16/f16 and no
    prefix gives the same verdict and refined ΔW as plain float32 adapters (a reader
    that ignored the scaling would see these clients 2-4× too large and flag them)."""
    plain, deltas = write_federation(tmp_path / "plain", names=QS)
    configs = {1: config_for(use_rslora=True, lora_alpha=8), 2: config_for(alpha_pattern={"q_proj": 32}),
               3: config_for(rank_pattern={"layers.1.self_attn.q_proj": 2}, lora_alpha=8)}
    mixed = []
    for k in range(6):
        facs = {m: (deltas[m][0][k], deltas[m][1][k]) for m in QS}
        if k == 3:  # layer 1 at rank 2 (the update has rank ≤ 2 there: shared rank 2)
            b, a = facs[QS[1]]
            u, sv, vt = np.linalg.svd(b @ a)
            facs[QS[1]] = (u[:, :2] * sv[:2], vt[:2])
        dtype = {4: "bfloat16", 5: "float16"}.get(k, "float32")
        mixed.append(write_client(tmp_path / "mixed" / f"client{k:02d}", configs.get(k, config_for()), facs,
                                  dtype=dtype, prefix=k != 2))
    rep_plain = adapters.aggregate(plain, tmp_path / "out_plain")
    rep_mixed = adapters.aggregate(mixed, tmp_path / "out_mixed", json_path=tmp_path / "mixed.json")
    assert [c["benign"] for c in rep_mixed["clients"]] == [c["benign"] for c in rep_plain["clients"]]
    np.testing.assert_allclose([c["score"] for c in rep_mixed["clients"][1:]],
                               [c["score"] for c in rep_plain["clients"][1:]], atol=0.05)
    assert rep_mixed["clients"][4]["dtypes"] == ["BF16"] and rep_mixed["clients"][3]["lora_rank"] == 4
    fed = adapters.load_federation([c["output"] for c in rep_mixed["clients"] if c["output"]])
    fed_plain = adapters.load_federation([c["output"] for c in rep_plain["clients"] if c["output"]])
    for f, g in zip(fed.factors(), fed_plain.factors()):
        dw = np.einsum("mkpr,mkrq->mkpq", f.B, f.A)
        dw_plain = np.einsum("mkpr,mkrq->mkpq", g.B, g.A)
        err = np.linalg.norm(dw - dw_plain, axis=(-2, -1)) / np.linalg.norm(dw_plain, axis=(-2, -1))
        assert err.max() < 3e-2, err   # bf16 / f16 rounding


def test_grouped_query_attention_one_verdict_and_global_adapter(tmp_path, capsys):
    dirs, deltas = write_federation(tmp_path / "in", layers=1, poisoned=(0,))
    code = main(["aggregate", *dirs, "--out", str(tmp_path / "out"), "--json", str(tmp_path / "r.json"),
                 "--global-rank", "3", "--quiet"])
    assert code == 0 and capsys.readouterr().err == ""
    report = json.loads((tmp_path / "r.json").read_text())
    assert {tuple(g["shape"]) for g in report["groups"]} == {(16, 16), (8, 16)}
    benign = np.array([c["benign"] for c in report["clients"]])
    assert not benign[0] and benign[1:].all()
    glob = tmp_path / "out" / adapters.GLOBAL_NAME
    assert report["global_adapter"] == {"path": str(glob), "rank": 3}
    cfg = json.loads((glob / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 3 and not cfg["use_rslora"]
    tensors, _ = _tensors(glob)
    outs = [adapters.load_federation([c["output"] for c in report["clients"] if c["output"]])][0]
    for m in module_names(1):
        b_g, a_g = tensors[PREFIX + m + ".lora_B.weight"], tensors[PREFIX + m + ".lora_A.weight"]
        assert b_g.shape[1] == 3 and a_g.shape[0] == 3
        mean = np.mean([np.asarray(outs.clients[i].modules[m].scaling) * _dw(outs.clients[i], m)
                        for i in range(len(outs.clients))], axis=0)
        u, sv, vt = np.linalg.svd(mean)
        best = (u[:, :3] * sv[:3]) @ vt[:3]
        np.testing.assert_allclose(b_g @ a_g, best, atol=1e-5 * np.abs(mean).max() + 1e-7)


def _dw(client, module):
    with safe_open(client.weights_path, framework="numpy") as fh:
        e = client.modules[module]
        return fh.get_tensor(e.key_b).astype(np.float64) @ fh.get_tensor(e.key_a).astype(np.float64)


def test_module_groups_pool_to_one_verdict(tmp_path):
    """Four modules in two module groups (calls): one pooled verdict, and a call whose
    own verdict let in a client the pooled verdict flags is solved again without it."""
    names = [f"model.layers.{i}.self_attn.q_proj" for i in range(4)]
    dirs, _ = write_federation(tmp_path / "in", names=names, poisoned=(0,))
    per_module = 6 * 4 * 32 * 4
    report = adapters.aggregate(dirs, tmp_path / "out", chunk_bytes=2 * per_module)
    assert report["calls"] == 2 and report["module_groups"] == 2
    assert not report["clients"][0]["benign"] and report["clients"][0]["output"] is None
    assert len(report["groups"][0]["rank"]) == 4
    written = [c for c in report["clients"] if c["output"]]
    assert all(c["local_modules"] is not None for c in written)


@pytest.mark.slow
def test_bench_aggregate_quick(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import bench_aggregate

    (row,) = bench_aggregate.main(["--quick", "--gqa", "--json", str(tmp_path / "b.json")])
    payload = json.loads((tmp_path / "b.json").read_text())
    assert payload["benchmark"] == "bench_aggregate" and row["verdicts_correct"]
    assert row["peak_rss_gib"] > 0 and row["module_groups"] == 2
