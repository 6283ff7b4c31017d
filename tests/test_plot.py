"""A picture of the verdict: ClairResult.plot and clair aggregate --plot (matplotlib, lazily)."""

import json
import os
import sys
import warnings

import numpy as np
import pytest

import clair_jax as cj

pytest.importorskip("matplotlib")
sys.path.insert(0, os.path.dirname(__file__))


def _result():
    fed = cj.data.make_federation(0, num_clients=12, p=10, q=3, rank=2, contamination=0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return cj.clair(fed.updates)


def test_result_plot_draws_three_panels(tmp_path):
    res = _result()
    assert np.asarray(res.spectrum).shape[-1] >= 1 and np.all(np.diff(np.asarray(res.spectrum)) <= 1e-6)
    fig = res.plot(tmp_path / "v.png", client_names=[f"c{j}" for j in range(12)])
    assert (tmp_path / "v.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bars, heat, spectra = [a for a in fig.axes if a.get_label() != "<colorbar>"]
    assert len(bars.patches) == 12 and [t.get_text() for t in bars.get_yticklabels()][6] == "c6 (contaminated)"
    assert heat.images[0].get_array().shape == (12, 1)
    assert len(spectra.lines) >= 2                       # the spectrum and its r̂ marker


@pytest.mark.slow   # the CLI end to end; ClairResult.plot is tested in the fast tier
def test_aggregate_plot(tmp_path):
    from test_verdict import write_noisy_federation

    from clair_jax.cli import main

    dirs, _ = write_noisy_federation(tmp_path / "in")
    code = main(["aggregate", *dirs, "--out", str(tmp_path / "out"), "--json", str(tmp_path / "r.json"),
                 "--plot", str(tmp_path / "v.png"), "--quiet"])
    assert code == 0 and (tmp_path / "v.png").stat().st_size > 10_000
    report = json.loads((tmp_path / "r.json").read_text())
    group = report["groups"][0]
    assert len(group["spectrum"]) == len(group["modules"]) and len(group["noise_edge"]) == len(group["modules"])
    from clair_jax.plotting import report_figure

    fig = report_figure(report)
    assert fig.axes[1].images[0].get_array().shape == (10, 4)


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch):
    res = _result()
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # `import matplotlib` now raises ImportError
    with pytest.raises(ImportError, match="plotting the verdict needs matplotlib: pip install"):
        res.plot()
