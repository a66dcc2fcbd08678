"""Read a study directory (docs/layout.md) into plain data. No statistics, no formatting.

    study = load_study(Path("studies-out/lab2"))
    study.variants["bn"].runs[0].status   # "done" | "failed" | "missing" | "invalid"

Every file is read as stored; nothing is trained or recomputed. A run that is absent,
failed, or whose result.json cannot be used is kept, with a one-line reason, so the report
can show it; only runs with status "done" feed the statistics.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnlab.errors import CnnlabError, ConfigError
from cnnlab import rundir
from cnnlab.rundir import read_metrics
from cnnlab.study import Comparison, Stopping, comparison_from, stopping_from

STATUSES = ("done", "failed", "missing", "invalid")


class StudyError(CnnlabError):
    """A directory is not a study directory, or its study.json cannot be used."""


@dataclass
class Run:
    variant: str
    seed: int
    path: Path
    status: str  # one of STATUSES
    reason: str = ""  # one line, for anything but "done"
    result: dict[str, Any] | None = None
    metrics: dict[str, list[float]] | None = None  # metrics.csv, column -> values
    metrics_note: str = ""  # why metrics is None, when it is
    log: str | None = None  # train.log
    config_toml: str | None = None
    summary: str | None = None  # summary.txt: the model summary written at training time
    graph_dot: str | None = None  # graph.dot: the model graph's source, likewise
    export: dict[str, Any] | None = None  # export/export.json (cnnlab.deploy), when the run was exported
    export_note: str = ""  # why an export is absent or unusable (export-error.txt's line, ...)

    @property
    def finished(self) -> bool:
        return self.status == "done"


@dataclass
class Variant:
    name: str
    config: dict[str, Any]  # the resolved config dict from study.json
    spec: Any = None  # cnnlab.spec.ModelSpec or cnnlab.factory.FactorySpec; None when the config does not parse
    spec_error: str = ""
    runs: list[Run] = field(default_factory=list)  # one per study seed, sorted by seed

    @property
    def finished(self) -> list[Run]:
        return [r for r in self.runs if r.finished]

    def stored(self, what: str) -> str | None:
        """A finished run's summary.txt ("summary") or graph.dot ("graph_dot"), the first seed's
        that has one: what the report shows for a model it must not build (a factory's)."""
        return next((getattr(r, what) for r in self.finished if getattr(r, what)), None)

    @property
    def data_info(self) -> dict[str, Any]:
        """result.json `data` of the first finished run ({} when none finished)."""
        for r in self.finished:
            data = r.result.get("data")
            if isinstance(data, dict):
                return data
        return {}


@dataclass
class Study:
    path: Path
    name: str
    seeds: list[int]
    variants: dict[str, Variant]  # in study.json order
    comparisons: dict[str, Comparison]  # in study.json order
    command: str
    versions: dict[str, Any]
    stopping: Stopping = field(default_factory=Stopping)
    grid: dict[str, list] = field(default_factory=dict)  # factor -> levels, for a [grid] study
    cells: dict[str, dict[str, Any]] = field(default_factory=dict)  # grid variant -> {factor: level}
    export: dict[str, Any] | None = None  # the study's export options, when it exports its runs

    @property
    def sequential(self) -> bool:
        return self.stopping.until_resolved

    @property
    def runs(self) -> list[Run]:
        return [r for v in self.variants.values() for r in v.runs]


# ---------------------------------------------------------------------------- study.json

def _fail(path: Path, what: str) -> StudyError:
    return StudyError(f"{path}: {what}")


def load_study(path: Path) -> Study:
    """Read study.json and every run directory it names. Raises StudyError (one line)."""
    path = Path(path)
    if not path.exists():
        raise _fail(path, "no such directory")
    if not path.is_dir():
        raise _fail(path, "not a directory; give a study directory (made by `cnnlab study FILE --out DIR`)")
    sj = path / "study.json"
    if not sj.is_file():
        raise _fail(path, "not a study directory: study.json is missing "
                          "(a study directory is made by `cnnlab study FILE --out DIR`)")
    try:
        data = json.loads(sj.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(sj, f"not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise _fail(sj, "expected a JSON object")
    for key, typ in (("name", str), ("seeds", list), ("variants", dict)):
        if not isinstance(data.get(key), typ):
            raise _fail(sj, f"`{key}` must be a {typ.__name__}, got {data.get(key)!r}")
    seeds = data["seeds"]
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise _fail(sj, f"`seeds` must be a list of integers, got {seeds!r}")
    comparisons_raw = data.get("comparisons", {})
    if not isinstance(comparisons_raw, dict):
        raise _fail(sj, f"`comparisons` must be an object, got {comparisons_raw!r}")
    try:
        comparisons = {name: comparison_from(value, f"comparison {name!r}", data["variants"])
                       for name, value in comparisons_raw.items()}
        stopping = stopping_from(data.get("stopping", {}), "stopping")
    except ConfigError as e:
        raise _fail(sj, str(e)) from e
    per_variant = data.get("variant_seeds") if isinstance(data.get("variant_seeds"), dict) else {}
    variants = {}
    for name, config in data["variants"].items():
        if not isinstance(config, dict):
            raise _fail(sj, f"variant {name!r}: expected a config object, got {config!r}")
        vseeds = per_variant.get(name, seeds)
        if not (isinstance(vseeds, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in vseeds)):
            raise _fail(sj, f"`variant_seeds` of {name!r} must be a list of integers, got {vseeds!r}")
        variants[name] = _load_variant(path, name, config, sorted(set(vseeds)))
    versions = data.get("versions") if isinstance(data.get("versions"), dict) else {}
    command = data.get("command") if isinstance(data.get("command"), str) else ""
    grid = data.get("grid") if isinstance(data.get("grid"), dict) else {}
    cells = data.get("cells") if isinstance(data.get("cells"), dict) else {}
    export = data.get("export") if isinstance(data.get("export"), dict) else None
    all_seeds = sorted(set(seeds).union(*(set(r.seed for r in v.runs) for v in variants.values())))
    return Study(path, data["name"], all_seeds, variants, comparisons, command, versions, stopping, grid, cells,
                 export)


def _load_variant(study: Path, name: str, config: dict, seeds: list[int]) -> Variant:
    from cnnlab.config import config_from_dict

    v = Variant(name, config)
    try:
        v.spec = config_from_dict(config, f"study.json: variants.{name}").model
    except CnnlabError as e:
        v.spec_error = str(e)
    v.runs = [load_run(rundir.run_dir(study, name, s), name, s) for s in seeds]
    return v


# ---------------------------------------------------------------------------- one run

def _read_text(p: Path) -> str | None:
    try:
        return p.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def load_run(path: Path, variant: str, seed: int) -> Run:
    run = Run(variant, seed, path, "missing")
    if not path.is_dir():
        run.reason = "no run directory: not started"
        return run
    run.config_toml = _read_text(path / rundir.CONFIG)
    run.log = _read_text(path / rundir.LOG)
    run.summary = _read_text(path / rundir.SUMMARY)
    run.graph_dot = _read_text(path / rundir.GRAPH)
    run.metrics, run.metrics_note = metric_columns(path)
    rj = path / rundir.RESULT
    if not rj.is_file():
        run.reason = "no result.json: still running, or stopped before it finished"
        return run
    try:
        result = json.loads(rj.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        run.status, run.reason = "invalid", f"result.json cannot be read: {e}"
        return run
    if not isinstance(result, dict):
        run.status, run.reason = "invalid", "result.json is not a JSON object"
        return run
    run.result = result
    status = result.get("status")
    if status == "failed":
        run.status = "failed"
        err = result.get("error") if isinstance(result.get("error"), dict) else {}
        where = ", ".join(f"{k} {err[k]}" for k in ("epoch", "step") if err.get(k) is not None)
        message = str(err.get("message") or "failed (no message)")
        run.reason = message + (f" (at {where})" if where and "epoch" not in message else "")
        return run
    if status != "done":
        run.status, run.reason = "invalid", f"result.json status is {status!r}, expected \"done\" or \"failed\""
        return run
    missing = [k for k in ("test_accuracy",) if not _number(result.get(k))]
    if missing:
        run.status, run.reason = "invalid", f"result.json lacks a numeric {', '.join(missing)}"
        return run
    run.status = "done"
    run.export, run.export_note = read_export(path)
    return run


def read_export(run_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """A run's export/export.json, or (None, why): its export-error.txt, or that it was not exported."""
    text = _read_text(run_dir / "export" / "export.json")
    if text is None:
        err = _read_text(run_dir / "export-error.txt")
        return None, (err.strip() if err else "not exported")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"export.json cannot be read: {e}"
    return (data, "") if isinstance(data, dict) else (None, "export.json is not a JSON object")


def metric_columns(run_dir: Path) -> tuple[dict[str, list[float]] | None, str]:
    """metrics.csv as {column: [floats]} (rows sorted by epoch), or (None, why)."""
    rows, why = read_metrics(run_dir)
    if not rows:
        return None, why
    return {c: [float(r[c]) for r in rows] for c in rows[0]}, ""


def load_predictions(run: Run) -> tuple[dict[str, np.ndarray] | None, str]:
    """predictions.npz of a run, or (None, why). Never pickles."""
    p = run.path / rundir.PREDICTIONS
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        return None, f"{run.variant} seed {run.seed}: no predictions.npz"
    except (OSError, ValueError, EOFError) as e:
        return None, f"{run.variant} seed {run.seed}: predictions.npz cannot be read: {e}"
    need = ("labels", "pred_eval", "pred_train")
    lacking = [k for k in need if k not in arrays]
    if lacking:
        return None, f"{run.variant} seed {run.seed}: predictions.npz lacks {', '.join(lacking)}"
    return arrays, ""


# ---------------------------------------------------------------------------- test images

def load_test_images(name: str, expected_sha256: dict[str, str] | None = None
                     ) -> tuple[np.ndarray | None, list[str] | None, str]:
    """(test images for display, class names or None, "") or (None, None, why).

    Images come as uint8, (N, H, W) for grayscale and (N, H, W, 3) for RGB, ready for
    imshow: float datasets are shown as they are when they lie in [0, 1], stretched from
    their min..max otherwise. Loads from the local cache only (never downloads), and refuses
    a dataset whose test images differ from the ones the runs recorded (the t10k-images file
    of IDX data; the sha256 that covers the whole dataset for the other sources). Never
    raises: a report must build without its pictures.
    """
    try:
        from cnnlab.data import load_dataset
    except ImportError as e:
        return None, None, f"the dataset loader is not available ({e})"
    try:
        ds = load_dataset(name, fetch=False)
        images = np.asarray(ds.test_images)
        classes = list(ds.classes) if getattr(ds, "classes", None) else None
        got = dict(getattr(ds, "sha256", {}) or {})
    except Exception as e:  # noqa: BLE001 - any failure only costs the pictures
        return None, None, f"dataset {name!r} could not be loaded: {e}"
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        return None, None, f"dataset {name!r}: test images have shape {images.shape}, expected (N, C, H, W), C 1 or 3"
    if images.dtype != np.uint8:
        x = np.nan_to_num(images.astype(np.float64))
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 1.0)
        if lo < 0.0 or hi > 1.0:
            x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
        images = np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
    images = images[:, 0] if images.shape[1] == 1 else np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    expected = dict(expected_sha256 or {})
    if any("t10k-images" in f for f in expected):  # IDX: only the test image file matters
        expected = {f: d for f, d in expected.items() if "t10k-images" in f}
    for fname, digest in sorted(expected.items()):
        if fname in got and got[fname] != digest:
            return None, None, (f"dataset {name!r} on this machine differs from the one the runs used "
                                f"({fname}: sha256 {got[fname][:12]}... here, {digest[:12]}... in result.json)")
    return images, classes, ""
