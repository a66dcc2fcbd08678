"""Experiment trackers: TensorBoard and MLflow record a run as it trains (docs/trackers.md).

`[train] log = ["tensorboard", "mlflow"]` (or `cnnlab train --log tensorboard,mlflow`, or
`cnnlab.train(..., log=[...])`) makes every run also record
- each epoch's metrics.csv row: train_loss, train_acc, val_loss, val_acc, seconds (step = epoch);
- test_accuracy_eval and test_accuracy_train, as result.json has them (at the last epoch's step);
- the resolved configuration (TensorBoard: config.toml's text; MLflow: params) and the seed.

TensorBoard writes RUN_DIR/tb/. MLflow writes to $MLFLOW_TRACKING_URI, or else to
sqlite:///STUDY_DIR/mlflow.db for a study's run (RUN_DIR = STUDY_DIR/runs/<variant>/seed-<n>,
beside STUDY_DIR/study.json) and to sqlite:///RUN_DIR/mlflow.db for a single run; one experiment
per study (the study's name; single runs: "cnnlab"), one MLflow run per (variant, seed).

An unknown name is a ConfigError when the configuration is read (cnnlab.config.validate); a
tracker whose package is missing when a run starts is a ConfigError naming the extra
(`require`). A tracker that fails later (a server that does not answer, a full disk) prints one
warning line and is not called again for that run; the run itself goes on as without it.

This module imports no tracker package until a run starts one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import time
from pathlib import Path

from cnnlab.errors import ConfigError

TRACKERS = ("tensorboard", "mlflow")  # each is also the name of its pip extra and of its package
SCALARS = ("train_loss", "train_acc", "val_loss", "val_acc", "seconds")  # metrics.csv's columns but epoch
FINAL = ("test_accuracy_eval", "test_accuracy_train")  # from result.json


def require(names) -> None:
    """A ConfigError naming the extra to install for the first tracker whose package is missing."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"log: the {name} tracker needs the {name} extra, which is not installed: "
                              f"pip install -e '.[{name}]'")


class Trackers:
    """A run's trackers, as engine.run.Run calls them: epoch(row) after each epoch, finish(result)
    at the end (None: the run failed). Every call is guarded: a tracker that raises prints one
    warning line through `echo` and is dropped for the rest of the run."""

    def __init__(self, cfg, out, start_epoch: int, echo):
        self.echo, self.live = echo, {}
        kinds = {"tensorboard": TensorBoard, "mlflow": MLflow}
        for name in cfg.train.log:
            tracker = self._guard(name, lambda kind=kinds[name]: kind(cfg, Path(out), start_epoch))
            if tracker is not None:
                self.live[name] = tracker

    def _guard(self, name: str, call):
        try:
            return call()
        except Exception as e:  # whatever a tracker raises, training goes on without it
            self.live.pop(name, None)
            text = " ".join(str(e).split())
            self.echo(f"warning: {name} tracking failed and is off for the rest of this run: "
                      f"{type(e).__name__}: {text[:300]}")
            return None

    def epoch(self, row: dict) -> None:
        for name, tracker in list(self.live.items()):
            self._guard(name, lambda tracker=tracker: tracker.epoch(row))

    def finish(self, result: dict | None) -> None:
        for name, tracker in list(self.live.items()):
            self._guard(name, lambda tracker=tracker: tracker.finish(result))
        self.live = {}


def _study_of(out: Path, seed: int) -> tuple[Path, str] | None:
    """(study directory, variant) when `out` is a study's run directory, else None."""
    from cnnlab.rundir import run_dir

    study, variant = out.parent.parent.parent, out.parent.name
    if run_dir(study, variant, seed) == out and (study / "study.json").is_file():
        return study, variant
    return None


def _after_existing_event_files(tb: Path) -> None:
    """Wait (under a second) until a new event file will sort after every file in tb/.
    TensorBoard reads a directory's event files in name order, and a name starts with the
    second it was created (events.out.tfevents.<seconds>.<host>.<pid>...): a resumed run's
    file made in the same second as the interrupted run's could sort first (by pid), and
    its restart would then purge the resumed epochs instead of the interrupted ones."""
    newest = 0
    for f in tb.glob("events.out.tfevents.*"):
        stamp = f.name.split(".")[3]
        if stamp.isdigit():
            newest = max(newest, int(stamp))
    while int(time.time()) <= newest:
        time.sleep(min(1.0, newest + 1 - time.time()) + 0.01)


