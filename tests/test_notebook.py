"""examples/lab2.ipynb runs from top to bottom in a real Jupyter kernel (nbclient + ipykernel)
on a small slice of synthetic IDX data, and its cells show what the notebook promises:
the summary table, the run's card, the curves, a prediction, the study's verdict table and
the link to its report. The study's runs train in spawned worker processes started from the
kernel, which is what a notebook user gets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "lab2.ipynb"


def _outputs(cell, mime: str) -> list[str]:
    found = []
    for out in cell.get("outputs", []):
        data = out.get("data", {})
        if mime in data:
            found.append(data[mime])
        elif mime == "stream" and out.get("output_type") == "stream":
            found.append(out.get("text", ""))
    return found


def _cell(nb, snippet: str):
    hits = [c for c in nb.cells if c.cell_type == "code" and snippet in c.source]
    assert len(hits) == 1, snippet
    return hits[0]


def test_the_stored_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def test_lab2_notebook_runs_and_shows_its_results(tmp_path, idx_dir, monkeypatch):
    for key, value in {"CNNLAB_EXAMPLE_DATA": f"idx:{idx_dir}", "CNNLAB_EXAMPLE_EPOCHS": "2",
                       "CNNLAB_EXAMPLE_LIMIT": "300", "CNNLAB_EXAMPLE_VAL_SIZE": "100",
                       "CNNLAB_EXAMPLE_SEEDS": "2", "CNNLAB_EXAMPLE_WORKERS": "1",
                       "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)
    work = tmp_path / "work"
    work.mkdir()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": str(work)}})
    client.execute()  # raises CellExecutionError, with the cell's traceback, when a cell fails

    summary = _cell(nb, "cnnlab.summary(")
    from cnnlab.summary import summarize
    from cnnlab.spec import PRESETS

    assert _outputs(summary, "text/plain") == [summarize(PRESETS["lab2-3c3f-bn"], (1, 28, 28), 10)[0]]
    html = _outputs(summary, "text/html")[0]
    assert "<th>Layer (type)</th>" in html and "Conv2d-1" in html and "Total params: 59,734" in html

    card = _outputs(_cell(nb, "run = cnnlab.train("), "text/html")[0]
    assert 'class="cnnlab-run"' in card and "lab2-3c3f-bn" in card
    assert "split 300 train / 100 validation / 200 test; 2 epochs" in card and "seed 0" in card
    assert "eval mode (model.eval())" in card and "train mode (the lab&#x27;s way)" in card
    assert card.count(" %</strong>") == 2 and 'src="data:image/png;base64,' in card

    assert _outputs(_cell(nb, "run.plot()"), "image/png")  # the curves, drawn
    frame = _outputs(_cell(nb, "run.metrics_frame()"), "text/html")[0]
    assert "val_acc" in frame and "train_loss" in frame

    from cnnlab import load_run

    run = load_run(work / "lab2-notebook" / "run-lab2-3c3f-bn-seed0")
    pred = _outputs(_cell(nb, "run.predict(index=4)"), "text/html")[0]
    assert f"<strong>predicted {run.result['example']['predicted']}</strong>" in pred

    verdicts = _outputs(_cell(nb, "study = cnnlab.study("), "text/html")[0]
    assert 'class="cnnlab-study"' in verdicts and "<th>verdict</th>" in verdicts
    assert "<td class=\"l\">bn</td>" in verdicts and "report.html</a>" in verdicts
    assert "4 of 4 runs finished" in verdicts
    table = _outputs(_cell(nb, "pd.DataFrame(study.table())"), "text/html")[0]
    assert "lab2-3c3f-bn" in table and "ci_low" in table

    link = _outputs(_cell(nb, "FileLink("), "text/html")[0]
    assert "lab2-notebook/study-bn/report.html" in link
    assert (work / "lab2-notebook" / "study-bn" / "report.html").is_file()
    assert os.path.getsize(work / "lab2-notebook" / "study-bn" / "report.html") > 10_000
