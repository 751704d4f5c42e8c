"""The tutorial notebook runs top to bottom (its FAST mode, on a tiny generated dataset) so that it cannot rot.

The code cells are executed in order in one namespace, as a kernel would: no Jupyter needed. Markdown cells are
skipped; a cell with IPython syntax (magics, shell escapes) fails here on purpose, since a plain Python run could
not execute it.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pytest

from jemlab.data.testing import write_idx_dataset

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "tutorial.ipynb"


def code_cells(path: Path) -> list[str]:
    notebook = json.loads(path.read_text())
    assert notebook["nbformat"] == 4
    return ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]


def test_notebook_has_no_stored_outputs():
    notebook = json.loads(NOTEBOOK.read_text())
    for cell in notebook["cells"]:
        assert not cell.get("outputs"), "clear the notebook's outputs before committing"


def test_tutorial_runs_in_fast_mode(tmp_path, monkeypatch):
    matplotlib.use("Agg")  # plt.show() becomes a no-op
    import matplotlib.pyplot as plt

    data = write_idx_dataset(tmp_path / "data", n_train=700, n_test=200, seed=0)
    monkeypatch.setenv("JEMLAB_TUTORIAL_FAST", "1")
    monkeypatch.setenv("JEMLAB_TUTORIAL_DATA", str(data))
    monkeypatch.setenv("JEMLAB_TUTORIAL_DIR", str(tmp_path / "work"))
    namespace: dict = {"__name__": "__tutorial__"}
    try:
        for index, source in enumerate(code_cells(NOTEBOOK)):
            try:
                exec(compile(source, f"{NOTEBOOK.name}[code cell {index}]", "exec"), namespace)
            except Exception as err:
                pytest.fail(f"code cell {index} failed: {type(err).__name__}: {err}\n--- cell ---\n{source}")
    finally:
        plt.close("all")
    assert namespace["FAST"] is True
    assert (tmp_path / "work" / "run" / "checkpoints" / "latest").exists()
    assert 0 <= namespace["calibration"]["ece"] <= 1
