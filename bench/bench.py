"""Benchmark: cnnlab's engine against the plain PyTorch loop (bench/baseline.py), same protocol.

    .venv/bin/python bench/bench.py            # both scenarios, full protocol (about an hour on 2 cores)
    .venv/bin/python bench/bench.py --quick    # a reduced version, under 2 minutes
    .venv/bin/python bench/bench.py --scenario single --seeds 3

Scenario "single": one run of lab2-3c3f-bn per seed, plain loop and engine interleaved
(the order alternates per seed). Scenario "study": the lab2 study's 4 variants x seeds,
trained by the plain loop one after another, against `cnnlab study` (a subprocess on a
generated study file, its default workers), run before and after the plain runs; the ratio
uses the mean of the two. Both report samples/s, wall time, their
ratio, and the final test accuracy of both over the seeds, so a speed-up that changes
results cannot hide. Method and numbers: docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ["lab2-3c3f-bn", "lab2-3c3f", "lab2-2c3f", "lab2-2c2f"]


# ---------------------------------------------------------------------------- setup

def machine() -> dict:
    import torch

    from cnnlab import cpu_model

    cpu = cpu_model()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    from cnnlab import native

    return {"cpu": cpu, "cores": cores, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0], "platform": platform.platform(), "device": "cpu",
            "kernels": native.describe()}


def protocol(args) -> dict:
    return {"dataset": args.data, "val_size": 5000, "limit": args.limit, "epochs": args.epochs,
            "batch_size": 50, "optimizer": "Adam", "lr": 1e-3, "seeds": list(range(args.seeds)),
            "eval": "model.eval(), test accuracy on the whole test file"}


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _acc(xs: list[float]) -> str:
    m, s = _mean_sd(xs)
    return f"{m:.2f} +- {s:.2f} (n={len(xs)})"


def _config(preset: str, seed: int, args):
    from cnnlab.config import config_from_dict

    return config_from_dict({"data": {"name": args.data, "limit": args.limit},
                             "model": {"preset": preset},
                             "train": {"epochs": args.epochs, "seed": seed, "device": "cpu",
                                       "threads": args.threads}}, "bench")


def _split_tensors(ds, seed: int, limit: int):
    from cnnlab.train import make_split, to_tensors
    import torch

    train_idx, val_idx = make_split(len(ds.train_labels), 5000, seed)
    if limit:
        train_idx = train_idx[:limit]
    return to_tensors(ds, train_idx, val_idx, torch.device("cpu"))


# ---------------------------------------------------------------------------- the two loops

def run_plain(ds, preset: str, seed: int, args) -> dict:
    import torch

    from bench.baseline import train_plain
    from cnnlab.spec import PRESETS

    if args.threads:
        torch.set_num_threads(args.threads)
    data = _split_tensors(ds, seed, args.limit)
    r = train_plain(PRESETS[preset], data, epochs=args.epochs, seed=seed)
    n = len(data.y_train)
    return {"wall_seconds": r.wall_seconds, "epoch_seconds": sum(r.epoch_seconds),
            "samples_per_s": n * args.epochs / sum(r.epoch_seconds), "test_accuracy": r.test_accuracy}


def run_engine(ds, preset: str, seed: int, args, tmp: Path) -> dict:
    from cnnlab.rundir import read_metrics
    from cnnlab.train import train_run

    out = tmp / f"engine-{preset}-seed{seed}-{time.time_ns()}"
    t = time.perf_counter()
    res = train_run(_config(preset, seed, args), out, dataset=ds, echo=lambda *_: None, command="bench")
    wall = time.perf_counter() - t
    secs = sum(r["seconds"] for r in read_metrics(out)[0])
    return {"wall_seconds": wall, "epoch_seconds": secs, "samples_per_s": res["data"]["n_train"] * args.epochs / secs,
            "test_accuracy": res["test_accuracy_eval"]}


# ---------------------------------------------------------------------------- scenarios

def scenario_single(ds, args, tmp: Path) -> dict:
    rows = {"plain": [], "engine": []}
    for seed in range(args.seeds):
        order = ["plain", "engine"] if seed % 2 == 0 else ["engine", "plain"]
        for who in order:
            r = run_plain(ds, "lab2-3c3f-bn", seed, args) if who == "plain" else run_engine(ds, "lab2-3c3f-bn", seed, args, tmp)
            rows[who].append(r)
            print(f"  single seed {seed} {who:6s}: {r['samples_per_s']:8.0f} samples/s  wall {r['wall_seconds']:7.1f} s  "
                  f"test {r['test_accuracy']:.2f}%", flush=True)
    sps = {k: statistics.fmean(r["samples_per_s"] for r in v) for k, v in rows.items()}
    wall = {k: sum(r["wall_seconds"] for r in v) for k, v in rows.items()}
    return {"preset": "lab2-3c3f-bn", "runs": rows, "samples_per_s": sps, "wall_seconds": wall,
            "speedup_samples_per_s": sps["engine"] / sps["plain"], "speedup_wall": wall["plain"] / wall["engine"],
            "test_accuracy": {k: [r["test_accuracy"] for r in v] for k, v in rows.items()}}


def _study_toml(args) -> str:
    lines = ['name = "bench"', f"seeds = {args.seeds}", "[base]", f'data = {{ name = "{args.data}", limit = {args.limit} }}',
             f"train = {{ epochs = {args.epochs}, batch_size = 50, lr = 0.001, device = \"cpu\" }}", "[variants]"]
    lines += [f'"{v}" = {{ model = {{ preset = "{v}" }} }}' for v in VARIANTS]
    return "\n".join(lines) + "\n"


def _engine_study(args, tmp: Path) -> tuple[float, dict, list[str]]:
    """`cnnlab study` as a user runs it (default workers: one per core, 1 thread each):
    (wall seconds, test accuracies per variant, the command)."""
    study_file = tmp / "bench-study.toml"
    study_file.write_text(_study_toml(args))
    out = tmp / f"study-{time.time_ns()}"
    cmd = [sys.executable, "-m", "cnnlab.cli", "study", str(study_file), "--out", str(out), "--no-report"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    acc = {v: [json.loads((out / "runs" / v / f"seed-{s}" / "result.json").read_text())["test_accuracy_eval"]
               for s in range(args.seeds)] for v in VARIANTS}
    return wall, acc, cmd


def scenario_study(ds, args, tmp: Path) -> dict:
    """engine study, plain runs, engine study again (A-B-A): a drift of the shared host's
    speed over the ~40 minutes cancels to first order in the mean of the two engine walls."""
    first, engine_acc, cmd = _engine_study(args, tmp)
    print(f"  study engine (cnnlab study): wall {first:.1f} s", flush=True)
    t = time.perf_counter()
    plain_acc = {v: [] for v in VARIANTS}
    for v in VARIANTS:
        for s in range(args.seeds):
            plain_acc[v].append(run_plain(ds, v, s, args)["test_accuracy"])
    plain_wall = time.perf_counter() - t
    print(f"  study plain (sequential):    wall {plain_wall:.1f} s", flush=True)
    second, again, _ = _engine_study(args, tmp)
    print(f"  study engine again:          wall {second:.1f} s", flush=True)
    if again != engine_acc:  # the same seeds on the same machine must give the same numbers
        raise SystemExit(f"the engine's two studies gave different accuracies: {engine_acc} and {again}")
    engine_wall = (first + second) / 2
    return {"variants": VARIANTS, "command": " ".join(cmd[1:]), "order": "engine, plain, engine",
            "engine_walls": [first, second], "wall_seconds": {"plain": plain_wall, "engine": engine_wall},
            "speedup_wall": plain_wall / engine_wall,
            "speedup_wall_each": [plain_wall / first, plain_wall / second],
            "test_accuracy": {"plain": plain_acc, "engine": engine_acc}}


# ---------------------------------------------------------------------------- main

def report(results: dict) -> str:
    out = [f"machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, torch "
           f"{results['machine']['torch']} ({results['machine']['torch_threads']} threads in this process)",
           f"protocol: {json.dumps(results['protocol'])}",
           f"load average (1 min) before {results['load_before'][0]:.2f}, after {results['load_after'][0]:.2f}"]
    if "single" in results:
        s = results["single"]
        out += ["", "single run (lab2-3c3f-bn):",
                f"  samples/s  plain {s['samples_per_s']['plain']:.0f}  engine {s['samples_per_s']['engine']:.0f}"
                f"  ratio {s['speedup_samples_per_s']:.2f}x",
                f"  wall       plain {s['wall_seconds']['plain']:.1f} s  engine {s['wall_seconds']['engine']:.1f} s"
                f"  ratio {s['speedup_wall']:.2f}x",
                f"  test acc   plain {_acc(s['test_accuracy']['plain'])}  engine {_acc(s['test_accuracy']['engine'])}"]
    if "study" in results:
        s = results["study"]
        out += ["", f"study ({len(s['variants'])} variants x {len(results['protocol']['seeds'])} seeds):",
                f"  wall  plain (sequential) {s['wall_seconds']['plain']:.1f} s  engine (cnnlab study) "
                f"{s['wall_seconds']['engine']:.1f} s  ratio {s['speedup_wall']:.2f}x"]
        if "engine_walls" in s:
            out.append(f"  (engine studies before and after the plain runs: {s['engine_walls'][0]:.1f} s and "
                       f"{s['engine_walls'][1]:.1f} s, ratios {s['speedup_wall_each'][0]:.2f}x and "
                       f"{s['speedup_wall_each'][1]:.2f}x)")
        for v in s["variants"]:
            out.append(f"  {v:14s} test acc  plain {_acc(s['test_accuracy']['plain'][v])}  "
                       f"engine {_acc(s['test_accuracy']['engine'][v])}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="reduced protocol: 1 epoch, 5000 training images, 3 seeds, 1 thread (under 2 minutes)")
    p.add_argument("--scenario", choices=["single", "study", "both"], default="both", help="default: both")
    p.add_argument("--seeds", type=int, help="seeds 0..N-1 (default: 3)")
    p.add_argument("--epochs", type=int, help="epochs per run (default: 10; --quick: 1)")
    p.add_argument("--limit", type=int, help="train on the first N images of the split (default: all; --quick: 5000)")
    p.add_argument("--threads", type=int,
                   help="intra-op threads of the in-process runs, both loops (default: torch's default; --quick: 1)")
    p.add_argument("--data", default="mnist", help="dataset (default: mnist)")
    p.add_argument("--json", metavar="FILE", help="also write all numbers to FILE")
    args = p.parse_args(argv)
    args.seeds = args.seeds or 3
    args.epochs = args.epochs or (1 if args.quick else 10)
    args.limit = args.limit if args.limit is not None else (5000 if args.quick else 0)
    args.threads = args.threads if args.threads is not None else (1 if args.quick else 0)

    import torch

    from cnnlab.data import load_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    ds = load_dataset(args.data)
    results = {"machine": machine(), "protocol": protocol(args), "command": " ".join(sys.argv),
               "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "load_before": os.getloadavg()}
    if results["load_before"][0] > 0.5:
        print(f"note: 1-minute load average {results['load_before'][0]:.2f}; processes still running on these "
              "cores disturb the timings (the more so with 2+ threads per process)", flush=True)
    print(f"bench: {results['machine']['cpu']}, {results['machine']['cores']} cores; "
          f"{args.epochs} epoch(s), {args.seeds} seed(s), limit {args.limit or 'none'}", flush=True)
    with tempfile.TemporaryDirectory(prefix="cnnlab-bench-") as tmp:
        if args.scenario in ("single", "both"):
            results["single"] = scenario_single(ds, args, Path(tmp))
        if args.scenario in ("study", "both"):
            results["study"] = scenario_study(ds, args, Path(tmp))
    results["load_after"] = os.getloadavg()
    text = report(results)
    print("\n" + text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
