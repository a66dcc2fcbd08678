"""Faults injected for real: SIGKILL at chosen points, a full disk, hostile and corrupt files, locks.

Each test states the promise it checks; docs/reliability.md lists them.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnlab.checkpoint import load
from cnnlab.errors import CheckpointError

ARGS = ["--preset", "lab2-3c3f-bn", "--epochs", "3", "--val-size", "100", "--threads", "1", "--seed", "3"]


def cli(*args, env=None) -> subprocess.CompletedProcess:
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "cnnlab.cli", *args], capture_output=True, text=True, env=e)


def metrics_without_time(run: Path) -> list[tuple]:
    return [tuple(v for k, v in r.items() if k != "seconds") for r in csv.DictReader(open(run / "metrics.csv"))]


def assert_identical_runs(a: Path, b: Path) -> None:
    ta, ma = load(a / "checkpoints/last.safetensors")
    tb, mb = load(b / "checkpoints/last.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:  # model, optimizer and RNG state: bit for bit
        assert torch.equal(ta[k], tb[k]), k
    assert metrics_without_time(a) == metrics_without_time(b)
    assert (a / "train.log").read_text() == (b / "train.log").read_text()
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (a, b))
    for k in ("test_accuracy", "test_accuracy_eval", "test_accuracy_train", "test_loss", "best_epoch", "example"):
        assert ra[k] == rb[k], k
    pa, pb = np.load(a / "predictions.npz"), np.load(b / "predictions.npz")
    assert all(np.array_equal(pa[k], pb[k]) for k in pa.files)


@pytest.fixture
def reference(tmp_path_factory, idx_dir):
    out = tmp_path_factory.mktemp("ref") / "run"
    r = cli("train", *ARGS, "--data", f"idx:{idx_dir}", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("fault", [
    {"CNNLAB_FAULT": "kill:1:4"},  # in the middle of an epoch
    {"CNNLAB_FAULT": "kill:0:0"},  # before the first checkpoint exists
    {"CNNLAB_FAULT": "kill-after-checkpoint:1:0"},  # checkpoint written, metrics.csv not yet
    {"CNNLAB_FAULT_WRITE": "last.safetensors:2"},  # during the checkpoint write, before its rename
    {"CNNLAB_FAULT_WRITE": "metrics.csv:3"},  # during a metrics write
])
def test_kill_then_resume_is_bit_identical(tmp_path, idx_dir, reference, fault):
    run = tmp_path / "run"
    r = cli("train", *ARGS, "--data", f"idx:{idx_dir}", "--out", str(run), env=fault)
    assert r.returncode == -signal.SIGKILL
    assert not (run / "result.json").exists()
    if (run / "checkpoints/last.safetensors").exists():
        load(run / "checkpoints/last.safetensors")  # the surviving checkpoint is whole and verifies
    r = cli("train", "--resume", str(run))
    assert r.returncode == 0, r.stderr
    assert_identical_runs(reference, run)
    epochs = [row[0] for row in metrics_without_time(run)]
    assert epochs == ["0", "1", "2"]  # no duplicated or missing epochs
    leftovers = [p.name for p in run.rglob(".tmp-*")]
    assert leftovers == []  # temp files of the killed write were cleaned up


def test_resume_of_a_finished_run_changes_nothing(tmp_path, idx_dir, reference):
    before = {p: p.read_bytes() for p in reference.rglob("*") if p.is_file() and p.name != ".lock"}
    r = cli("train", *ARGS, "--data", f"idx:{idx_dir}", "--out", str(reference))
    assert r.returncode == 2 and "already holds a run" in r.stderr
    assert before == {p: p.read_bytes() for p in reference.rglob("*") if p.is_file() and p.name != ".lock"}


@pytest.fixture
def small_fs(tmp_path):
    """A real 4 MB tmpfs, so writes fail with ENOSPC (needs root, as in CI)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_full_disk_loses_nothing(small_fs, idx_dir, tmp_path):
    from cnnlab.config import config_from_dict
    from cnnlab.data import load_dataset
    from cnnlab.engine.loop import train_run

    cfg = config_from_dict({"data": {"name": f"idx:{idx_dir}", "val_size": 100},
                            "model": {"conv": [{"out_channels": 4, "pool": 2}], "fc": [{"width": 256}]},
                            "train": {"epochs": 3, "threads": 1}})
    ds = load_dataset(cfg.data.name)
    run = small_fs / "run"

    def fill_at_epoch_1(epoch, step, steps):
        if epoch == 1 and step == 0:  # leave only a few KB: the epoch-1 checkpoint cannot fit
            st = os.statvfs(small_fs)
            with open(small_fs / "filler", "wb") as f:
                f.write(b"\0" * (st.f_bavail * st.f_frsize - 8192))

    with pytest.raises(OSError) as e:
        train_run(cfg, run, dataset=ds, progress=fill_at_epoch_1, echo=lambda s: None)
    assert e.value.errno == 28  # ENOSPC
    tensors, meta = load(run / "checkpoints/last.safetensors")  # the epoch-0 checkpoint survived intact
    assert meta["epoch"] == 0
    assert [p.name for p in run.rglob(".tmp-*")] == []
    assert metrics_without_time(run)[0][0] == "0"
    (small_fs / "filler").unlink()
    ref = train_run(cfg, tmp_path / "ref", dataset=ds, echo=lambda s: None)
    res = train_run(cfg, run, dataset=ds, resume=True, echo=lambda s: None)
    assert res["test_accuracy"] == ref["test_accuracy"] and metrics_without_time(run) == metrics_without_time(tmp_path / "ref")


