"""A study that exports its runs (`cnnlab study --export`, `[export]`): every finished run gets
cnnlab.deploy's files, and the report a Deployment section read from them."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import make_idx_dir, write_tiny_study

from cnnlab import stats
from cnnlab.cli import main

def _study(tmp_path, export="\n[export]\ncalibration = 40\n"):
    data = make_idx_dir(tmp_path / "synth", n_test=300)  # the fp32 check needs >= 256 test images
    return write_tiny_study(tmp_path / "exp.toml", data, tail=export)


def test_a_study_exports_every_finished_run_and_reports_what_int8_costs(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path, out = _study(tmp_path), tmp_path / "out"
    assert main(["study", str(path), "--out", str(out), "--workers", "2"]) == 0
    exports = {}
    for v in ("a", "b"):
        for s in (0, 1):
            info = json.loads((out / "runs" / v / f"seed-{s}" / "export" / "export.json").read_text())
            assert info["calibration_images"] == 40 and info["check_int8_weights"]
            exports[(v, s)] = info
    md = (out / "report.md").read_text()
    sec = md[md.index("## Deployment"):md.index("## Variants")]
    first = sec[:sec.index("Size, work and latency")]  # the accuracy table, before the size table
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in first.splitlines() if line.startswith("| a ") or line.startswith("| b ")}
    fp32 = {s: exports[("b", s)]["test_accuracy_fp32"] for s in (0, 1)}
    int8 = {s: exports[("b", s)]["test_accuracy_int8"] for s in (0, 1)}
    pr = stats.paired(int8, fp32)
    d = stats.decide(pr, 0.5, m=2)
    # the first table's row: n, fp32, int8, the paired difference, its interval and verdict
    assert rows["b"][0] == "2" and rows["b"][1].startswith(f"{stats.summarize(fp32.values()).mean:.2f} ± ")
    assert rows["b"][3] == f"{pr.mean_diff:+.2f}" and rows["b"][4] == stats.interval_text(d.ci_low, d.ci_high)
    assert rows["b"][5] == stats.verdict_text("int8", "fp32", d, detail=False)
    assert (out / "report_files" / "deploy-size-accuracy.png").is_file()
    # a re-run trains and exports nothing; a lost export is made again without training
    capsys.readouterr()
    import shutil

    shutil.rmtree(out / "runs" / "a" / "seed-1" / "export")
    before = (out / "runs" / "a" / "seed-1" / "result.json").read_bytes()
    assert main(["study", str(path), "--out", str(out), "--workers", "2"]) == 0
    text = capsys.readouterr().out
    assert "0 runs trained, 3 already finished, 0 failed, 1 finished runs exported" in text
    assert (out / "runs" / "a" / "seed-1" / "export" / "export.json").is_file()
    assert (out / "runs" / "a" / "seed-1" / "result.json").read_bytes() == before


def test_export_without_the_extra_is_one_line_before_any_run(tmp_path, monkeypatch, capsys):
    path, out = _study(tmp_path, export=""), tmp_path / "out"
    for name in ("onnx", "onnxruntime", "onnxscript"):
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["study", str(path), "--out", str(out), "--export"]) == 2
    err = capsys.readouterr().err
    assert "needs the deploy extra" in err and "pip install -e '.[deploy]'" in err
    assert not (out / "runs").exists()


def test_bad_export_tables_are_refused(tmp_path):
    from cnnlab.errors import ConfigError
    from cnnlab.study import study_from_dict

    for table, message in (({"int8": "yes"}, "export.int8 must be true or false"),
                           ({"calibration": 0}, "export.calibration must be an integer >= 1"),
                           ({"onnx": True}, "export: unknown key(s) onnx")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            study_from_dict({"variants": {"a": {}}, "export": table}, "s.toml")
