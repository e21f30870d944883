"""examples/quickstart.ipynb executed for real with nbclient and an IPython kernel: it starts the agent
inline, calls it with agent.tools.wsclient and plots the call's latency figures."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"


def outputs_of(cell) -> tuple[str, list[dict]]:
    text = "".join(o.get("text", "") for o in cell.get("outputs", []) if o["output_type"] == "stream")
    rich = [o["data"] for o in cell.get("outputs", []) if o["output_type"] in ("display_data", "execute_result")]
    return text, rich


@pytest.mark.slow
def test_notebook_quickstart_runs_a_call_and_plots_its_latency():
    stored = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in stored.cells if c.cell_type == "code"), \
        "commit the notebook without outputs"
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # raises CellExecutionError, with the cell and its traceback, if any cell fails
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    cells = [c for c in notebook.cells if c.cell_type == "code"]
    texts = [outputs_of(c)[0] for c in cells]
    rich = [data for c in cells for data in outputs_of(c)[1]]

    # launched inline: the page in an iframe, at the server the notebook started
    page = next(d["text/html"] for d in rich if "<iframe" in d.get("text/html", ""))
    url = re.search(r'src="(http://127\.0\.0\.1:\d+)/"', page).group(1)
    assert f"page: {url}" in "".join(texts)

    # the call went both ways
    call = re.search(r"sent ([\d.]+) s, received ([\d.]+) s of the agent's audio; errors: none", "".join(texts))
    assert call, texts
    assert float(call.group(1)) > 1.0 and float(call.group(2)) >= float(call.group(1)) - 0.5
    assert any("audio/wav" in d.get("text/html", "") or "<audio" in d.get("text/html", "") for d in rich)

    # the figures: a plot, and numbers that are measurements
    assert any("image/png" in d for d in rich)
    figures = re.search(r"frames (\d+): round trip p50 (-?\d+) ms, p95 (-?\d+) ms; step p50 ([\d.]+) ms",
                        "".join(texts))
    assert figures, texts
    frames, p50, p95 = (int(figures.group(i)) for i in (1, 2, 3))
    step = float(figures.group(4))
    assert frames >= 12 and 0 < p50 <= p95 < 5000 and step > 0
