"""Training end to end on synthetic IDX data: run directory, determinism, eval modes, CLI."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnlab.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--epochs", "2", "--val-size", "100", "--threads", "1"]


def train(tmp_path, idx_dir, out="run", *extra, preset="lab2-2c2f"):
    rc = main(["train", "--preset", preset, "--data", f"idx:{idx_dir}", *SMALL, "--out", str(tmp_path / out), *extra])
    assert rc == 0
    return tmp_path / out


def test_run_directory_has_everything(tmp_path, idx_dir, capsys):
    run = train(tmp_path, idx_dir)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("Epoch: 0 train loss: ") and " val accuracy: " in lines[0]
    assert any(line.startswith("test accuracy: ") for line in lines)
    for f in ["config.toml", "metrics.csv", "result.json", "train.log", "split.npz", "predictions.npz",
              "checkpoints/last.safetensors", "checkpoints/best.safetensors"]:
        assert (run / f).is_file(), f
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert list(rows[0]) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"]
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    res = json.loads((run / "result.json").read_text())
    assert res["status"] == "done" and res["eval_mode"] == "eval"
    assert res["test_accuracy"] == res["test_accuracy_eval"]
    assert 0 <= res["test_accuracy_train"] <= 100
    assert res["data"]["n_train"] == 500 and res["data"]["n_val"] == 100 and res["data"]["n_test"] == 200
    assert res["data"]["input_shape"] == [1, 16, 16] and res["data"]["num_classes"] == 4
    assert set(res["versions"]) >= {"torch", "numpy", "python", "cnnlab"} and res["device"].startswith("cpu")
    assert res["wall_seconds"] > 0 and res["seed"] == 0
    split = np.load(run / "split.npz")
    assert len(split["train_idx"]) == 500 and len(split["val_idx"]) == 100
    assert not set(split["train_idx"]) & set(split["val_idx"])
    # train.log holds the printed lines
    assert (run / "train.log").read_text().splitlines() == [l for l in lines if l.startswith(("Epoch", "test"))]
    # the learnable synthetic task is actually learned
    assert res["test_accuracy_eval"] > 60


def test_loss_is_sum_of_per_batch_means(tmp_path, idx_dir):
    run = train(tmp_path, idx_dir)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    # 500 train images / batch 50 = 10 batches, each a mean cross-entropy: sum is ~10x a mean loss
    assert 10 * 0.0 < float(rows[0]["train_loss"]) < 10 * np.log(4) * 3
    # validation: 100 images = 2 batches of 50
    assert float(rows[0]["val_loss"]) < 2 * np.log(4) * 5


def test_same_seed_same_numbers_and_other_seed_differs(tmp_path, idx_dir):
    a, b = train(tmp_path, idx_dir, "a"), train(tmp_path, idx_dir, "b")
    c = train(tmp_path, idx_dir, "c", "--seed", "1")

    def numbers(run):
        rows = list(csv.DictReader(open(run / "metrics.csv")))
        return [(r["train_loss"], r["val_loss"]) for r in rows]

    assert numbers(a) == numbers(b)
    assert numbers(a) != numbers(c)
    from cnnlab.checkpoint import load

    ta, _ = load(a / "checkpoints/last.safetensors")
    tb, _ = load(b / "checkpoints/last.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)  # bit-identical state
    assert not np.array_equal(np.load(a / "split.npz")["val_idx"], np.load(c / "split.npz")["val_idx"])


def test_limit_trains_on_first_n_and_keeps_val_test_whole(tmp_path, idx_dir):
    run = train(tmp_path, idx_dir, "r", "--limit", "120")
    res = json.loads((run / "result.json").read_text())
    assert res["data"]["n_train"] == 120 and res["data"]["n_val"] == 100 and res["data"]["n_test"] == 200


def test_eval_mode_flag_is_recorded(tmp_path, idx_dir):
    run = train(tmp_path, idx_dir, "r", "--eval-mode", "train")
    res = json.loads((run / "result.json").read_text())
    assert res["eval_mode"] == "train" and res["test_accuracy"] == res["test_accuracy_train"]
    assert "eval_mode = \"train\"" in (run / "config.toml").read_text()


def test_train_mode_evaluation_leaves_model_untouched():
    from cnnlab.model import build_model
    from cnnlab.spec import PRESETS
    from cnnlab.engine.run import evaluate

    torch.manual_seed(0)
    model = build_model(PRESETS["lab2-3c3f-bn"], (1, 28, 28), 10)
    x, y = torch.rand(120, 1, 28, 28), torch.randint(0, 10, (120,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    r1 = evaluate(model, x, y, 50, "train", seed=5)
    r2 = evaluate(model, x, y, 50, "train", seed=5)
    assert r1[1] == r2[1] and torch.equal(r1[2], r2[2])  # deterministic
    assert torch.equal(torch.get_rng_state(), rng)  # training random stream untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats restored
    assert model.training
    e = evaluate(model, x, y, 50, "eval")
    assert model.training and e[2].shape == (120,)


def test_nan_loss_fails_the_run_with_epoch_and_step(tmp_path, idx_dir, capsys):
    out = tmp_path / "nan"
    rc = main(["train", "--preset", "lab2-2c2f", "--data", f"idx:{idx_dir}", *SMALL, "--lr", "1e12", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "failed: loss became" in err and "lower the learning rate" in err
    res = json.loads((out / "result.json").read_text())
    assert res["status"] == "failed" and res["error"]["epoch"] == 0 and res["error"]["step"] >= 0
    assert not (out / "checkpoints/last.safetensors").exists()  # nothing saved after the NaN


def test_predict_by_index_and_by_file(tmp_path, idx_dir, capsys):
    from PIL import Image

    run = train(tmp_path, idx_dir)
    capsys.readouterr()
    assert main(["predict", str(run), "--index", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("predicted: ") and "top-k: " in out
    pred = json.loads((run / "result.json").read_text())["example"]["predicted"]
    assert out.splitlines()[0] == f"predicted: {pred}"
    # an image file: class 0 lights the top-left patch of a 16x16 image (tests/conftest.py)
    img = np.zeros((64, 64), np.uint8)
    img[:32, :32] = 255
    Image.fromarray(img).save(tmp_path / "zero.png")
    saved = tmp_path / "labeled.png"
    assert main(["predict", str(run), str(tmp_path / "zero.png"), "--save-image", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "predicted: 0" in out
    assert Image.open(saved).size[0] >= 16


def test_eval_command(tmp_path, idx_dir, capsys):
    run = train(tmp_path, idx_dir)
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    res = json.loads((run / "result.json").read_text())
    assert f"test accuracy: {res['test_accuracy_eval']:.4f}" in out.splitlines()[0]


@pytest.mark.parametrize("args, message", [
    (["train", "--preset", "nope"], "unknown preset 'nope'"),
    (["train", "--config", "/nonexistent.toml"], "no such file"),
    (["train", "--preset", "lab2-3c3f", "--data", "idx:/nonexistent"], "/nonexistent"),
    (["train", "--preset", "lab2-3c3f", "--epochs", "0"], "epochs must be >= 1"),
    (["summary", "--preset", "lab2-3c3f", "--input", "1x8x8"], "conv3: input feature map"),
    (["summary", "--preset", "lab2-3c3f", "--input", "banana"], "expected CxHxW"),
    (["predict", "/nonexistent", "--index", "1"], "not a run directory"),
    (["eval", "/nonexistent"], "not a run directory"),
])
def test_user_errors_are_one_line_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_flag_exit_2():
    r = subprocess.run([sys.executable, "-m", "cnnlab.cli", "train", "--epochs", "many"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid int value" in r.stderr and "Traceback" not in r.stderr


def test_shape_error_from_data_before_anything_is_written(tmp_path, idx_dir, capsys):
    out = tmp_path / "r"
    # 16x16 inputs are too small for 3 conv blocks with a 4x4 first pool
    cfg = tmp_path / "net.toml"
    cfg.write_text("[[conv]]\nout_channels = 4\npool = 4\n[[conv]]\nout_channels = 4\n[[conv]]\nout_channels = 4\n")
    rc = main(["train", "--config", str(cfg), "--data", f"idx:{idx_dir}", "--out", str(out)])
    assert rc == 2 and "conv3" in capsys.readouterr().err
    assert not out.exists()


def test_existing_run_is_not_overwritten(tmp_path, idx_dir, capsys):
    run = train(tmp_path, idx_dir)
    before = (run / "result.json").read_bytes()
    capsys.readouterr()
    rc = main(["train", "--preset", "lab2-2c2f", "--data", f"idx:{idx_dir}", *SMALL, "--out", str(run)])
    assert rc == 2 and "already holds a run" in capsys.readouterr().err
    assert (run / "result.json").read_bytes() == before


def test_import_and_help_are_fast():
    code = "import time; t=time.perf_counter(); import cnnlab.cli as c; c.build_parser(); print(time.perf_counter()-t)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    r2 = subprocess.run([sys.executable, "-c", "import cnnlab.cli, sys; print('torch' in sys.modules)"],
                        capture_output=True, text=True, check=True)
    assert r2.stdout.strip() == "False"  # torch is not imported for --help
    assert float(r.stdout) < 1.0


def test_a_cpu_run_never_imports_torch_dynamo(tmp_path, idx_dir):
    """torch imports torch._dynamo (about 2.4 s) on an optimizer's first step or state_dict;
    LeanAdam creates Adam's state itself and calls those methods without torch's
    never-compile wrapper, so a whole CPU run (checkpoints, resume, evaluation) never does."""
    code = ("import sys; from cnnlab.cli import main; "
            f"rc = main(['train', '--preset', 'lab2-2c2f', '--data', 'idx:{idx_dir}', '--epochs', '2', "
            f"'--val-size', '100', '--out', r'{tmp_path / 'run'}']); "
            "print(rc, 'torch._dynamo' in sys.modules, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split()[-3:] == ["0", "False", "True"]


@pytest.mark.slow
def test_real_mnist_slice(tmp_path, monkeypatch, capsys):
    real = Path(__import__("os").environ["CNNLAB_REAL_DATA"])
    if not (real / "mnist" / "train-images-idx3-ubyte").exists():
        pytest.skip("real MNIST not in the cache (run `cnnlab data fetch mnist`)")
    monkeypatch.setenv("CNNLAB_DATA", str(real))
    out = tmp_path / "mnist"
    assert main(["train", "--preset", "lab2-2c2f", "--epochs", "1", "--limit", "2000", "--threads", "1",
                 "--out", str(out)]) == 0
    res = json.loads((out / "result.json").read_text())
    assert res["data"]["n_val"] == 5000 and res["data"]["n_test"] == 10000 and res["data"]["n_train"] == 2000
    assert res["data"]["sha256"]["train-images-idx3-ubyte"].startswith("ba891046")
    assert res["test_accuracy_train"] > 50  # 2000 images, 1 epoch: well above chance (10%)


def test_runs_of_steps_in_c_give_the_numbers_of_the_steps_one_by_one(tmp_path, idx_dir, monkeypatch):
    """On the CPU the loop hands runs of full batches to C (Net.native_train_steps); a run
    with that path off (every step from Python) gives the same numbers bit for bit: the
    per-epoch metrics, every weight, buffer and Adam state. Batch 30 on 500 images: 16 full
    batches and a smaller last one, which always goes one by one."""
    from cnnlab import native
    from cnnlab.checkpoint import load
    from cnnlab.model import Net

    if native.library() is None or native.sgemm() is None:
        pytest.skip(f"no native C step here: {native.describe()}")
    real, runs = Net.native_train_steps, []

    def counted(self, *args):
        done = real(self, *args)
        runs.append(done)
        return done

    monkeypatch.setattr(Net, "native_train_steps", counted)
    a = train(tmp_path, idx_dir, "a", "--batch-size", "30", preset="lab2-3c3f-bn")
    assert sum(runs) >= 2  # runs of steps really ran in C (every epoch but the first step)
    monkeypatch.setattr(Net, "native_train_steps", lambda self, *args: False)
    b = train(tmp_path, idx_dir, "b", "--batch-size", "30", preset="lab2-3c3f-bn")

    def numbers(run):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(run / "metrics.csv"))]

    assert numbers(a) == numbers(b)
    ta, _ = load(a / "checkpoints/last.safetensors")
    tb, _ = load(b / "checkpoints/last.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    res_a, res_b = (json.loads((r / "result.json").read_text()) for r in (a, b))
    assert res_a["test_accuracy"] == res_b["test_accuracy"]