class TensorBoard:
    """RUN_DIR/tb/: a study's runs show in `tensorboard --logdir STUDY_DIR/runs` as <variant>/seed-<n>/tb."""

    def __init__(self, cfg, out: Path, start_epoch: int):
        from torch.utils.tensorboard import SummaryWriter

        from cnnlab.config import dump_config

        # purge_step: a resumed run hides what an interrupted one wrote from start_epoch on
        _after_existing_event_files(out / "tb")
        self.writer = SummaryWriter(str(out / "tb"), purge_step=start_epoch)
        self.last = cfg.train.epochs - 1
        if start_epoch == 0:  # else written before the interruption, and kept
            config = "".join(f"    {line}\n" for line in dump_config(cfg).splitlines())  # a Markdown code block
            self.writer.add_text("config", config, 0)
            self.writer.add_text("seed", str(cfg.train.seed), 0)
        self.writer.flush()

    def epoch(self, row: dict) -> None:
        for key in SCALARS:
            self.writer.add_scalar(key, row[key], row["epoch"])
        self.writer.flush()  # an interrupted run keeps what it logged

    def finish(self, result: dict | None) -> None:
        if result is not None:
            for key in FINAL:
                self.writer.add_scalar(key, result[key], self.last)
        self.writer.close()


# Unless the user set them, MLflow's HTTP calls fail in seconds, not after its default
# 7 retries with backoff (minutes): a tracking server that is down must not stall the runs.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


@contextlib.contextmanager
def _fail_fast():
    added = [k for k in _HTTP_DEFAULTS if k not in os.environ]
    os.environ.update({k: _HTTP_DEFAULTS[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _experiment_id(client, name: str, artifacts: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifacts)
    except Exception:
        exp = client.get_experiment_by_name(name)  # another process made it first
        if exp is None:
            raise
        return exp.experiment_id


class MLflow:
    """One MLflow run per run directory (found again by its cnnlab.run_dir tag on resume)."""

    def __init__(self, cfg, out: Path, start_epoch: int):
        from filelock import FileLock
        from mlflow import MlflowClient

        out = out.resolve()
        seed = cfg.train.seed
        study = _study_of(out, seed)
        home = study[0] if study else out
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        lock, artifacts = contextlib.nullcontext(), None
        if not uri:  # a local SQLite store; its first use creates the tables: one process at a time
            uri = f"sqlite:///{home / 'mlflow.db'}"
            lock, artifacts = FileLock(str(home / ".mlflow.lock")), (home / "mlartifacts").as_uri()
        if study:
            try:
                experiment = json.loads((home / "study.json").read_text())["name"]
            except (OSError, ValueError, KeyError, TypeError):
                experiment = home.name
        else:
            experiment = "cnnlab"
        self.last = cfg.train.epochs - 1
        with _fail_fast(), lock:
            self.client = client = MlflowClient(tracking_uri=uri)
            exp_id = _experiment_id(client, experiment, artifacts)
        with _fail_fast():
            found = client.search_runs([exp_id], filter_string=f"tags.`cnnlab.run_dir` = '{out}'", max_results=1)
            if found:  # this run directory's MLflow run: resumed, or restarted after a crash
                self.run_id = found[0].info.run_id
                return
            tags = {"cnnlab.run_dir": str(out), "seed": str(seed)}
            if study:
                tags.update(study=experiment, variant=study[1])
            name = f"{study[1]}/seed-{seed}" if study else out.name
            self.run_id = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
            from mlflow.entities import Param

            params = {f"{section}.{k}": v if isinstance(v, str) else json.dumps(v)
                      for section, table in cfg.to_dict().items() for k, v in table.items()}
            client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])

    def _metrics(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with _fail_fast():
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def epoch(self, row: dict) -> None:
        self._metrics({k: row[k] for k in SCALARS}, row["epoch"])

    def finish(self, result: dict | None) -> None:
        if result is not None:
            self._metrics({k: result[k] for k in FINAL}, self.last)
        with _fail_fast():
            self.client.set_terminated(self.run_id, "FINISHED" if result is not None else "FAILED")
