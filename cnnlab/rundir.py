"""A run directory's metrics file, in one place: train.py writes it, and studies, the report,
the Python API and the benchmarks read it through read_metrics (docs/layout.md)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

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
        text = (Path(run_dir) / "metrics.csv").read_text(encoding="utf-8", errors="replace")
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
