"""Experiment trackers (cnnlab.trackers, the tensorboard and mlflow extras) on tiny synthetic
IDX data: what TensorBoard's event files and MLflow's store hold is read back with their own
readers and compared with the run directory (metrics.csv, result.json, config.toml); a study
maps to one TensorBoard run and one MLflow run per (variant, seed); a tracker that fails warns
once and leaves the run as it would be without it; unknown names and missing packages are
one-line errors before any training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import cnnlab
from cnnlab.cli import main
from cnnlab.config import RunConfig, config_from_dict, dump_config
from cnnlab.errors import ConfigError

from conftest import TINY_STUDY

TINY = dict(epochs=2, val_size=100, threads=1)
pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")  # MLflow's use of SQLAlchemy
COLUMNS = ("train_loss", "train_acc", "val_loss", "val_acc", "seconds")


@pytest.fixture(autouse=True)
def _local_mlflow_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # every test picks its own store


def near(x):
    return pytest.approx(x, rel=1e-6, abs=1e-5)  # metrics.csv keeps 6 decimals, TensorBoard float32


def tensorboard_run(tb: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb))
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    texts = {tag.split("/")[0]: acc.Tensors(tag)[0].tensor_proto.string_val[0].decode()  # "config/text_summary"
             for tag in acc.Tags()["tensors"]}
    return scalars, texts


def mlflow_runs(store: Path, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id])


def assert_same_as_the_run_directory(run: cnnlab.Run, scalars=None, mlflow=None):
    """TensorBoard's scalars and/or an MLflow run's metrics are metrics.csv and result.json."""
    epochs = [m["epoch"] for m in run.metrics]
    for key in COLUMNS:
        csv = [m[key] for m in run.metrics]
        if scalars is not None:
            assert [s for s, _ in scalars[key]] == epochs and [v for _, v in scalars[key]] == near(csv)
        if mlflow is not None:
            client, mrun = mlflow
            history = sorted((m.step, m.value) for m in client.get_metric_history(mrun.info.run_id, key))
            assert [s for s, _ in history] == epochs and [v for _, v in history] == near(csv)
    for key in ("test_accuracy_eval", "test_accuracy_train"):
        if scalars is not None:
            assert scalars[key] == [(epochs[-1], pytest.approx(run.result[key], abs=1e-4))]
        if mlflow is not None:
            assert mlflow[1].data.metrics[key] == run.result[key]


def flat_config(run_dir: Path) -> dict[str, str]:
    table = tomllib.loads((run_dir / "config.toml").read_text())
    return {f"{s}.{k}": v if isinstance(v, str) else json.dumps(v) for s, t in table.items() for k, v in t.items()}


# ---------------------------------------------------------------------------- single runs

def test_tensorboard_records_epochs_final_accuracies_config_and_seed(tmp_path, idx_dir, capsys):
    pytest.importorskip("tensorboard")
    run = cnnlab.train(preset="lab2-2c2f", data=f"idx:{idx_dir}", seed=3, out=tmp_path / "r", log=["tensorboard"],
                       **TINY)
    assert "warning" not in capsys.readouterr().out
    scalars, texts = tensorboard_run(run.path / "tb")
    assert_same_as_the_run_directory(run, scalars=scalars)
    assert texts["config"] == "".join(f"    {line}\n" for line in (run.path / "config.toml").read_text().splitlines())
    assert texts["seed"] == "3"
    assert run.config.train.log == ("tensorboard",) and "tensorboard" in texts["config"]  # in config.toml


def test_mlflow_records_a_single_run_interrupted_and_resumed_as_one_run(tmp_path, idx_dir):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    out = tmp_path / "r"
    code = (f"import cnnlab; cnnlab.train(preset='lab2-2c2f', data=r'idx:{idx_dir}', epochs=3, val_size=100, "
            f"threads=1, seed=1, out=r'{out}', log='mlflow,tensorboard', progress=False)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "CNNLAB_FAULT": "kill:1:4"})  # killed in epoch 1
    assert r.returncode == -signal.SIGKILL, r.stderr
    run = cnnlab.resume(out, progress=False)
    assert [m["epoch"] for m in run.metrics] == [0, 1, 2]
    client, [mrun] = mlflow_runs(out / "mlflow.db", "cnnlab")  # the killed run's MLflow run, finished
    assert mrun.info.status == "FINISHED" and mrun.info.run_name == "r"
    scalars, texts = tensorboard_run(out / "tb")
    assert_same_as_the_run_directory(run, scalars=scalars, mlflow=(client, mrun))  # every epoch once
    assert texts["seed"] == "1"  # written by the killed process, kept
    assert mrun.data.params == flat_config(out) and mrun.data.params["train.seed"] == "1"
    assert mrun.data.tags["seed"] == "1" and mrun.data.tags["cnnlab.run_dir"] == str(out.resolve())


def test_batched_runs_are_tracked_each_in_its_own_run_directory(tmp_path, idx_dir):
    pytest.importorskip("tensorboard")
    from cnnlab.engine.batched import train_batched
    from cnnlab.data import load_dataset

    table = {"data": {"name": f"idx:{idx_dir}", "val_size": 100}, "model": {"preset": "lab2-2c2f"},
             "train": {"epochs": 2, "threads": 1, "log": ["tensorboard"]}}
    cfgs = [config_from_dict({**table, "train": {**table["train"], "seed": s}}) for s in (0, 1)]
    outs = [tmp_path / f"s{s}" for s in (0, 1)]
    train_batched(cfgs, outs, dataset=load_dataset(f"idx:{idx_dir}"), echos=[lambda _: None] * 2)
    for out in outs:
        run = cnnlab.load_run(out)
        assert "batched" in run.result["kernels"]
        scalars, texts = tensorboard_run(out / "tb")
        assert_same_as_the_run_directory(run, scalars=scalars)
        assert texts["seed"] == str(run.config.train.seed)


# ---------------------------------------------------------------------------- a study

def test_a_study_is_one_tensorboard_logdir_and_one_mlflow_experiment(tmp_path, idx_dir, capsys):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    text = TINY_STUDY.format(data=idx_dir, extra="")
    logged = text.replace("threads = 1 }", 'threads = 1, log = ["tensorboard", "mlflow"] }')
    assert logged != text
    file = tmp_path / "tiny.toml"
    file.write_text(logged)
    out = tmp_path / "out"
    assert main(["study", str(file), "--out", str(out), "--seeds", "1", "--workers", "1", "--no-report"]) == 0
    study = cnnlab.load_study(out)
    assert sorted(study.runs) == [("a", 0), ("b", 0)]

    tb = EventMultiplexer().AddRunsFromDirectory(str(out / "runs"))
    tb.Reload()
    assert sorted(tb.Runs()) == ["a/seed-0/tb", "b/seed-0/tb"]  # `tensorboard --logdir STUDY_DIR/runs`

    client, mruns = mlflow_runs(out / "mlflow.db", "tiny")
    assert sorted(m.info.run_name for m in mruns) == ["a/seed-0", "b/seed-0"]
    for mrun in mruns:
        variant = mrun.data.tags["variant"]
        run = study.runs[(variant, 0)]
        assert mrun.data.tags["seed"] == "0" and mrun.data.tags["study"] == "tiny"
        assert mrun.data.params == flat_config(run.path)
        scalars, texts = tensorboard_run(run.path / "tb")
        assert_same_as_the_run_directory(run, scalars=scalars, mlflow=(client, mrun))
        assert not (run.path / "mlflow.db").exists()
        assert "warning" not in (run.path / "stdout.log").read_text()

    capsys.readouterr()  # the study again: its runs' config.toml (with `log`) match, nothing is retrained
    assert main(["study", str(file), "--out", str(out), "--seeds", "1", "--workers", "1", "--no-report"]) == 0
    assert "2 of 2 runs already finished" in capsys.readouterr().out


# ---------------------------------------------------------------------------- failures

def test_an_unreachable_mlflow_server_warns_once_and_changes_nothing(tmp_path, idx_dir, monkeypatch, capsys):
    pytest.importorskip("mlflow")
    plain = cnnlab.train(preset="lab2-2c2f", data=f"idx:{idx_dir}", out=tmp_path / "plain", progress=False, **TINY)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    run = cnnlab.train(preset="lab2-2c2f", data=f"idx:{idx_dir}", out=tmp_path / "r", log=["mlflow"], **TINY)
    lines = capsys.readouterr().out.splitlines()
    warnings = [line for line in lines if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: mlflow tracking failed and is off for the rest")
    assert run.status == "done" and len(lines) == 1 + 2 + 1  # the warning, the epoch lines, the test accuracy
    assert [{k: v for k, v in m.items() if k != "seconds"} for m in run.metrics] == \
           [{k: v for k, v in m.items() if k != "seconds"} for m in plain.metrics]
    for key in ("test_accuracy", "test_accuracy_eval", "test_accuracy_train", "example"):
        assert run.result[key] == plain.result[key]


def test_a_tracker_that_fails_mid_run_is_called_no_more(tmp_path, idx_dir, monkeypatch, capsys):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    calls = []

    def full_disk(self, *args, **kwargs):
        calls.append(args)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", full_disk)
    run = cnnlab.train(preset="lab2-2c2f", data=f"idx:{idx_dir}", out=tmp_path / "r", log=["tensorboard"], **TINY)
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert warnings == ["warning: tensorboard tracking failed and is off for the rest of this run: "
                        "OSError: [Errno 28] No space left on device"]
    assert len(calls) == 1 and run.status == "done" and len(run.metrics) == 2


def test_unknown_tracker_names_are_config_errors(tmp_path, idx_dir, capsys):
    with pytest.raises(ConfigError, match=r"config: log: unknown tracker 'wandb'; available: tensorboard, mlflow"):
        config_from_dict({"train": {"log": ["wandb"]}})
    with pytest.raises(ConfigError, match=r'log: must be a list of tracker names, e.g. \["tensorboard", "mlflow"\]'):
        config_from_dict({"train": {"log": "tensorboard"}})
    out = tmp_path / "r"
    assert main(["train", "--preset", "lab2-2c2f", "--data", f"idx:{idx_dir}", "--log", "tensorboard,wandb",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == ("cnnlab train: error: command line: log: unknown tracker 'wandb'; "
                   "available: tensorboard, mlflow\n") and not out.exists()


@pytest.mark.parametrize("name", ["tensorboard", "mlflow"])
def test_a_missing_tracker_package_names_its_extra_before_anything_is_written(name, tmp_path, idx_dir, monkeypatch,
                                                                              capsys):
    monkeypatch.setitem(sys.modules, name, None)  # as if the extra were not installed
    out = tmp_path / "r"
    assert main(["train", "--preset", "lab2-2c2f", "--data", f"idx:{idx_dir}", "--log", name, "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"cnnlab train: error: log: the {name} tracker needs the {name} extra, which "
                                       f"is not installed: pip install -e '.[{name}]'\n")
    assert not out.exists()
    file = tmp_path / "tiny.toml"
    file.write_text(TINY_STUDY.format(data=idx_dir, extra=f'c = {{ train = {{ log = ["{name}"] }} }}'))
    with pytest.raises(ConfigError, match=rf"pip install -e '\.\[{name}\]'"):  # once, before any run of a study
        cnnlab.study(file, out=tmp_path / "study", progress=False)
    assert not (tmp_path / "study").exists()


# ---------------------------------------------------------------------------- the config key

def test_log_round_trips_and_is_left_out_of_config_toml_when_empty(tmp_path):
    plain = RunConfig()
    assert "log" not in plain.to_dict()["train"] and "log" not in dump_config(plain)  # as before trackers existed
    cfg = config_from_dict({"train": {"log": ["mlflow", "tensorboard", "mlflow"]}})
    assert cfg.train.log == ("mlflow", "tensorboard") and cfg.to_dict()["train"]["log"] == ["mlflow", "tensorboard"]
    assert config_from_dict(tomllib.loads(dump_config(cfg))) == cfg
    assert tomllib.loads(dump_config(cfg)) == cfg.to_dict()  # what a study's check of existing runs compares

    from types import SimpleNamespace

    from cnnlab.commands._common import config_from_args

    args = dict(preset="lab2-2c2f", data=None, epochs=None, batch_size=None, lr=None, seed=None, device=None,
                limit=None, val_size=None, eval_mode=None, threads=None)
    assert config_from_args(SimpleNamespace(**args, log=" tensorboard , mlflow")).train.log == ("tensorboard", "mlflow")
    assert config_from_args(SimpleNamespace(**args, log="")).train.log == ()
    assert config_from_args(SimpleNamespace(**args, log=None)).train.log == ()


def test_importing_cnnlab_and_its_config_imports_no_tracker():
    code = ("import cnnlab, cnnlab.config, cnnlab.trackers, sys; "
            "print([m for m in ('torch', 'tensorboard', 'mlflow') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_a_resumed_runs_event_file_sorts_after_the_interrupted_ones(tmp_path):
    """TensorBoard reads event files in name order; a resumed run's file made in the same second
    as the interrupted run's must not sort first (it would purge the resumed epochs)."""
    pytest.importorskip("tensorboard")
    import socket
    import time

    from cnnlab.trackers import _after_existing_event_files

    tb = tmp_path / "tb"
    tb.mkdir()
    now = int(time.time())
    # the interrupted run's file: this second, and a pid that sorts after any real one
    old = f"events.out.tfevents.{now}.{socket.gethostname()}.99999999.0"
    (tb / old).write_bytes(b"")
    _after_existing_event_files(tb)
    assert int(time.time()) > now
    from torch.utils.tensorboard import SummaryWriter

    SummaryWriter(str(tb)).close()
    names = sorted(p.name for p in tb.iterdir())
    assert len(names) == 2 and names[0] == old  # the interrupted run's file is read first
