"""Any network (cnnlab.factory): a model built by the user's factory trains, resumes
bit-identically after kill -9, refuses a changed factory, is never imported from a run
directory without --trust-code, reports from what training stored, batches its seeds with
torch.func where it can, and takes its arguments from study variants and grids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cnnlab.checkpoint import load
from cnnlab.config import config_from_dict
from cnnlab.errors import ConfigError
from cnnlab.factory import FactorySpec, source
from tests.test_reliability import assert_identical_runs, cli

REPO = Path(__file__).resolve().parents[1]
RESNET = REPO / "examples" / "tiny_resnet.py"


def write_model(tmp_path: Path, text: str | None = None) -> Path:
    """A copy of examples/tiny_resnet.py (or `text`) in tmp_path, for tests that change it."""
    path = tmp_path / "mymodel.py"
    path.write_text(text if text is not None else RESNET.read_text())
    return path


def write_config(tmp_path: Path, data, model: Path, args: str = "width = 4\nblocks = 1", epochs: int = 2) -> Path:
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[data]\nname = "idx:{data}"\nval_size = 100\n[model]\nfactory = "{model}:tiny_resnet"\n'
                   f"[model.args]\n{args}\n[train]\nepochs = {epochs}\nthreads = 1\nseed = 3\n")
    return cfg


# ---------------------------------------------------------------------------- the config

@pytest.mark.parametrize("model, message", [
    ({"factory": "no-colon"}, "expected \"package.module:function\""),
    ({"factory": "pkg.mod:1fn"}, "expected \"package.module:function\""),
    ({"factory": "a.py:f", "args": 3}, "must be a table of keyword arguments"),
    ({"factory": "a.py:f", "args": {"num_classes": 3}}, "in_shape and num_classes are passed by cnnlab"),
    ({"factory": "a.py:f", "bn": True}, "the only other key is `args`; bn belong"),
    ({"preset": "lab2-3c3f", "args": {"width": 3}}, "args are a factory's keyword arguments; give `factory` too"),
])
def test_bad_factory_tables_are_one_line_errors(model, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict({"model": model})


def test_a_factory_config_round_trips_and_imports_nothing(tmp_path):
    model = write_model(tmp_path, "raise SystemExit('imported!')\n")
    cfg = config_from_dict({"model": {"factory": f"{model}:tiny_resnet", "args": {"width": 8, "sizes": [1, 2]}}})
    assert isinstance(cfg.model, FactorySpec) and cfg.preset is None
    assert cfg.to_dict()["model"] == {"factory": f"{model}:tiny_resnet", "args": {"sizes": [1, 2], "width": 8}}
    assert config_from_dict(cfg.to_dict()) == cfg
    path, sha = source(cfg.model)  # found and hashed without running it
    assert path == model.resolve() and len(sha) == 64


@pytest.mark.parametrize("text, message", [
    ("def tiny_resnet(in_shape, num_classes):\n    return 3\n", "returned int, not a torch nn.Module"),
    ("import torch\ndef tiny_resnet(in_shape, num_classes):\n    return torch.nn.Linear(3, num_classes)\n",
     "the model fails on input [2, 1, 16, 16]"),
    ("import torch\ndef tiny_resnet(in_shape, num_classes):\n"
     "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 3))\n", "expected logits of shape (2, 4)"),
    ("import nonexistent_module_xyz\n", "importing .* failed: ModuleNotFoundError"),
    ("x = 1\n", "has no function tiny_resnet"),
])
def test_a_broken_factory_is_refused_before_training(tmp_path, idx_dir, text, message):
    cfg = write_config(tmp_path, idx_dir, write_model(tmp_path, text), args="")
    r = cli("train", "--config", str(cfg), "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    import re

    assert re.search(message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)"), r.stderr), r.stderr
    assert not (tmp_path / "run" / "result.json").exists()


# ---------------------------------------------------------------------------- a run

@pytest.fixture
def factory_run(tmp_path_factory, idx_dir):
    tmp = tmp_path_factory.mktemp("factory")
    model = write_model(tmp)
    cfg = write_config(tmp, idx_dir, model)
    out = tmp / "run"
    r = cli("train", "--config", str(cfg), "--out", str(out))
    assert r.returncode == 0, r.stderr
    return tmp, cfg, model, out


def test_a_factory_run_records_its_code_and_describes_its_model(factory_run):
    tmp, cfg, model, out = factory_run
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "done" and result["kernels"] == "torch (cpu), autograd"
    assert result["factory"]["file"] == str(model.resolve()) and result["factory"]["sha256"] == source(
        config_from_dict({"model": {"factory": f"{model}:tiny_resnet"}}).model)[1]
    assert result["factory"]["args"] == {"blocks": 1, "width": 4}
    net = __import__("examples.tiny_resnet", fromlist=["tiny_resnet"]).tiny_resnet((1, 16, 16), 4, width=4, blocks=1)
    assert result["params"] == sum(p.numel() for p in net.parameters())
    summary = (out / "summary.txt").read_text()
    assert f"Total params: {result['params']:,}" in summary and "AdaptiveAvgPool2d" in summary
    dot = (out / "graph.dot").read_text()
    assert "digraph" in dot and "add" in dot  # the traced graph, with the residual add


def test_eval_and_predict_need_trust_code(factory_run, tmp_path):
    tmp, cfg, model, out = factory_run
    for args in (["eval", str(out)], ["predict", str(out), "--index", "0"], ["train", "--resume", str(out)]):
        r = cli(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert f"{model}:tiny_resnet" in r.stderr and "--trust-code" in r.stderr
    r = cli("eval", str(out), "--trust-code")
    assert r.returncode == 0, r.stderr
    result = json.loads((out / "result.json").read_text())
    assert f"test accuracy: {result['test_accuracy_eval']:.4f}" in r.stdout
    r = cli("predict", str(out), "--index", "4", "--trust-code")
    assert r.returncode == 0 and f"predicted: {result['example']['predicted']}" in r.stdout, r.stdout + r.stderr


def test_kill_then_resume_of_a_factory_run_is_bit_identical(factory_run, tmp_path):
    _, cfg, _, reference = factory_run
    out = tmp_path / "killed"
    r = cli("train", "--config", str(cfg), "--out", str(out), env={"CNNLAB_FAULT": "kill:1:2"})
    assert r.returncode == -9
    r = cli("train", "--resume", str(out), "--trust-code")
    assert r.returncode == 0, r.stderr
    assert_identical_runs(reference, out)


def test_resume_refuses_a_changed_factory(factory_run, tmp_path):
    _, cfg, model, _ = factory_run
    out = tmp_path / "killed"
    assert cli("train", "--config", str(cfg), "--out", str(out), env={"CNNLAB_FAULT": "kill:1:2"}).returncode == -9
    original = model.read_text()
    model.write_text(original + "\n# changed\n")
    try:
        r = cli("train", "--resume", str(out), "--trust-code")
        assert r.returncode == 2 and "changed since the run started" in r.stderr and "Traceback" not in r.stderr
        before = (out / "checkpoints" / "last.safetensors").read_bytes()
        assert (out / "checkpoints" / "last.safetensors").read_bytes() == before  # nothing lost
    finally:
        model.write_text(original)
    assert cli("train", "--resume", str(out), "--trust-code").returncode == 0


# ---------------------------------------------------------------------------- studies

STUDY = """name = "mine"
seeds = 2
[base]
data = {{ name = "idx:{data}", val_size = 100 }}
train = {{ epochs = 2 }}
[base.model]
factory = "{model}:tiny_resnet"
args = {{ width = 4, blocks = 1 }}
[variants]
w4 = {{}}
w6 = {{ model = {{ args = {{ width = 6 }} }} }}
[comparisons]
width = ["w6", "w4"]
"""


def test_a_factory_study_reports_without_importing_the_factory(tmp_path, idx_dir):
    model = write_model(tmp_path)
    study = tmp_path / "study.toml"
    study.write_text(STUDY.format(data=idx_dir, model=model))
    out = tmp_path / "out"
    r = cli("study", str(study), "--out", str(out), "--workers", "2", "--no-report")
    assert r.returncode == 0, r.stderr
    w6 = json.loads((out / "runs" / "w6" / "seed-0" / "result.json").read_text())
    assert w6["factory"]["args"] == {"blocks": 1, "width": 6}  # the variant changed one argument, kept the other
    model.write_text("raise SystemExit('the report imported the model code')\n")  # importing it now fails loudly
    r = cli("report", str(out))
    assert r.returncode == 0, r.stderr
    html = (out / "report.html").read_text()
    assert "Model summary: w6" in html and "AdaptiveAvgPool2d" in html and "Total params" in html
    assert "Model graph of w6, traced from the module" in html


def test_a_grid_over_factory_args(tmp_path, idx_dir):
    from cnnlab.study import study_from_dict
    import tomllib

    text = STUDY.format(data=idx_dir, model=write_model(tmp_path)).split("[variants]")[0]
    text += "[grid]\n\"args.width\" = [4, 6]\n\"model.args.blocks\" = [1, 2]\n"
    s = study_from_dict(tomllib.loads(text), "study")
    assert sorted(s.variants) == ["width=4,blocks=1", "width=4,blocks=2", "width=6,blocks=1", "width=6,blocks=2"]
    assert s.variants["width=6,blocks=2"].model.kwargs == {"width": 6, "blocks": 2}


# ---------------------------------------------------------------------------- batched seeds

def test_batched_factory_seeds_equal_separate_runs(tmp_path, idx_dir):
    """torch.func stacks a module without dropout: each seed's numbers are its separate run's,
    to float rounding (vmap'd kernels add in another order)."""
    from cnnlab.data import load_dataset
    from cnnlab.engine.batched import train_batched
    from cnnlab.engine.loop import train_run

    ds = load_dataset(f"idx:{idx_dir}")
    model = write_model(tmp_path)
    cfgs = [config_from_dict({"data": {"name": f"idx:{idx_dir}", "val_size": 100},
                              "model": {"factory": f"{model}:tiny_resnet", "args": {"width": 4, "blocks": 1}},
                              "train": {"epochs": 2, "seed": s}}) for s in (0, 1)]
    quiet = lambda *a: None  # noqa: E731
    batched = train_batched(cfgs, [tmp_path / "b0", tmp_path / "b1"], dataset=ds, echos=[quiet, quiet])
    for k, cfg in enumerate(cfgs):
        alone = train_run(cfg, tmp_path / f"a{k}", dataset=ds, echo=quiet)
        assert "torch.func" in batched[k]["kernels"]
        assert batched[k]["test_accuracy"] == pytest.approx(alone["test_accuracy"], abs=1.0)
        assert batched[k]["test_loss"] == pytest.approx(alone["test_loss"], rel=1e-3)
        ta, _ = load(tmp_path / f"a{k}" / "checkpoints" / "last.safetensors")
        tb, _ = load(tmp_path / f"b{k}" / "checkpoints" / "last.safetensors")
        for name in ta:
            if name.startswith("model.") and ta[name].is_floating_point():
                torch.testing.assert_close(tb[name], ta[name], rtol=1e-3, atol=1e-4, msg=name)


def test_a_factory_with_dropout_is_not_batched_and_says_why(tmp_path, idx_dir):
    from cnnlab.data import load_dataset
    from cnnlab.engine.batched import NotBatchable, train_batched

    ds = load_dataset(f"idx:{idx_dir}")
    model = write_model(tmp_path)
    cfgs = [config_from_dict({"data": {"name": f"idx:{idx_dir}"}, "model": {
        "factory": f"{model}:tiny_resnet", "args": {"width": 4, "blocks": 1, "dropout": 0.25}},
        "train": {"epochs": 1, "seed": s}}) for s in (0, 1)]
    with pytest.raises(NotBatchable, match="draws random numbers .dropout. in training"):
        train_batched(cfgs, [tmp_path / "b0", tmp_path / "b1"], dataset=ds)


def test_a_dotted_factory_is_imported_from_the_current_directory(tmp_path, idx_dir):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(RESNET.read_text())
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[data]\nname = "idx:{idx_dir}"\nval_size = 100\nlimit = 100\n[model]\n'
                   'factory = "mypkg.nets:tiny_resnet"\nargs = { width = 2, blocks = 1 }\n[train]\nepochs = 1\n')
    r = subprocess.run([sys.executable, "-m", "cnnlab.cli", "train", "--config", str(cfg), "--out", "run"],
                       capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["factory"]["file"] == str((pkg / "nets.py").resolve())


def test_a_changed_factory_is_imported_again_in_a_long_lived_process(tmp_path, monkeypatch):
    """A notebook or a reused Ray worker imports the factory's current code, whose hash the run records."""
    from cnnlab import factory

    path = tmp_path / "net.py"
    path.write_text("def make(in_shape, num_classes):\n    return 1\n")
    spec = factory.FactorySpec(f"{path}:make")
    assert factory.load(spec)((1, 2, 2), 3) == 1
    path.write_text("def make(in_shape, num_classes):\n    return 2\n")
    assert factory.load(spec)((1, 2, 2), 3) == 2
    pkg = tmp_path / "pkgx"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text("def make(in_shape, num_classes):\n    return 3\n")
    monkeypatch.chdir(tmp_path)
    dotted = factory.FactorySpec("pkgx.nets:make")
    assert factory.load(dotted)((1, 2, 2), 3) == 3
    (pkg / "nets.py").write_text("def make(in_shape, num_classes):\n    return 4  # changed\n")
    assert factory.load(dotted)((1, 2, 2), 3) == 4


def test_a_factory_run_shows_itself_in_python(factory_run):
    from cnnlab.api import load_run

    run = load_run(factory_run[3])
    assert "tiny_resnet(blocks=1, width=4)" in repr(run) and "tiny_resnet" in run._repr_html_()
