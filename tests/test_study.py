"""Studies end to end on synthetic data: runs, skipping, failures, locking, report rebuild."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_tiny_study

from cnnlab.cli import main
from cnnlab.errors import ConfigError
from cnnlab.study import load_study, study_from_dict

def write_study(tmp_path, idx_dir, extra="") -> Path:
    return write_tiny_study(tmp_path / "tiny.toml", idx_dir, extra)


def results(out: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(out / "runs")): json.loads(p.read_text())
            for p in sorted((out / "runs").glob("*/seed-*/result.json"))}


def test_tiny_study_end_to_end_then_rerun_is_a_noop(tmp_path, idx_dir, capsys):
    study, out = write_study(tmp_path, idx_dir), tmp_path / "out"
    assert main(["study", str(study), "--out", str(out), "--workers", "2"]) == 0
    text = capsys.readouterr().out
    assert "4 runs trained, 0 already finished, 0 failed" in text and f"report: {out / 'report.html'}" in text
    res = results(out)
    assert sorted(res) == ["a/seed-0", "a/seed-1", "b/seed-0", "b/seed-1"]
    assert all(r["status"] == "done" for r in res.values())
    assert {r["seed"] for r in res.values()} == {0, 1}
    resolved = json.loads((out / "study.json").read_text())
    assert resolved["seeds"] == [0, 1] and resolved["comparisons"] == {"fc": {"a": "b", "b": "a", "margin": 0.5}}
    assert resolved["variants"]["b"]["model"]["preset"] == "lab2-2c3f"
    assert (out / "study.toml").read_text() == study.read_text()
    # same seed, same variant in a study == the same numbers a separate `cnnlab train` gives
    single = tmp_path / "single"
    assert main(["train", "--preset", "lab2-2c2f", "--data", f"idx:{idx_dir}", "--val-size", "100", "--epochs", "1",
                 "--threads", "1", "--seed", "1", "--out", str(single)]) == 0
    assert (single / "metrics.csv").read_text().split("\n")[1].rsplit(",", 1)[0] == \
        (out / "runs/a/seed-1/metrics.csv").read_text().split("\n")[1].rsplit(",", 1)[0]

    # second invocation: nothing is retrained, the report is rebuilt identically
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    report = {p.name: p.read_bytes() for p in [out / "report.md", out / "report.html"]}
    capsys.readouterr()
    assert main(["study", str(study), "--out", str(out)]) == 0
    assert "4 of 4 runs already finished; 0 to run" in capsys.readouterr().out
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    assert report == {p.name: p.read_bytes() for p in [out / "report.md", out / "report.html"]}


def test_study_survives_a_failed_run(tmp_path, idx_dir, capsys):
    # variant `boom` diverges (absurd learning rate): it fails, the others finish, the report says so
    study = write_study(tmp_path, idx_dir, extra='boom = { train = { lr = 1e12 } }')
    out = tmp_path / "out"
    assert main(["study", str(study), "--out", str(out), "--workers", "2"]) == 1
    text = capsys.readouterr().out
    assert "4 runs trained, 0 already finished, 2 failed" in text
    assert "FAILED  boom/seed-0: run" in text and "loss became" in text
    res = results(out)
    assert [k for k, r in res.items() if r["status"] == "failed"] == ["boom/seed-0", "boom/seed-1"]
    assert "boom" in (out / "report.md").read_text()
    # a deterministic failure is not retried on a re-run
    capsys.readouterr()
    main(["study", str(study), "--out", str(out)])
    assert "6 of 6 runs already finished" in capsys.readouterr().out


def test_changed_study_refuses_to_mix_configs(tmp_path, idx_dir, capsys):
    study, out = write_study(tmp_path, idx_dir), tmp_path / "out"
    assert main(["study", str(study), "--out", str(out), "--seeds", "1", "--no-report"]) == 0
    capsys.readouterr()
    assert main(["study", str(study), "--out", str(out), "--seeds", "1", "--epochs", "2", "--no-report"]) == 2
    assert "different configuration" in capsys.readouterr().err


def test_locked_study_dir_is_refused(tmp_path, idx_dir, capsys):
    from filelock import FileLock

    study, out = write_study(tmp_path, idx_dir), tmp_path / "out"
    out.mkdir()
    with FileLock(str(out / ".study.lock")):
        assert main(["study", str(study), "--out", str(out)]) == 2
    assert "another `cnnlab study` is running" in capsys.readouterr().err
    assert not (out / "runs").exists()


@pytest.mark.parametrize("text, message", [
    ('seeds = 2\n[variants]\n', r"\[variants\] is missing or empty"),
    ('seeds = 2\n', r"\[variants\] is missing or empty"),
    ('sedes = 2\n[variants]\na = {}\n', r"unknown key\(s\) sedes"),
    ('seeds = 0\n[variants]\na = {}\n', r"seeds must be >= 1"),
    ('seeds = [1, 1]\n[variants]\na = {}\n', r"seeds has duplicates"),
    ('[variants]\na = { train = { epochs = "x" } }\n', r"variants.a: train: `epochs` must be int"),
    ('[variants]\na = { modle = {} }\n', r"variants.a: unknown section\(s\) modle"),
    ('[variants]\na = {}\n[comparisons]\nx = ["a", "b"]\n', r"comparisons.x: unknown variant\(s\) b"),
    ('[variants]\na = {}\n[comparisons]\nx = ["a", "a"]\n', r"compares a with itself"),
    ('[variants]\na = {}\na = {}\n', r"not valid TOML"),  # duplicate names
    ('[variants]\n"a b" = {}\n', r"must use letters"),
])
def test_bad_study_files(tmp_path, text, message):
    p = tmp_path / "s.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_study(p)


def test_bad_study_fails_before_any_run(tmp_path, idx_dir, capsys):
    # variant c's shape cannot work on 16x16 images: nothing may start
    extra = 'c = { model = { conv = [{ out_channels = 4, pool = 4 }, { out_channels = 4, kernel = 5 }] } }'
    study, out = write_study(tmp_path, idx_dir, extra), tmp_path / "out"
    assert main(["study", str(study), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "variant c: conv2" in err and "smaller than the 5x5 kernel" in err
    assert not (out / "runs").exists()


def test_lab2_study_file_is_valid():
    study = load_study(Path(__file__).resolve().parents[1] / "studies" / "lab2.toml")
    assert len(study.seeds) >= 3
    assert set(study.variants) >= {"lab2-3c3f-bn", "lab2-3c3f", "lab2-2c3f", "lab2-2c2f"}
    assert (study.comparisons["bn"].a, study.comparisons["bn"].b) == (("lab2-3c3f-bn",), ("lab2-3c3f",))
    assert study.stopping.until_resolved and study.stopping.max_seeds == 8  # ./run.sh: about 15 minutes
    p025 = [v for v in study.variants.values() if any(b.dropout == 0.25 for b in v.model.conv)]
    assert len(p025) == 1
    for cfg in study.variants.values():
        assert (cfg.data.name, cfg.train.epochs, cfg.train.batch_size, cfg.train.lr) == ("mnist", 10, 50, 0.001)


def test_variants_are_diffs_against_base():
    s = study_from_dict({"base": {"model": {"preset": "lab2-3c3f-bn"}, "train": {"epochs": 3, "lr": 0.01}},
                         "variants": {"x": {}, "y": {"model": {"bn": False}, "train": {"epochs": 5}}}})
    assert s.variants["x"].train.epochs == 3 and s.variants["y"].train.epochs == 5
    assert s.variants["y"].train.lr == 0.01  # untouched keys come from base
    assert not any(b.bn for b in s.variants["y"].model.conv) and all(b.bn for b in s.variants["x"].model.conv)


def test_the_study_process_leaves_torch_to_its_workers(tmp_path, idx_dir):
    """`cnnlab study` checks the study, runs it and records versions without importing torch
    itself (2 s before the first worker could start, and CPU taken from the workers); the
    versions it records are the ones the runs record."""
    study, out = write_study(tmp_path, idx_dir), tmp_path / "out"
    code = ("import sys; from cnnlab.cli import main; "
            f"rc = main(['study', r'{study}', '--out', r'{out}', '--workers', '2', '--no-report']); "
            "print(rc, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split()[-2:] == ["0", "False"]
    recorded = json.loads((out / "study.json").read_text())["versions"]
    assert all(r["versions"] == recorded for r in results(out).values())
    assert len(results(out)) == 4


def test_a_worker_reuses_its_dataset_until_a_file_changes(tmp_path):
    """Runs in one worker share the loaded dataset; rewritten files are loaded again."""
    import os

    import numpy as np

    from cnnlab.study.worker import _dataset
    from conftest import make_idx_dir, write_idx

    folder = make_idx_dir(tmp_path / "d")
    first = _dataset(f"idx:{folder}")
    assert _dataset(f"idx:{folder}") is first
    labels = (first.train_labels + 1) % 4
    path = write_idx(folder / "train-labels-idx1-ubyte", labels.astype(np.uint8))
    st = path.stat()  # as a rewrite a second later would (some file systems keep whole seconds)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    again = _dataset(f"idx:{folder}")
    assert again is not first and np.array_equal(again.train_labels, labels)


def test_workers_times_threads_beyond_the_cores_is_warned(tmp_path, idx_dir, capsys):
    """Each worker thread wants a core: more threads than cores slow every run down."""
    import os

    from cnnlab.cli import main

    cores = len(os.sched_getaffinity(0))
    study = write_tiny_study(tmp_path / "tiny.toml", idx_dir)
    args = ["study", str(study), "--seeds", "1", "--no-report", "--limit", "50"]
    assert main([*args, "--out", str(tmp_path / "ok"), "--workers", "1", "--threads", str(cores)]) == 0
    assert "warning" not in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "over"), "--workers", "2", "--threads", str(cores)]) == 0
    out = capsys.readouterr().out
    assert f"warning: 2 workers x {cores} thread(s) = {2 * cores} threads on {cores} cores" in out
