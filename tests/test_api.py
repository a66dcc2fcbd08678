"""The Python API (cnnlab.api, re-exported by `cnnlab`) on tiny synthetic IDX data: runs,
resume, predictions, the model, curves, metrics, studies and their numbers, summaries, the
notebook displays, typed errors with the CLI's messages, and a cheap `import cnnlab`."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cnnlab
from cnnlab.cli import main
from cnnlab.errors import CnnlabError, ConfigError, RunError, SpecError

from conftest import make_idx_dir, write_tiny_study

SMALL = dict(epochs=2, val_size=100, threads=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_idx_dir(tmp_path_factory.mktemp("api-data") / "synth")


@pytest.fixture(scope="module")
def run(tmp_path_factory, data) -> cnnlab.Run:
    """One finished run, trained through the API; tests only read it."""
    out = tmp_path_factory.mktemp("api-run") / "a<b>&c"  # a name that HTML must escape
    return cnnlab.train(preset="lab2-2c2f", data=f"idx:{data}", out=out, progress=False, **SMALL)


# ---------------------------------------------------------------------------- import

def test_import_cnnlab_is_cheap_and_the_api_names_resolve():
    code = ("import cnnlab, sys; names = [cnnlab.train, cnnlab.study, cnnlab.summary, cnnlab.load_run, "
            "cnnlab.resume, cnnlab.load_study, cnnlab.Run, cnnlab.Study, cnnlab.Prediction]; "
            "print(all(map(callable, names)), [m for m in ('torch', 'numpy', 'pandas', 'matplotlib') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split("\n")[0] == "True []"


def test_api_names_that_are_submodules_stay_modules_and_are_callable():
    import importlib

    for name in ("study", "summary"):
        module = importlib.import_module(f"cnnlab.{name}")
        assert getattr(cnnlab, name) is module and callable(module)
    assert cnnlab.study.load_study.__module__ == "cnnlab.study.schema"
    assert cnnlab.summary.format_summary
    importlib.import_module("cnnlab.engine")
    assert cnnlab.train.__module__ == "cnnlab.api" and callable(cnnlab.train)  # no module cnnlab/train.py


# ---------------------------------------------------------------------------- one run

def test_train_returns_the_run_and_its_files(run, data):
    res = json.loads((run.path / "result.json").read_text())
    assert run.result == res and run.status == "done"
    assert run.test_accuracy == res["test_accuracy"] == run.test_accuracy_eval
    assert run.test_accuracy_train == res["test_accuracy_train"] and run.test_accuracy > 60
    assert [m["epoch"] for m in run.metrics] == [0, 1]
    assert list(run.metrics[0]) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"]
    csv_rows = (run.path / "metrics.csv").read_text().splitlines()[1:]
    assert [float(r.split(",")[1]) for r in csv_rows] == [m["train_loss"] for m in run.metrics]
    assert run.log.splitlines()[-1] == f"test accuracy: {run.test_accuracy:.4f}"
    assert run.config.train.epochs == 2 and run.config.data.name == f"idx:{data}"
    assert res["command"].startswith("cnnlab.train(preset='lab2-2c2f', data='idx:")  # the call, as written
    assert cnnlab.load_run(run.path) == run and isinstance(run.path, Path)


def test_the_api_and_the_cli_train_the_same_numbers(tmp_path, data, run, capsys):
    out = tmp_path / "cli"
    assert main(["train", "--preset", "lab2-2c2f", "--data", f"idx:{data}", "--epochs", "2", "--val-size", "100",
                 "--threads", "1", "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"run directory: {out}"
    cli = cnnlab.load_run(out)
    assert cli.test_accuracy == run.test_accuracy
    assert [{k: v for k, v in m.items() if k != "seconds"} for m in cli.metrics] == \
           [{k: v for k, v in m.items() if k != "seconds"} for m in run.metrics]


def test_progress_prints_the_lab_lines_bars_or_nothing(tmp_path, data, capsys):
    cnnlab.train(preset="lab2-2c2f", data=f"idx:{data}", out=tmp_path / "quiet", progress=False, epochs=1,
                 val_size=100, threads=1)
    assert capsys.readouterr() == ("", "")
    cnnlab.train(preset="lab2-2c2f", data=f"idx:{data}", out=tmp_path / "lines", epochs=1, val_size=100, threads=1)
    out, err = capsys.readouterr()
    assert out.startswith("Epoch: 0 train loss: ") and "test accuracy: " in out and "epoch 1/1" not in err
    cnnlab.train(preset="lab2-2c2f", data=f"idx:{data}", out=tmp_path / "bars", epochs=1, val_size=100, threads=1,
                 progress=True)
    out, err = capsys.readouterr()
    assert out.startswith("Epoch: 0 train loss: ") and "epoch 1/1" in err  # a tqdm.auto bar (text here)


def test_train_from_a_config_dict_and_a_file(tmp_path, data):
    table = {"data": {"name": f"idx:{data}", "val_size": 100}, "model": {"preset": "lab2-2c2f"},
             "train": {"epochs": 1, "threads": 1}}
    a = cnnlab.train(config=table, out=tmp_path / "dict", progress=False, lr=0.002)
    assert a.config.train.lr == 0.002 and a.config.train.epochs == 1 and a.status == "done"
    spec = tmp_path / "net.toml"  # a bare model spec file, as `cnnlab train --config` reads it
    spec.write_text("[[conv]]\nout_channels = 4\npool = 2\n[[fc]]\nwidth = 16\n")
    b = cnnlab.train(config=spec, data=f"idx:{data}", out=tmp_path / "file", progress=False, epochs=1, val_size=100)
    assert b.config.model.conv[0].out_channels == 4 and b.config.preset is None and b.status == "done"


def test_resume_after_an_interruption_matches_an_uninterrupted_run(tmp_path, data, run):
    out = tmp_path / "killed"
    code = (f"import cnnlab; cnnlab.train(preset='lab2-2c2f', data=r'idx:{data}', epochs=2, val_size=100, "
            f"threads=1, out=r'{out}')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "CNNLAB_FAULT": "kill:1:4"})
    assert r.returncode == -signal.SIGKILL
    killed = cnnlab.load_run(out)
    assert killed.status == "unfinished" and [m["epoch"] for m in killed.metrics] == [0]
    assert "unfinished after 1 epoch(s)" in repr(killed) and "cnnlab.resume(" in killed._repr_html_()
    with pytest.raises(RunError, match="has not finished"):
        killed.test_accuracy
    with pytest.raises(RunError, match="already holds a run"):  # train refuses it, as the CLI does
        cnnlab.train(preset="lab2-2c2f", data=f"idx:{data}", out=out, progress=False, **SMALL)
    resumed = cnnlab.resume(out, progress=False)
    assert resumed == killed and killed.status == "done"  # the same object follows the directory
    assert resumed.test_accuracy == run.test_accuracy and resumed.result["example"] == run.result["example"]
    assert [{k: v for k, v in m.items() if k != "seconds"} for m in resumed.metrics] == \
           [{k: v for k, v in m.items() if k != "seconds"} for m in run.metrics]
    from cnnlab.checkpoint import load

    ta, _ = load(run.path / "checkpoints/last.safetensors")
    tb, _ = load(out / "checkpoints/last.safetensors")
    assert ta.keys() == tb.keys() and all((ta[k] == tb[k]).all() for k in ta)


# ---------------------------------------------------------------------------- predict, model, plot

def test_predict_by_index_is_the_clis_prediction(run, capsys):
    p = run.predict(index=4)
    assert isinstance(p, cnnlab.Prediction)
    assert (p.label, p.predicted) == (run.result["example"]["label"], run.result["example"]["predicted"])
    assert len(p.probabilities) == 4 and math.isclose(sum(p.probabilities), 1.0, rel_tol=1e-5)
    assert len(p.top_k) == 3 and p.top_k[0][0] == p.predicted
    assert [c for c, _ in p.top_k] == sorted(range(4), key=lambda c: -p.probabilities[c])[:3]
    assert all(math.isclose(p.probabilities[c], q) for c, q in p.top_k)
    assert main(["predict", str(run.path), "--index", "4"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"predicted: {p.predicted}", "top-k: " + ", ".join(f"{c}: {q:.4f}" for c, q in p.top_k)]
    assert run.predict(index=4, top_k=1).top_k == p.top_k[:1]


def test_predict_image_files(run, tmp_path, capsys):
    from PIL import Image

    img = np.zeros((64, 64), np.uint8)  # class 0 lights the top-left patch (tests/conftest.py)
    img[:32, :32] = 255
    Image.fromarray(img).save(tmp_path / "zero.png")
    Image.fromarray(255 - img).save(tmp_path / "zero-inverted.png")  # dark on light: inverted by auto
    preds = run.predict(images=[tmp_path / "zero.png", str(tmp_path / "zero-inverted.png")],
                        save_image=tmp_path / "saved")
    assert [p.predicted for p in preds] == [0, 0] and all(p.label is None for p in preds)
    assert any("inverted" in n for n in preds[1].notes) and preds[0].source == str(tmp_path / "zero.png")
    assert preds[0].image.shape == (16, 16)
    assert sorted(f.name for f in (tmp_path / "saved").iterdir()) == ["prediction-0.png", "prediction-1.png"]
    one = run.predict(images=str(tmp_path / "zero.png"))  # one file is still a list
    assert isinstance(one, list) and (one[0].predicted, one[0].source, one[0].notes) == \
        (preds[0].predicted, preds[0].source, preds[0].notes)
    assert np.allclose(one[0].probabilities, preds[0].probabilities, atol=1e-6)  # batch of 1 vs 2: rounding
    assert "<strong>predicted 0</strong>" in preds[0]._repr_html_() and "data:image/png" in preds[0]._repr_html_()
    capsys.readouterr()
    assert main(["predict", str(run.path), str(tmp_path / "zero-inverted.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{tmp_path / 'zero-inverted.png'}: {preds[1].notes[0]}" and "predicted: 0" in out


def test_model_is_the_trained_network_in_eval_mode_on_the_cpu(run):
    import torch

    model = run.model()
    assert isinstance(model, torch.nn.Module) and not model.training
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    p = run.predict(index=4)
    with torch.no_grad():
        x = torch.as_tensor(p.image).reshape(1, 1, 16, 16)
        probs = model(x).softmax(1)[0]
    assert int(probs.argmax()) == p.predicted and math.isclose(float(probs[p.predicted]), p.top_k[0][1], rel_tol=1e-5)
    assert run.evaluate()["eval"]["test_accuracy"] == run.test_accuracy_eval


def test_plot_is_a_figure_of_the_curves(run):
    from matplotlib.figure import Figure

    fig = run.plot()
    assert isinstance(fig, Figure)
    assert [ax.get_title() for ax in fig.axes] == ["train loss", "validation loss", "accuracy"]
    train_line = fig.axes[0].get_lines()[0]
    assert list(train_line.get_ydata()) == [m["train_loss"] for m in run.metrics]
    assert fig._repr_png_().startswith(b"\x89PNG")  # shown in a notebook without pyplot's inline backend


def test_metrics_frame_and_its_error_without_pandas(run, monkeypatch):
    pd = pytest.importorskip("pandas")
    frame = run.metrics_frame()
    assert isinstance(frame, pd.DataFrame) and frame.to_dict("records") == run.metrics
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if pandas were not installed
    with pytest.raises(cnnlab.MissingDependency, match="needs pandas, which is not installed: pip install pandas") as e:
        run.metrics_frame()
    assert isinstance(e.value, CnnlabError) and isinstance(e.value, ImportError)


def test_run_display(run):
    r = repr(run)
    assert r.startswith("<cnnlab.Run ") and "lab2-2c2f, seed 0, 2 epochs" in r
    assert f"test accuracy {run.test_accuracy:.2f}% (eval mode)" in r and len(r) < 200
    card = run._repr_html_()
    assert "a&lt;b&gt;&amp;c" in card and "a<b>&c" not in card  # every text escaped
    res = run.result
    assert f"split {res['data']['n_train']} train / 100 validation / 200 test" in card
    assert "2 epochs" in card and "seed 0" in card and f"device {res['device']}" in card
    assert f"{res['test_accuracy_eval']:.2f} %" in card and f"{res['test_accuracy_train']:.2f} %" in card
    assert card.count('src="data:image/png;base64,') == 1


def test_loading_never_runs_a_pickle(run, tmp_path):
    import pickle
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run.path, copy)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (copy / "checkpoints" / "last.safetensors").write_bytes(pickle.dumps({"model": Evil()}))
    loaded = cnnlab.load_run(copy)
    assert loaded.test_accuracy == run.test_accuracy  # result.json, metrics and config read fine
    with pytest.raises(CnnlabError, match="never unpickles"):
        loaded.model()
    with pytest.raises(CnnlabError, match="never unpickles"):
        loaded.predict(index=0)
    assert not marker.exists()


# ---------------------------------------------------------------------------- errors

@pytest.mark.parametrize("call, args, exc, message", [
    (lambda d, t: cnnlab.train(preset="nope", out=t / "x"), ["train", "--preset", "nope"], SpecError,
     "unknown preset 'nope'; available: lab2-3c3f-bn"),
    (lambda d, t: cnnlab.train(preset="lab2-3c3f", epochs=0), ["train", "--preset", "lab2-3c3f", "--epochs", "0"],
     ConfigError, "epochs must be >= 1"),
    (lambda d, t: cnnlab.train(config="/nonexistent.toml"), ["train", "--config", "/nonexistent.toml"],
     CnnlabError, "no such file"),
    (lambda d, t: cnnlab.load_run("/nonexistent"), ["predict", "/nonexistent", "--index", "1"], RunError,
     "/nonexistent: not a run directory (no config.toml); pass the --out directory of `cnnlab train`"),
    (lambda d, t: cnnlab.resume("/nonexistent"), ["train", "--resume", "/nonexistent"], RunError,
     "--resume /nonexistent: not a run directory (no config.toml)"),
    (lambda d, t: cnnlab.summary("lab2-3c3f", input_shape=(1, 8, 8)),
     ["summary", "--preset", "lab2-3c3f", "--input", "1x8x8"], SpecError, "conv3: input feature map"),
    (lambda d, t: cnnlab.load_study(t), ["report", "{tmp}"], CnnlabError, "not a study directory"),
])
def test_errors_are_typed_with_the_clis_one_line_messages(call, args, exc, message, tmp_path, data, capsys):
    with pytest.raises(exc) as e:
        call(data, tmp_path)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert main([a.replace("{tmp}", str(tmp_path)) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(str(e.value)) and len(err.splitlines()) == 1


def test_bad_config_keys_and_values_are_config_errors(tmp_path, data):
    with pytest.raises(ConfigError, match=r"config: train: unknown key\(s\) epoch; valid keys: epochs"):
        cnnlab.train(config={"train": {"epoch": 3}}, out=tmp_path / "x")
    with pytest.raises(ConfigError, match=r"config: unknown section\(s\) trian"):
        cnnlab.train(config={"trian": {}}, out=tmp_path / "x")
    with pytest.raises(ConfigError, match="`epochs` must be an integer, got str '3'"):
        cnnlab.train(preset="lab2-2c2f", epochs="3")
    with pytest.raises(ConfigError, match="give either preset or config, not both"):
        cnnlab.train(preset="lab2-2c2f", config={})
    with pytest.raises(ConfigError, match="give a model"):
        cnnlab.train(epochs=1)
    with pytest.raises(CnnlabError, match="val_size 5000 leaves no training images"):
        cnnlab.train(preset="lab2-2c2f", data=f"idx:{data}", out=tmp_path / "y", progress=False)
    assert not (tmp_path / "x").exists()


def test_predict_errors_have_the_clis_messages(run):
    with pytest.raises(ConfigError, match="give either --index N or one or more IMAGE files"):
        run.predict()
    with pytest.raises(ConfigError, match=r"--index 999: the test set has images 0..199"):
        run.predict(index=999)
    with pytest.raises(ConfigError, match="--top-k must be >= 1, got 0"):
        run.predict(index=0, top_k=0)
    from cnnlab.errors import ImageError

    with pytest.raises(ImageError):
        run.predict(images=["/nonexistent.png"])


# ---------------------------------------------------------------------------- summary

def test_summary_of_a_preset_prints_like_the_cli(capsys):
    s = cnnlab.summary("lab2-3c3f-bn", input_shape=(1, 28, 28))
    assert main(["summary", "--preset", "lab2-3c3f-bn"]) == 0
    assert capsys.readouterr().out == str(s) + "\n" == repr(s) + "\n"
    assert s.total_params == 59_734 and s.layers[0].name == "Conv2d-1" and s.num_classes == 10
    html = s._repr_html_()
    assert "<td>Conv2d-1</td><td>[-1, 6, 28, 28]</td>" in html and "Total params: 59,734" in html
    with pytest.raises(SpecError, match="input_shape"):
        cnnlab.summary("lab2-3c3f-bn", input_shape=(28, 28))


def test_summary_of_a_module(run):
    import torch
    from torch import nn

    net = run.model()
    assert cnnlab.summary(net).text == cnnlab.summary(net.spec, input_shape=(1, 16, 16), num_classes=4).text
    with pytest.raises(SpecError, match="built for input"):
        cnnlab.summary(net, input_shape=(1, 28, 28))
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 26 * 26, 10))
    s = cnnlab.summary(plain)
    assert [(r.name, r.out_shape) for r in s.layers] == [
        ("Conv2d-1", (3, 26, 26)), ("ReLU-2", (3, 26, 26)), ("Flatten-3", (3 * 26 * 26,)), ("Linear-4", (10,))]
    assert s.total_params == sum(p.numel() for p in plain.parameters()) and "Total params: 20,320" in s.text
    assert plain.training  # left as it was
    with pytest.raises(SpecError, match=r"does not run on an input of shape \(1, 1, 8, 8\)"):
        cnnlab.summary(nn.Sequential(nn.Flatten(), nn.Linear(10, 2)), input_shape=(1, 8, 8))


# ---------------------------------------------------------------------------- studies

def test_study_and_its_numbers_are_the_reports(tmp_path, data, capsys):
    file = write_tiny_study(tmp_path / "tiny.toml", data)
    out = tmp_path / "out"
    study = cnnlab.study(file, out=out, workers=1)
    printed = capsys.readouterr().out
    assert printed.startswith(f"study tiny: 2 variants x 2 seeds = 4 runs -> {out} (local, 1 workers x 1 thread(s))")
    assert "4 runs trained, 0 already finished, 0 failed" in printed and f"report: {out / 'report.html'}" in printed
    assert study.counts["done"] == 4 and study.report_path == out / "report.html" and study.report_path.is_file()
    assert study.name == "tiny" and study.variants == ["a", "b"]
    assert sorted(study.runs) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert study.runs[("b", 1)] == cnnlab.load_run(out / "runs/b/seed-1") and study.runs[("b", 1)].status == "done"
    assert json.loads((out / "study.json").read_text())["command"].startswith("cnnlab.study(")

    from cnnlab.report.analyze import analyze
    from cnnlab.report.collect import load_study as collect
    from cnnlab.report.render import signed

    an = analyze(collect(out))
    table = study.table()
    assert [r["variant"] for r in table] == ["a", "b"]
    for row in table:
        s = an.variants[row["variant"]].summary
        assert (row["n"], row["mean"], row["sd"], row["ci_low"], row["ci_high"]) == (s.n, s.mean, s.std, s.ci_low, s.ci_high)
        accs = [study.runs[(row["variant"], seed)].test_accuracy for seed in (0, 1)]
        assert math.isclose(row["mean"], sum(accs) / 2) and row["seeds"] == [0, 1]
    [comp] = study.comparisons()
    c = an.comparisons[0]
    assert comp == {"name": "fc", "a": "b", "b": "a", "diff": c.decision.diff, "ci_low": c.decision.ci_low,
                    "ci_high": c.decision.ci_high, "p": c.paired.p, "p_adjusted": c.decision.p,
                    "kind": c.decision.kind, "n": 2, "verdict": c.verdict, "margin": 0.5,
                    "level": c.decision.level, "method": c.decision.method}
    assert "p_holm" not in comp
    diffs = [study.runs[("b", s)].test_accuracy - study.runs[("a", s)].test_accuracy for s in (0, 1)]
    assert math.isclose(comp["diff"], sum(diffs) / 2, abs_tol=1e-9)
    verdict_row = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| fc "))
    assert signed(comp["diff"]) in verdict_row

    loaded = cnnlab.load_study(out)
    assert json.dumps(loaded.table()) == json.dumps(table)  # (NaN-safe equality)
    assert loaded.comparisons()[0]["verdict"] == comp["verdict"] and loaded.counts is None

    r = repr(loaded)
    assert r == f"<cnnlab.Study tiny at {os.path.relpath(out)}: 2 variants (a, b), 4 of 4 runs finished, 1 comparison>"
    html = loaded._repr_html_()
    assert "<th>question</th>" in html and "<th>verdict</th>" in html and '<td class="l">fc</td>' in html
    assert "4 of 4 runs finished" in html and "report.html</a>" in html and "Protocol: " in html

    # again, quietly: every run is finished, nothing is printed, the report is rebuilt the same
    before = study.report_path.read_bytes()
    again = cnnlab.study(file, out=out, workers=1, progress=False)
    assert capsys.readouterr() == ("", "") and again.counts["skipped"] == 4 and again.counts["done"] == 0
    assert study.report_path.read_bytes() == before
    assert again.build_report() == study.report_path and study.report_path.read_bytes() == before


def test_study_from_a_dict_and_its_errors(tmp_path, data, capsys):
    tiny = {"name": "d<i>ct", "seeds": 1,
            "base": {"data": {"name": f"idx:{data}", "val_size": 100}, "train": {"epochs": 1, "threads": 1}},
            "variants": {"only": {"model": {"preset": "lab2-2c2f"}}}}
    with pytest.raises(ConfigError, match="name must be a simple name"):
        cnnlab.study(tiny, out=tmp_path / "bad")
    tiny["name"] = "dict"
    with pytest.raises(ConfigError, match="--workers must be >= 1, got 0"):
        cnnlab.study(tiny, out=tmp_path / "out", workers=0)
    with pytest.raises(ConfigError, match="`seeds` must be an integer"):
        cnnlab.study(tiny, out=tmp_path / "out", seeds="2")
    with pytest.raises(ConfigError, match="seeds until resolved needs"):
        cnnlab.study(tiny, out=tmp_path / "out", until_resolved=True)
    s = cnnlab.study(tiny, out=tmp_path / "out", workers=1, report=False, progress=False)
    assert s.counts["done"] == 1 and not s.report_path.exists() and not (tmp_path / "out" / "study.toml").exists()
    assert s.variants == ["only"] and s.comparisons() == [] and "<th>variant</th>" in s._repr_html_()
