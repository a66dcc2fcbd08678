"""Batched seeds (cnnlab.engine.batched): K runs of one variant trained as one network must give each
run its own separate run's results, write the same run directory, fail alone, and resume
after a crash as if nothing happened."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnlab import model
from cnnlab.engine.batched import StackedNet, check_group, train_batched, why_not
from cnnlab.checkpoint import load
from cnnlab.config import config_from_dict
from cnnlab.data import load_dataset
from cnnlab.errors import ConfigError
from cnnlab.model import build_model
from cnnlab.spec import PRESETS
from cnnlab.rundir import read_metrics
from cnnlab.engine.loop import train_run

from conftest import make_idx_dir

SEEDS = [0, 1, 2]


def cfg(data: Path, seed: int, preset: str = "lab2-3c3f-bn", epochs: int = 2, **train):
    return config_from_dict({"data": {"name": f"idx:{data}", "val_size": 200}, "model": {"preset": preset},
                             "train": {"epochs": epochs, "seed": seed, "device": "cpu", **train}}, "test")


@pytest.fixture(scope="module")
def mnist_like(tmp_path_factory) -> Path:
    """28x28 images, 10 classes, as the lab's networks expect."""
    return make_idx_dir(tmp_path_factory.mktemp("mnist-like"), n_train=1200, n_test=300, size=(28, 28), classes=10)


def _close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * max(1.0, abs(a))


@pytest.mark.parametrize("preset", ["lab2-3c3f-bn", "lab2-2c3f"])
def test_each_batched_run_follows_its_separate_run(tmp_path, mnist_like, monkeypatch, preset):
    # the same kernels on both sides (torch's): then only the order of float operations differs
    monkeypatch.setattr(model, "FAST_PATHS", set())
    ds = load_dataset(f"idx:{mnist_like}")
    for s in SEEDS:
        train_run(cfg(mnist_like, s, preset), tmp_path / f"alone-{s}", dataset=ds, echo=lambda _: None)
    results = train_batched([cfg(mnist_like, s, preset) for s in SEEDS], [tmp_path / f"batch-{s}" for s in SEEDS],
                            dataset=ds, echos=[lambda _: None] * 3)
    for s, res in zip(SEEDS, results):
        a, b = tmp_path / f"alone-{s}", tmp_path / f"batch-{s}"
        assert res == json.loads((b / "result.json").read_text())
        assert res["status"] == "done" and res["seed"] == s
        assert "3 seeds batched" in res["kernels"]
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        assert (a / "split.npz").read_bytes() == (b / "split.npz").read_bytes()
        (ma, _), (mb, _) = read_metrics(a), read_metrics(b)
        assert len(ma) == len(mb) == 2
        for ra, rb in zip(ma, mb):  # float rounding grows along a trajectory: bounds, not equality
            assert _close(ra["train_loss"], rb["train_loss"], 1e-3), (ra, rb)
            assert _close(ra["val_loss"], rb["val_loss"], 1e-3), (ra, rb)
            assert abs(ra["train_acc"] - rb["train_acc"]) <= 0.5, (ra, rb)
        # the test-set probabilities (accuracies of these barely trained nets sit on near-ties)
        pa, pb = np.load(a / "predictions.npz"), np.load(b / "predictions.npz")
        assert np.abs(pa["probs_eval"] - pb["probs_eval"]).max() <= 1e-2
        assert (pa["pred_train"] == pb["pred_train"]).mean() >= 0.95
        ta, _ = load(a / "checkpoints/last.safetensors")
        tb, meta = load(b / "checkpoints/last.safetensors")
        assert ta.keys() == tb.keys()
        # the same dropout masks were drawn: each run's random streams end in the same state
        assert torch.equal(ta["rng.torch"], tb["rng.torch"]) and torch.equal(ta["rng.order"], tb["rng.order"])
        for k in ta:  # every weight, near (a 1-ulp change can move a max-pool's gradient to another unit)
            if k.startswith("model.") and k.endswith(".weight"):
                assert float((ta[k] - tb[k]).norm()) <= 5e-2 * float(ta[k].norm()), k
        assert meta["batched"] == res["kernels"]


