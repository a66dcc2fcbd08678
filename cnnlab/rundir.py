"""The run directory's format, in one place (docs/layout.md): where a study keeps its runs,
the files' names, metrics.csv's columns, and the readers that studies, the report, the
Python API and the benchmarks use. The engine (cnnlab.engine) writes a run directory."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

CONFIG = "config.toml"  # the resolved configuration
RESULT = "result.json"  # written last: a run is finished (or failed) when it exists
METRICS = "metrics.csv"
LOG = "train.log"
SPLIT = "split.npz"
PREDICTIONS = "predictions.npz"
SUMMARY = "summary.txt"  # the model summary, written at training time (the report never imports model code)
GRAPH = "graph.dot"  # the model graph's Graphviz source, likewise
CHECKPOINTS = "checkpoints"


def run_dir(study_dir: Path, variant: str, seed: int) -> Path:
    return Path(study_dir) / "runs" / variant / f"seed-{seed}"


def existing_seeds(out: Path, variant: str) -> list[int]:
    """The seeds that have a run directory for `variant` under study directory `out`."""
    found = []
    for d in (Path(out) / "runs" / variant).glob("seed-*"):
        tail = d.name[len("seed-"):]
        if d.is_dir() and tail.isdigit():
            found.append(int(tail))
    return sorted(found)


def read_result(run_dir) -> dict | None:
    """A run directory's result.json, or None while there is none (or it is unreadable)."""
    p = Path(run_dir) / RESULT
    try:
        return json.loads(p.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


METRIC_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds")


def metrics_csv(rows: list[dict]) -> str:
    """metrics.csv's text: the header, then one row per epoch (floats with 6 decimals)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, METRIC_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{r[k]:.6f}" if isinstance(r[k], float) else r[k]) for k in METRIC_COLUMNS})
    return buf.getvalue()


def read_metrics(run_dir) -> tuple[list[dict], str]:
    """(rows, "") with metrics.csv's rows sorted by epoch (epoch an int, the other columns that
    are there floats), or ([], why) when there is no metrics.csv or it cannot be used."""
    try:
        text = (Path(run_dir) / METRICS).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return [], "no metrics.csv"
    try:
        rows = [{c: (int(float(r[c])) if c == "epoch" else float(r[c])) for c in METRIC_COLUMNS if c in r}
                for r in csv.DictReader(io.StringIO(text))]
    except (ValueError, TypeError, csv.Error) as e:
        return [], f"metrics.csv cannot be parsed: {e}"
    if not rows:
        return [], "metrics.csv has no rows"
    if "epoch" not in rows[0]:
        return [], "metrics.csv has no epoch column"
    return sorted(rows, key=lambda r: r["epoch"]), ""
