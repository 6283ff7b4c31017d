"""Local estimator → CLAIR → held-out evaluation, through the functions and the CLI."""

import json

import pytest

from clair_jax import cli
from clair_jax.experiments.mlp import run_mlp
from clair_jax.experiments.regression import flagged_by_kind, run_regression


@pytest.fixture(scope="module")
def regression_result():
    # The shapes of notebook e's quick run: its programs compile once per test run.
    return run_regression(1, num_clients=16, contamination=0.3, p=16, q=4, rank=2, num_samples=(40, 80), num_test=200)


@pytest.mark.slow   # the regression study end to end
def test_regression_ranks_clair_ahead_of_local_and_fedavg(regression_result):
    m = regression_result["methods"]
    assert set(m) >= {"local", "fedavg", "coordinate median", "trimmed mean", "multi-krum",
                      "geometric median", "clair", "oracle"}
    assert m["clair"]["test_mse"] < m["local"]["test_mse"]
    assert m["clair"]["test_mse"] < m["fedavg"]["test_mse"]
    # The gain is the subspace projection: excess error well below local's.
    assert m["clair"]["excess_mse"] < 0.5 * m["local"]["excess_mse"]
    # No benign client lost to a false alarm in this easy setting.
    assert regression_result["clair"]["fpr"] == 0.0
    by_kind = regression_result["clair"]["flagged_by_kind"]
    assert by_kind["benign"] == 0.0
    assert set(by_kind) <= {"benign", "arbitrary", "shuffled", "other_task", "heavy_noise", "sign_flip"}


def test_flagged_by_kind_counts_by_hand():
    verdict = [True, False, True, False, False, True]
    benign = [True, True, False, False, False, True]
    kinds = ["none", "none", "shuffled", "shuffled", "sign_flip", "none"]
    assert flagged_by_kind(verdict, benign, kinds) == {"benign": 1 / 3, "shuffled": 0.5, "sign_flip": 1.0}


@pytest.mark.slow   # 200 training steps of 12 MLP clients, then every aggregator (~20 s on 2 cores)
def test_mlp_ranks_clair_ahead_of_local_and_fedavg():
    out = run_mlp(2, num_clients=12, contamination=0.25, num_samples=(100, 150), steps=200, num_test=100)
    m = out["methods"]
    assert out["train_loss"]["final"] < out["train_loss"]["initial"]
    assert m["clair"]["test_mse"] < m["local"]["test_mse"]
    assert m["clair"]["test_mse"] < m["fedavg"]["test_mse"]


@pytest.mark.slow   # the regression study end to end
def test_cli_prints_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "out.json"
    rc = cli.main(["regression", "--seed", "3", "--clients", "16", "--contamination", "0.25", "--p", "16",
                   "--q", "4", "--samples", "40", "80", "--json", str(path), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| clair |" in printed and "| fedavg |" in printed
    data = json.loads(path.read_text())
    assert data["config"]["num_clients"] == 16
    assert data["methods"]["clair"]["test_mse"] > 0


def test_bad_options_are_value_errors():
    with pytest.raises(ValueError, match="num_samples must exceed p"):
        run_regression(0, num_clients=8, p=16, q=2, num_samples=10)
    with pytest.raises(ValueError, match="estimator"):
        run_regression(0, estimator="lasso")
    with pytest.raises(ValueError, match="mode"):
        run_mlp(0, mode="bogus")