def test_the_stacked_forward_is_each_nets_forward(mnist_like):
    """One forward and backward, exactly the same masks: logits and gradients per model."""
    torch.manual_seed(0)
    nets = [build_model(PRESETS["lab2-3c3f-bn"], (1, 28, 28), 10, fast=False) for _ in range(3)]
    stacked = StackedNet(nets)
    x = torch.rand(3, 20, 1, 28, 28)
    y = torch.randint(0, 10, (3, 20))
    gens = [torch.Generator().manual_seed(10 + k) for k in range(3)]
    logits = stacked.forward(x, gens)
    torch.nn.functional.cross_entropy(logits.reshape(60, 10), y.reshape(-1), reduction="none").view(3, 20).mean(1).sum().backward()
    for k, net in enumerate(nets):
        torch.set_rng_state(torch.Generator().manual_seed(10 + k).get_state())
        out = net(x[k])
        torch.nn.functional.cross_entropy(out, y[k]).backward()
        torch.testing.assert_close(logits[k], out, rtol=1e-4, atol=1e-5)
        for p, s in zip(net.parameters(), stacked.params):
            torch.testing.assert_close(s.grad[k], p.grad, rtol=1e-3, atol=1e-5)
        for b, s in zip(net.buffers(), stacked.buffers):  # BatchNorm's running statistics
            torch.testing.assert_close(s[k], b, rtol=1e-4, atol=1e-6)


def test_a_run_whose_loss_becomes_nan_fails_alone(tmp_path, mnist_like, monkeypatch):
    ds = load_dataset(f"idx:{mnist_like}")
    real = StackedNet.forward

    def poisoned(self, x, gens):  # model 1's logits turn NaN in epoch 1
        out = real(self, x, gens)
        if poisoned.calls >= 25:
            out = out.clone()
            out[1] = float("nan")
        poisoned.calls += 1
        return out

    poisoned.calls = 0
    monkeypatch.setattr(StackedNet, "forward", poisoned)
    results = train_batched([cfg(mnist_like, s, "lab2-2c2f") for s in SEEDS], [tmp_path / f"s{s}" for s in SEEDS],
                            dataset=ds, echos=[lambda _: None] * 3)
    assert "loss became nan at epoch 1" in str(results[1])
    failed = json.loads((tmp_path / "s1/result.json").read_text())
    assert failed["status"] == "failed" and failed["error"]["epoch"] == 1
    for k in (0, 2):
        assert results[k]["status"] == "done"
        assert [r["epoch"] for r in read_metrics(tmp_path / f"s{k}")[0]] == [0, 1]
        assert all(torch.isfinite(v).all() for v in load(tmp_path / f"s{k}/checkpoints/last.safetensors")[0].values()
                   if v.is_floating_point())


def test_only_runs_that_differ_in_their_seed_batch(mnist_like):
    with pytest.raises(ConfigError, match="differ only in their seed"):
        check_group([cfg(mnist_like, 0), cfg(mnist_like, 1, epochs=3)])
    with pytest.raises(ConfigError, match="distinct seeds"):
        check_group([cfg(mnist_like, 0), cfg(mnist_like, 0)])
    net = build_model(PRESETS["lab2-2c2f"], (1, 28, 28), 10, fast_dropout=False)
    assert "nn.Dropout takes no generator" in why_not(net)
    assert why_not(build_model(PRESETS["lab2-2c2f"], (1, 28, 28), 10)) is None


def cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def _metrics(run: Path) -> list[dict]:
    return list(csv.DictReader(open(run / "metrics.csv")))


