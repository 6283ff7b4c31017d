"""The digits study (scikit-learn's bundled 8x8 digits): data, fits, scoring, CLI."""

import json

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn")

from clair_jax import cli  # noqa: E402
from clair_jax.experiments import digits as D  # noqa: E402


@pytest.fixture(scope="module")
def data():
    return D.load_digits()


def test_ridge_fit_matches_scikit_learn(data):
    from sklearn.linear_model import Ridge

    images, labels = data
    x = D._with_intercept(images[:50])
    y = np.eye(10)[labels[:50]]
    ours = D.ridge_fit(x, y, 1.0)
    ref = Ridge(alpha=1.0, fit_intercept=False).fit(x, y).coef_.T
    np.testing.assert_allclose(ours, ref, rtol=1e-8, atol=1e-10)


def test_relabelling_is_a_linear_map_of_the_coefficients(data):
    # Ridge is linear in Y: flipped or parity labels give Θ̂ A, same column space.
    images, labels = data
    x = D._with_intercept(images[:60])
    rng = np.random.default_rng(0)
    theta = D.ridge_fit(x, D._targets("none", images[:60], labels[:60], rng), 1.0)
    flip = D.ridge_fit(x, D._targets("label_flip", images[:60], labels[:60], rng), 1.0)
    parity = D.ridge_fit(x, D._targets("parity", images[:60], labels[:60], rng), 1.0)
    perm = np.eye(10)[:, ::-1]                     # column c ← column 9 − c
    to_parity = np.eye(10)[np.arange(10) % 2]      # row c → column c mod 2
    np.testing.assert_allclose(flip, theta @ perm, atol=1e-10)
    np.testing.assert_allclose(parity, theta @ to_parity, atol=1e-10)


def test_federation_layout(data):
    fed = D.make_digits_federation(3, kind="mixed", num_clients=20, contamination=0.3, data=data)
    assert fed.updates.shape == (20, 65, 10)
    assert fed.benign.sum() == 14
    assert sorted(set(fed.kinds[~fed.benign])) == sorted(D.POISONS)
    assert np.all((fed.num_samples >= 30) & (fed.num_samples <= 60))
    np.testing.assert_allclose(fed.mix.sum(1), 1.0)
    assert fed.test_x.shape[1] == 65 and len(fed.test_y) == len(data[1]) - len(data[1]) // 2
    clean = D.make_digits_federation(3, kind="none", num_clients=20, data=data)
    assert clean.benign.all()
    with pytest.raises(ValueError, match="kind"):
        D.make_digits_federation(0, kind="bogus", data=data)


def test_accuracy_weights_each_class_by_the_clients_mix(data):
    fed = D.make_digits_federation(0, kind="none", num_clients=4, data=data)
    # A classifier that always says "3": accuracy = the client's weight on class 3.
    always3 = np.zeros((4, 65, 10))
    always3[:, -1, 3] = 1.0
    np.testing.assert_allclose(D.accuracy(always3, fed), fed.mix[:, 3], atol=1e-12)


@pytest.mark.slow   # the quick notebook's study end to end (~35 s on 2 cores)
def test_cli_runs_the_study_and_writes_json(tmp_path, capsys):
    path = tmp_path / "digits.json"
    # The quick notebook's federation (seed 0, mixed, K = 40): its programs compile once per test run.
    assert cli.main(["digits", "--kind", "mixed", "--seeds", "1", "--quiet", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "| mixed |" in printed and "clair (pooling)" in printed
    saved = json.loads(path.read_text())
    run = saved["runs"][0]
    assert set(run["methods"]) == set(D.METHODS)
    acc = {m: v["accuracy"] for m, v in run["methods"].items()}
    assert all(0.0 <= a <= 1.0 for a in acc.values())
    # Pooling the honest clients beats fitting alone on 30-60 images.
    assert acc["benign fedavg"] > acc["local"]
    assert saved["summary"]["mixed"]["benign fedavg"] == pytest.approx(acc["benign fedavg"])
    assert len(run["per_client"]["local"]) == 40
    # The clients' reported noise along Û: larger than σ̂ says, so Λ is lower, and the
    # contaminated clients the model cannot explain inside Û are set aside.
    assert run["clair"]["shrinkage_reported"] < run["clair"]["shrinkage"]
    assert acc["clair (reported noise)"] > max(acc["clair (pooling)"], acc["local"])
    assert run["clair"]["outlying_contaminated"] > run["clair"]["outlying_benign"]
    assert "set aside (reported)" in printed


def test_cli_reaches_the_study_and_its_checks():
    """Fast smoke of ``clair digits``: the command parses and its options reach the study."""
    with pytest.raises(ValueError, match="contamination"):
        cli.main(["digits", "--kind", "mixed", "--seeds", "1", "--contamination", "1.5", "--quiet"])


@pytest.mark.slow
def test_reported_noise_sets_an_other_task_group_inside_u_aside(data):
    # Pixel regression: a coherent group of another task, invisible to the detection
    # (r̂ 14-15, crowded). With the clients' reported noise its coordinates inside Û are
    # out of the pooling model's reach: it is set aside, Û is fitted again without it,
    # and the benign clients beat their local fits.
    fed = D.make_digits_federation(0, kind="pixel_regression", num_clients=40, data=data)
    acc, result, shrink = D.evaluate_digits(fed)
    out = shrink["outlying"]
    assert out[~fed.benign].mean() >= 0.9 and out[fed.benign].mean() <= 0.05
    ben = fed.benign
    assert acc["clair (reported noise)"][ben].mean() > acc["local"][ben].mean() + 0.02
    assert acc["clair (pooling)"][ben].mean() == pytest.approx(acc["local"][ben].mean())   # crowded: local
