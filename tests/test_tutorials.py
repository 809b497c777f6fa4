"""The tutorials: each notebook runs top to bottom offline, and is committed without outputs.

Each notebook is executed in a fresh ``python3`` kernel (the kernel spec ipykernel installs), with
``PYTHONPATH`` pointing at this checkout, so the notebooks test the code next to them even where
another copy of the package is installed; the working directory is a temporary one, so the files
the notebooks write (``tutorial_runs/``) never land in the repository. Any error in any cell fails
the test. The notebooks are sized to run in about a minute each on two CPU cores; the test does not
assert on wall time (a per-cell timeout only catches hangs), but prints it.
"""

import os
import re
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "tutorials").glob("*.ipynb"))
IDS = [path.stem for path in NOTEBOOKS]
CELL_TIMEOUT_S = 600
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
COLAB_LINK = re.compile(r"\(https://colab\.research\.google\.com/github/[^/\s]+/[^/\s]+/blob/main/tutorials/([^)\s]+)\)")


def test_the_tutorials_exist():
    assert len(NOTEBOOKS) >= 4, NOTEBOOKS
    assert all(re.fullmatch(r"\d\d_\w+", path.stem) for path in NOTEBOOKS), "name them NN_topic.ipynb (reading order)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {i} has outputs: clear them before committing"
            assert cell.execution_count is None, f"cell {i} has an execution count: clear outputs before committing"
        assert "execution" not in cell.metadata, f"cell {i} keeps execution timings in its metadata"
    assert "widgets" not in nb.metadata


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_opens_in_colab(path):
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and BADGE in first.source, "the first cell carries the Open in Colab badge"
    links = COLAB_LINK.findall(first.source)
    assert links == [path.name], f"the badge must link to tutorials/{path.name}, not {links}"
    setup = next(cell for cell in nb.cells if cell.cell_type == "code")
    assert '"google.colab" in sys.modules' in setup.source and "pip" in setup.source, (
        "the first code cell installs the package on Colab (and does nothing elsewhere)"
    )
    marked = [line for cell in nb.cells if cell.cell_type == "code" for line in cell.source.splitlines()
              if line.startswith("MODEL = ")]
    assert len(marked) == 1 and "# <- on a GPU" in marked[0], f"one marked MODEL line, found {marked}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.pop("MPLBACKEND", None)  # let the kernel use its inline backend
    client = NotebookClient(
        nb, kernel_name="python3", timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(tmp_path)}}
    )
    start = time.perf_counter()
    client.execute(env=env)  # raises CellExecutionError, naming the cell, on the first error
    print(f"{path.name}: {time.perf_counter() - start:.1f} s")
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors
