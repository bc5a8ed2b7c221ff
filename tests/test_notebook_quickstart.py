"""notebooks/quickstart.ipynb runs from top to bottom (nbclient, a real kernel) and ends with a
privacy report whose files exist and agree with what the notebook printed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_builds_a_report(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("DIFFMEM_NO_PROGRESS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's tempfile.mkdtemp lands here
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    html = Path(re.search(r"^report: (.+report\.html)$", text, re.M).group(1))
    assert html.is_file() and html.is_relative_to(tmp_path)
    facts = json.loads((html.parent / "report.json").read_text())
    assert f"risk level: {facts['risk']['level']}" in text
    # the notebook ran every stage the report has a section for
    assert {k for k, v in facts["sections"].items() if v != "included"} == set()
    assert facts["attribution"]["attributions_available"]
    rich = [o for o in outputs if "text/html" in o.get("data", {})]
    assert any("diffmem-attribution" in o["data"]["text/html"] for o in rich)
