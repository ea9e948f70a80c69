"""The quickstart notebook runs top to bottom (so it cannot rot)."""

import nbformat
import pytest
from helpers import REPO
from nbclient import NotebookClient

pytestmark = pytest.mark.timeout(600)


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    notebook = nbformat.read(REPO / "experiments" / "quickstart.ipynb", as_version=4)
    NotebookClient(
        notebook,
        timeout=500,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()
    outputs = [
        o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
    ]
    assert not [o for o in outputs if o.get("output_type") == "error"]
