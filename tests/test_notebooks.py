"""Every notebook under notebooks/ runs top to bottom in quick mode (CLAIR_QUICK=1).

Slow tier (``-m slow``): each notebook is a run of its own study (15-60 s on 2
cores, about 4 minutes for all); the functions they call are tested in the fast
tier on the same quick shapes (test_end_to_end, test_digits, test_copy_task).
"""

import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_in_quick_mode(path, tmp_path, monkeypatch):
    monkeypatch.setenv("CLAIR_QUICK", "1")
    # Figures of a quick run go to a scratch folder, never over the published ones.
    monkeypatch.setenv("CLAIR_FIGURES", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError if a cell fails
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
