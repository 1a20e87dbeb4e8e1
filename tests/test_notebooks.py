"""The research notebooks run top to bottom in a fresh kernel on every CI run, and are
committed with their outputs (so plots show on GitHub). Each ends with assertions on its
own claims, so a change that breaks a claim fails here."""

import pathlib

import pytest

pytestmark = pytest.mark.notebooks

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():  # core: needs nothing
    assert [p.name for p in NOTEBOOKS] == [
        "01_nf4_vs_int4_gaussian.ipynb", "02_nf4_vs_int4_minilm.ipynb", "03_beyond_plain_nf4_minilm.ipynb",
        "04_gptq_nf4_minilm.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_with_outputs(path):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "re-run the notebook and commit it with outputs"
    assert sum("image/png" in o.get("data", {}) for c in code for o in c.outputs) >= 2
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_top_to_bottom_in_a_fresh_kernel(path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError, naming the cell, on any error or failed assertion
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
