"""notebooks/tinylm_jax.ipynb: committed without outputs, and runs top to bottom in a fresh
kernel on the tiny experiment."""

import os
import re

import nbformat
from conftest import REPO
from nbclient import NotebookClient

NOTEBOOK = REPO / "notebooks" / "tinylm_jax.ipynb"


def _with_parameters(notebook: nbformat.NotebookNode, values: dict) -> None:
    """Append assignments to the cell tagged `parameters`; each must override a name it sets."""
    cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    for name in values:
        assert re.search(rf"^{name} = ", cell.source, re.M), f"no parameter {name}"
    cell.source += "\n" + "\n".join(f"{name} = {value!r}" for name, value in values.items())


def test_the_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_the_notebook_runs_top_to_bottom_on_a_tiny_run(tiny_toml, tiny_corpus, tmp_path,
                                                       monkeypatch):
    # The kernel imports this checkout, whatever other copy of the package is installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    _with_parameters(notebook, {"EXPERIMENT": str(tiny_toml), "RUN_DIR": str(tmp_path / "run"),
                                "DATA": str(tiny_corpus), "FULL_PROTOCOL": False,
                                "SHORT_EPOCHS": 1, "SHORT_STEPS_PER_EPOCH": 3,
                                "MAX_NEW_TOKENS": 20})
    # Raises CellExecutionError, with the cell and its traceback, if any cell fails.
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "".join(out.get("text", "") for out in outputs)
    assert "a short run" in text and "epoch 1/1:" in text
    assert "Prompt: 'The one side'" in text and "validation window 0" in text
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 4  # the loss and perplexity curves, the chosen head, every head
    assert (tmp_path / "run" / "attention.npz").is_file()
