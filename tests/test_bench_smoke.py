"""Every benchmark runs end to end at a tiny size and writes its JSON (timings are
not asserted here: targets live in the benchmarks). Also checks the NumPy
reference still runs the same iterations as the JAX solvers."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _run(module, tmp_path, *extra):
    import importlib

    bench = importlib.import_module(f"benchmarks.{module}")
    name = module.rpartition(".")[2]   # "investigations.cpu_concurrency" writes "cpu_concurrency"
    out = tmp_path / f"{name}.json"
    result = bench.main(["--quick", "--json", str(out), *extra])
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == name
    assert payload["machine"]["cpu_count"] >= 1
    return result, payload


@pytest.mark.slow   # CVXPY, and fresh processes pinned to one core and to both
def test_bench_solver_quick(tmp_path):
    rows, _ = _run("bench_solver", tmp_path)
    assert {r["program"] for r in rows} == {"exact", "penalized"}
    for r in rows:
        assert r["jax_converged"] and r["numpy_converged"]
        # Same iterations ⇒ same objective: guards the NumPy reference against drift.
        assert r["numpy_vs_jax_objective"] < 1e-4
        assert abs(r["numpy_iters"] - r["jax_iters"]) <= 2
        if r["layers"] == 1:  # CVXPY only on single problems
            assert r["cvxpy_s"] is not None and abs(r["gap_vs_cvxpy"]) < 1e-3
        else:  # stacked layers: one core each (pinned) and both cores, in fresh processes
            assert r["pinned_objective_diff"] < 1e-4 and r["cores_objective_diff"] < 1e-4
            assert len(r["pinned_rounds"]["jax"]) == 5 and r["speedup_numpy_pinned"] > 0


@pytest.mark.slow   # benchmark smoke runs are the slow tier's (README)
def test_bench_svt_quick(tmp_path):
    rows, _ = _run("bench_svt", tmp_path)
    for r in rows:
        assert r["same_verdicts"] == "yes" and r["verdicts_correct"]
        assert r["objective_rel_diff"] < 1e-4
        assert r["gram_same_verdicts"] == "yes" and r["gram_objective_rel_diff"] < 1e-4
        assert r["svt_gram_rel_err"] < 1e-4 and not r["svt_gram_fallback"]


@pytest.mark.slow   # benchmark smoke runs are the slow tier's (README)
def test_bench_llm_quick(tmp_path):
    (model, dense), _ = _run("bench_llm", tmp_path, "--engine", "reference")
    assert model["verdicts_correct"]
    assert dense and dense[0]["dense_s"] is not None


@pytest.mark.slow   # a 7B-shaped call's stages at quick size; the stages are tested in test_stages
def test_bench_llm_call_breakdown_quick(tmp_path):
    # The cold one-call sweep runs fresh processes (minutes); the stage breakdown is in-process.
    (runs, rows), _ = _run("bench_llm_call", tmp_path, "--breakdown", "--no-sweep", "--noise", "0", "0.05")
    assert runs == [] and [r["noise"] for r in rows] == [0.0, 0.05]
    assert all(r["correct"] and r["detect_ms"] > 0 and r["reduce_ms"] > 0 for r in rows)


@pytest.mark.slow   # the host-device rows run in a fresh process
def test_bench_scaling_quick(tmp_path):
    (rows, dev_rows), _ = _run("bench_scaling", tmp_path)
    assert all(r["converged"] for r in rows)
    assert dev_rows[0]["devices"] == 2


@pytest.mark.slow   # benchmark smoke runs are the slow tier's (README)
def test_bench_lambda_path_quick(tmp_path):
    pytest.importorskip("clair_jax.decompose")
    rows, _ = _run("investigations.bench_lambda_path", tmp_path)
    assert rows[0]["grid"] > 1 and np.isfinite(rows[0]["batch_ms"])


@pytest.mark.slow   # benchmark smoke runs are the slow tier's (README)
def test_gram_svt_accuracy_quick(tmp_path):
    rows, _ = _run("investigations.gram_svt_accuracy", tmp_path)
    for r in rows:
        assert r["max_c"] < 10  # the error model err ≈ c·eps·σ₁²/τ holds
        if r["max_err_certified"] is not None:
            assert r["max_err_certified"] < 5e-5  # what the certificate lets through ≈ rtol·σ₁
    assert rows[0]["certified"] == 1.0  # τ = 0.3 σ₁: always certified


@pytest.mark.slow   # benchmark smoke runs are the slow tier's (README)
def test_problem_batch_quick(tmp_path):
    rows, _ = _run("investigations.problem_batch", tmp_path)
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["same"] for r in rows)   # chunks of vmapped modules give the same answers here


@pytest.mark.slow   # a fresh process with 2 host devices
def test_cpu_concurrency_quick(tmp_path):
    # Two programs on two host devices, in a fresh process: the smallest case runs.
    rows, _ = _run("investigations.cpu_concurrency", tmp_path)
    assert [r["case"] for r in rows] == ["loop"]
    assert rows[0]["result"] == "runs" and rows[0]["concurrent_s"] > 0 and rows[0]["speedup"] > 0


@pytest.mark.slow   # 2 processes joined by jax.distributed (~30 s)
def test_bench_hosts_quick(tmp_path):
    # Two processes joined by jax.distributed (gloo), each screening half the modules and
    # refining with the pooled verdict: the one-process verdicts and ranks.
    rows, _ = _run("bench_hosts", tmp_path)
    assert rows[0]["hosts"] == 2 and rows[0]["same_verdicts_and_ranks"] and rows[0]["verdicts_correct"]


@pytest.mark.slow   # two cold processes, one with XLA's default options: ~25 s of compilation
def test_bench_compile_quick(tmp_path):
    """CLAIR's CPU compiler options and XLA's defaults compile the same program: same answer."""
    (row,), _ = _run("bench_compile", tmp_path)
    assert row["same_verdicts"] == "yes"
    assert row["refined_rel_diff"] < 1e-5
    assert row["cold_s"] > 0 and row["warm_ms"] > 0


@pytest.mark.slow   # a fresh process per schedule
def test_alm_schedule_quick(tmp_path):
    rows, payload = _run("investigations.alm_schedule", tmp_path)
    assert [(r["rho_growth"], r["balance"]) for r in rows] == [(2.0, 10.0), (1.5, 10.0)]
    assert rows[0]["same_verdicts_and_caps"] and all(r["ms_per_module"] > 0 and min(r["iterations"]) > 0 for r in rows)


def test_primitives_quick(tmp_path):
    rows, _ = _run("investigations.primitives", tmp_path)
    assert len(rows) == 6 and all(r["ms"] > 0 for r in rows)
    assert rows[0]["gflops"] > 0 and rows[3]["gflops"] is None


def test_fresh_memory_quick(tmp_path):
    result, payload = _run("investigations.fresh_memory", tmp_path)
    memory = payload["memory"]
    assert set(memory) == {"fresh", "freed just before", "touched"}
    assert all(c["wall_s"] > 0 and c["sys_s"] >= 0 for c in memory.values())


@pytest.mark.slow   # the 7B-shaped call on 4 modules, cold and warm
def test_fresh_memory_call_quick(tmp_path):
    _, payload = _run("investigations.fresh_memory", tmp_path, "--call")
    for run in ("cold", "warm"):
        stages = payload["call"][run]
        assert stages["exact"] and set(stages) >= {"total", "reduce", "detect", "refine"}
        assert stages["total"]["wall_s"] >= stages["detect"]["wall_s"] > 0