def test_a_batched_study_killed_mid_epoch_resumes_each_run_alone_on_the_same_course(tmp_path, mnist_like):
    study = tmp_path / "s.toml"
    study.write_text(f'name = "b"\nseeds = 3\n[base]\ndata = {{ name = "idx:{mnist_like}", val_size = 200 }}\n'
                     f'train = {{ epochs = 3, threads = 1, device = "cpu" }}\n'
                     f'[variants]\nbn = {{ model = {{ preset = "lab2-3c3f-bn" }} }}\n')
    ref = tmp_path / "ref"
    r = cli("study", str(study), "--out", str(ref), "--workers", "1", "--batch-seeds", "3", "--no-report")
    assert r.returncode == 0, r.stderr
    assert "3 runs trained, 0 already finished, 0 failed" in r.stdout
    assert "note: --batch-seeds 3 on the CPU" in r.stdout  # the user hears that it is meant for a GPU
    out = tmp_path / "out"
    env = {"CNNLAB_FAULT": "kill:1:5", "CNNLAB_FAULT_ONCE": str(tmp_path / "fired")}
    r = cli("study", str(study), "--out", str(out), "--workers", "1", "--batch-seeds", "3", "--no-report", env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "fired").exists()  # the batched worker really was killed, in epoch 1
    for s in SEEDS:
        a, b = ref / "runs/bn" / f"seed-{s}", out / "runs/bn" / f"seed-{s}"
        res = json.loads((b / "result.json").read_text())
        assert res["status"] == "done"
        assert "3 seeds batched" in res["kernels"] and "from epoch 1 alone" in res["kernels"]
        ma, mb = _metrics(a), _metrics(b)
        assert [m["epoch"] for m in mb] == ["0", "1", "2"]
        assert ma[0] == {**mb[0], "seconds": ma[0]["seconds"]}  # epoch 0 came from the same batched training
        for ra, rb in zip(ma[1:], mb[1:]):  # then alone, with the same kernels and random streams
            assert _close(float(ra["train_loss"]), float(rb["train_loss"]), 1e-4), (ra, rb)
        ta, _ = load(a / "checkpoints/last.safetensors")
        tb, _ = load(b / "checkpoints/last.safetensors")
        assert torch.equal(ta["rng.torch"], tb["rng.torch"])


def test_batch_seeds_flag_errors(tmp_path, mnist_like):
    study = tmp_path / "s.toml"
    study.write_text(f'name = "b"\nseeds = 2\n[base]\ndata = {{ name = "idx:{mnist_like}" }}\n[variants]\na = {{}}\n')
    r = cli("study", str(study), "--out", str(tmp_path / "o"), "--batch-seeds", "0")
    assert r.returncode == 2 and "--batch-seeds must be >= 1" in r.stderr and "Traceback" not in r.stderr


def test_a_worker_batches_new_seeds_of_one_variant_and_resumes_the_rest_alone(tmp_path):
    from cnnlab.study.worker import Task, batch_groups

    tasks = [Task(v, s, {}, str(tmp_path / v / str(s))) for v in ("a", "b") for s in range(4)]
    (tmp_path / "b" / "1").mkdir(parents=True)
    (tmp_path / "b" / "1" / "config.toml").write_text("")  # b/seed-1 was interrupted: it resumes alone
    labels = [[t.label for t in g] for g in batch_groups(tasks, 3)]
    assert labels == [["a/seed-0", "a/seed-1", "a/seed-2"], ["a/seed-3"], ["b/seed-0"], ["b/seed-1"],
                      ["b/seed-2", "b/seed-3"]]
    assert all(len(g) == 1 for g in batch_groups(tasks, 1))


def test_runs_that_cannot_batch_train_one_by_one(tmp_path, idx_dir):
    """A dropout p that only torch's bernoulli_ draws exactly has no per-model generator: the
    worker says so in each run's log and trains the runs alone."""
    study = tmp_path / "s.toml"
    study.write_text(f'name = "b"\nseeds = 2\n[base]\ndata = {{ name = "idx:{idx_dir}", val_size = 100 }}\n'
                     f'train = {{ epochs = 1, threads = 1, device = "cpu" }}\n'
                     f'[variants]\np03 = {{ model = {{ preset = "lab2-2c2f", conv_dropout = 0.3 }} }}\n')
    r = cli("study", str(study), "--out", str(tmp_path / "o"), "--workers", "1", "--batch-seeds", "2", "--no-report")
    assert r.returncode == 0, r.stderr
    for s in (0, 1):
        run = tmp_path / "o/runs/p03" / f"seed-{s}"
        res = json.loads((run / "result.json").read_text())
        assert res["status"] == "done" and "batched" not in res["kernels"]
        assert "cannot be batched: dropout p=0.3" in (run / "stdout.log").read_text()