def test_full_disk_via_cli_is_one_line(small_fs, idx_dir):
    (small_fs / "filler").write_bytes(b"\0" * (os.statvfs(small_fs).f_bavail * 4096 - 4096))
    r = cli("train", *ARGS, "--data", f"idx:{idx_dir}", "--out", str(small_fs / "run"))
    assert r.returncode == 2 and "No space left on device" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_read_only_output_directory(tmp_path, idx_dir):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)]).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        r = cli("train", *ARGS, "--data", f"idx:{idx_dir}", "--out", str(ro / "run"))
        assert r.returncode == 2 and "cannot create run directory" in r.stderr and "writable" in r.stderr
    finally:
        subprocess.run(["umount", "-l", str(ro)])


def test_run_directory_in_use_is_refused(tmp_path, idx_dir):
    from filelock import FileLock

    run = tmp_path / "run"
    run.mkdir()
    with FileLock(str(run / ".lock")):
        r = cli("train", *ARGS, "--data", f"idx:{idx_dir}", "--out", str(run))
    assert r.returncode == 2 and "in use by another cnnlab process" in r.stderr


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_pickle_checkpoint_is_refused_without_side_effect(tmp_path, reference):
    _Evil.marker = tmp_path / "pwned"
    ckpt = reference / "checkpoints" / "last.safetensors"
    # a classic pickle, and torch.save's zip format
    for blob in (pickle.dumps({"model": _Evil()}), None):
        if blob is None:
            torch.save({"model": _Evil()}, ckpt)
        else:
            ckpt.write_bytes(blob)
        r = cli("predict", str(reference), "--index", "0")
        assert r.returncode == 2 and "never unpickles" in r.stderr
        assert not _Evil.marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "flip-data", "flip-header", "empty"])
def test_corrupt_checkpoint_is_detected(tmp_path, reference, damage):
    ckpt = reference / "checkpoints" / "last.safetensors"
    blob = bytearray(ckpt.read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "flip-data":
        blob[-100] ^= 0x01
    elif damage == "flip-header":
        i = blob.index(b'"epoch')  # a digit in the JSON metadata
        blob[i + 10] ^= 0x01
    else:
        blob = bytearray()
    ckpt.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError):
        load(ckpt)
    r = cli("predict", str(reference), "--index", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr and str(ckpt) in r.stderr


def test_checkpoint_from_another_architecture_is_refused(tmp_path, idx_dir, reference):
    other = tmp_path / "other"
    assert cli("train", "--preset", "lab2-2c2f", "--epochs", "1", "--val-size", "100", "--data", f"idx:{idx_dir}",
               "--out", str(other)).returncode == 0
    (reference / "checkpoints" / "last.safetensors").write_bytes((other / "checkpoints" / "last.safetensors").read_bytes())
    r = cli("predict", str(reference), "--index", "0")
    assert r.returncode == 2 and "architecture differs" in r.stderr and "model.conv" in r.stderr


def test_study_worker_killed_mid_run_is_resumed(tmp_path, idx_dir):
    study = tmp_path / "s.toml"
    study.write_text(f'name = "k"\nseeds = 2\n[base]\ndata = {{ name = "idx:{idx_dir}", val_size = 100 }}\n'
                     f'train = {{ epochs = 2, threads = 1 }}\n[variants]\na = {{ model = {{ preset = "lab2-2c2f" }} }}\n')
    out = tmp_path / "out"
    env = {"CNNLAB_FAULT": "kill:1:2", "CNNLAB_FAULT_ONCE": str(tmp_path / "fired")}
    r = cli("study", str(study), "--out", str(out), "--workers", "1", "--no-report", env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "fired").exists()  # a worker really was killed
    assert "2 runs trained, 0 already finished, 0 failed" in r.stdout
    for seed in (0, 1):
        run = out / "runs" / "a" / f"seed-{seed}"
        assert json.loads((run / "result.json").read_text())["status"] == "done"
        assert [row[0] for row in metrics_without_time(run)] == ["0", "1"]
    # and the killed run ended exactly as an undisturbed one
    ref = tmp_path / "ref"
    r = cli("study", str(study), "--out", str(ref), "--workers", "1", "--no-report")
    assert r.returncode == 0, r.stderr
    for seed in (0, 1):
        assert_identical_runs(ref / "runs/a" / f"seed-{seed}", out / "runs/a" / f"seed-{seed}")


def test_two_studies_on_one_directory(tmp_path, idx_dir):
    """A second `cnnlab study` on a directory whose study is running is refused. The second one
    starts from inside the first's executor, so the first surely holds its lock then."""
    from cnnlab.study.executors import LocalExecutor
    from cnnlab.study.runner import run_study
    from cnnlab.study import load_study

    study = tmp_path / "s.toml"
    study.write_text(f'seeds = 1\n[base]\ndata = {{ name = "idx:{idx_dir}", val_size = 100 }}\n'
                     f'train = {{ epochs = 2, threads = 1 }}\n[variants]\na = {{ model = {{ preset = "lab2-2c2f" }} }}\n')
    out = tmp_path / "out"

    class SecondStudyFirst(LocalExecutor):
        def run(self, tasks, on_done):
            self.second = cli("study", str(study), "--out", str(out), "--no-report")
            super().run(tasks, on_done)

    executor = SecondStudyFirst(1)
    counts = run_study(load_study(study), out, executor, report=False)
    assert executor.second.returncode == 2 and "another `cnnlab study` is running" in executor.second.stderr
    assert counts["done"] == 1 and json.loads((out / "runs/a/seed-0/result.json").read_text())["status"] == "done"
    # and once the first has finished, the directory is free again: a re-run is a no-op
    again = cli("study", str(study), "--out", str(out), "--no-report")
    assert again.returncode == 0 and "0 runs trained, 1 already finished" in again.stdout
