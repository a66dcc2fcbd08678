"""Benchmark: cnnlab's engine against the plain PyTorch loop (bench/baseline.py), same protocol.

    .venv/bin/python bench/bench.py            # single and study, full protocol (about an hour on 2 cores)
    .venv/bin/python bench/bench.py --quick    # a reduced version, under 2 minutes
    .venv/bin/python bench/bench.py --scenario single --seeds 3
    .venv/bin/python bench/bench.py --scenario defaults --seeds 3   # whole processes, defaults (~10 min)
    .venv/bin/python bench/bench.py --scenario epoch1 --seeds 5     # the same, one epoch

Scenario "single": one run of lab2-3c3f-bn per seed, plain loop and engine interleaved
(the order alternates per seed). Scenario "study": the lab2 study's 4 variants x seeds,
trained by the plain loop one after another, against `cnnlab study` (a subprocess on a
generated study file, its default workers), run before and after the plain runs; the ratio
uses the mean of the two. Both report samples/s, wall time, their
ratio, and the final test accuracy of both over the seeds, so a speed-up that changes
results cannot hide.

Scenario "defaults" (issue 18): defaults against defaults, whole processes. Per seed,
`cnnlab train --preset lab2-3c3f-bn --data mnist --epochs 10 --seed S` as a user runs it
(cnnlab's defaults: threads 0, so torch's thread count, and the C step across all of them)
and the plain loop as a process of its own (this script with --child-plain: import torch,
load the data, split, train, evaluate) at torch's default threads, interleaved (the order
alternates per seed); wall time of each process from start to exit. Scenario "epoch1": the
same with one epoch, where start-up and the final evaluations weigh most. --threads does
not apply to them. Method and numbers: docs/performance.md.
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
    from cnnlab.engine.run import make_split, to_tensors
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
    from cnnlab.engine.loop import train_run

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


# ---------------------------------------------------------------------------- whole processes

def child_plain(args) -> int:
    """The plain loop as a whole process (--child-plain): torch's default threads unless
    --threads; prints one JSON line."""
    import torch

    from cnnlab.data import load_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    ds = load_dataset(args.data)
    r = run_plain(ds, args.preset, args.seed, args)
    r["torch_threads"] = torch.get_num_threads()
    print(json.dumps(r), flush=True)
    return 0


def _process_plain(args, seed: int, epochs: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-plain", "--preset", "lab2-3c3f-bn", "--seed",
           str(seed), "--epochs", str(epochs), "--data", args.data, "--limit", str(args.limit)]
    t = time.perf_counter()
    out = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True).stdout
    wall = time.perf_counter() - t
    r = json.loads(out.strip().splitlines()[-1])
    return {"wall_seconds": wall, "epoch_seconds": r["epoch_seconds"], "test_accuracy": r["test_accuracy"],
            "threads": r["torch_threads"], "command": " ".join(cmd[1:])}


def _process_engine(args, seed: int, epochs: int, tmp: Path) -> dict:
    out = tmp / f"train-{seed}-{epochs}-{time.time_ns()}"
    cmd = [sys.executable, "-m", "cnnlab.cli", "train", "--preset", "lab2-3c3f-bn", "--data", args.data,
           "--epochs", str(epochs), "--seed", str(seed)] + (["--limit", str(args.limit)] if args.limit else [])
    cmd += ["--out", str(out)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    from cnnlab.rundir import read_metrics

    res = json.loads((out / "result.json").read_text())
    return {"wall_seconds": wall, "epoch_seconds": sum(r["seconds"] for r in read_metrics(out)[0]),
            "test_accuracy": res["test_accuracy_eval"], "kernels": res.get("kernels"), "device": res.get("device"),
            "command": "cnnlab train " + " ".join(cmd[4:-2])}


def scenario_process(args, tmp: Path, epochs: int) -> dict:
    """Whole processes at defaults, plain and engine interleaved (order alternating per seed)."""
    rows = {"plain": [], "engine": []}
    for seed in range(args.seeds):
        order = ["plain", "engine"] if seed % 2 == 0 else ["engine", "plain"]
        for who in order:
            r = _process_plain(args, seed, epochs) if who == "plain" else _process_engine(args, seed, epochs, tmp)
            rows[who].append(r)
            print(f"  {epochs}-epoch process seed {seed} {who:6s}: wall {r['wall_seconds']:7.1f} s  "
                  f"(epochs {r['epoch_seconds']:6.1f} s)  test {r['test_accuracy']:.2f}%", flush=True)
    wall = {k: sum(r["wall_seconds"] for r in v) for k, v in rows.items()}
    pairs = [p["wall_seconds"] / e["wall_seconds"] for p, e in zip(rows["plain"], rows["engine"])]
    return {"preset": "lab2-3c3f-bn", "epochs": epochs, "runs": rows, "wall_seconds": wall,
            "speedup_wall": wall["plain"] / wall["engine"], "speedup_wall_per_seed": pairs,
            "engine_command": rows["engine"][0]["command"], "engine_kernels": rows["engine"][0]["kernels"],
            "plain_threads": rows["plain"][0]["threads"],
            "test_accuracy": {k: [r["test_accuracy"] for r in v] for k, v in rows.items()}}


# ---------------------------------------------------------------------------- the step's threads

def scenario_threads(args) -> dict:
    """The C step (runs of 20 steps in one call, Adam inside, as the training loop takes
    them) of lab2-3c3f-bn at 1 thread and at every core, two copies of the same net trained
    in one process on the same MNIST batches, interleaved run by run: wall ms per step."""
    import torch

    from cnnlab import fastops, model as M, native
    from cnnlab.data import load_dataset
    from cnnlab.spec import PRESETS

    fastops.tune_allocator()
    ds = load_dataset(args.data)
    x = torch.from_numpy(ds.train_images[:5000]).float().div_(255.0).reshape(-1, *ds.input_shape).contiguous()
    y = torch.from_numpy(ds.train_labels[:5000].astype("int64"))
    counts = sorted({1, native._cores()})
    nets = {}
    for n in counts:
        native.set_threads(n)
        torch.manual_seed(0)
        net = M.build_model(PRESETS["lab2-3c3f-bn"], ds.input_shape, ds.num_classes)
        net.train()
        opt = fastops.LeanAdam(net.parameters(), lr=1e-3)
        net.native_train_step(x[:50], y[:50])
        opt.step()
        nets[n] = (net, opt)
    times: dict[int, list[float]] = {n: [] for n in counts}
    start = 50
    for r in range(args.rounds):
        for n in (counts if r % 2 == 0 else counts[::-1]):
            native.set_threads(n)
            net, opt = nets[n]
            idx = torch.arange(start, start + 1000) % len(y)
            torch.manual_seed(r)  # the same dropout draws for both
            t = time.perf_counter()
            if not net.native_train_steps(opt, x, y, idx, 50, torch.empty(20), torch.empty(1000, dtype=torch.int64)):
                raise SystemExit("the C step does not apply here: " + native.describe())
            times[n].append((time.perf_counter() - t) / 20)
        start += 1000
    native.set_threads(None)
    same = all(torch.equal(v, w) for v, w in zip(nets[counts[0]][0].state_dict().values(),
                                                  nets[counts[-1]][0].state_dict().values()))
    ms = {n: {"min": min(ts) * 1e3, "median": statistics.median(ts) * 1e3} for n, ts in times.items()}
    return {"preset": "lab2-3c3f-bn", "batch": 50, "rounds": args.rounds, "threads": counts, "ms_per_step": ms,
            "speedup_median": ms[counts[0]]["median"] / ms[counts[-1]]["median"],
            "speedup_min": ms[counts[0]]["min"] / ms[counts[-1]]["min"], "bit_identical_after": same,
            "kernels": native.describe()}


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
    if "threads" in results:
        s = results["threads"]
        out += ["", f"the C step across threads (lab2-3c3f-bn, batch 50, runs of 20 steps, {s['rounds']} rounds "
                    f"interleaved; {s['kernels']}):"]
        out += [f"  {n} thread(s): median {v['median']:.3f} ms/step, min {v['min']:.3f}"
                for n, v in s["ms_per_step"].items()]
        out.append(f"  speed-up: median {s['speedup_median']:.2f}x, min {s['speedup_min']:.2f}x; weights after "
                   f"the same steps bit-identical across thread counts: {s['bit_identical_after']}")
    for key in ("defaults", "epoch1"):
        if key in results:
            s = results[key]
            out += ["", f"whole processes at defaults, {s['epochs']} epoch(s), lab2-3c3f-bn ({key}):",
                    f"  engine: {s['engine_command']}  [{s['engine_kernels']}]",
                    f"  plain:  bench/bench.py --child-plain (torch's default threads: {s['plain_threads']})",
                    f"  wall   plain {s['wall_seconds']['plain']:.1f} s  engine {s['wall_seconds']['engine']:.1f} s"
                    f"  ratio {s['speedup_wall']:.2f}x  (per seed: "
                    + ", ".join(f"{r:.2f}x" for r in s["speedup_wall_per_seed"]) + ")",
                    f"  test acc   plain {_acc(s['test_accuracy']['plain'])}  engine {_acc(s['test_accuracy']['engine'])}"]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="reduced protocol: 1 epoch, 5000 training images, 3 seeds, 1 thread (under 2 minutes)")
    p.add_argument("--scenario", choices=["single", "study", "both", "defaults", "epoch1", "processes", "threads"],
                   default="both", help="both = single and study (default); processes = defaults and epoch1; "
                   "threads = the C step at 1 thread and at every core")
    p.add_argument("--rounds", type=int, default=40, help="threads scenario: interleaved rounds (default: 40)")
    p.add_argument("--seeds", type=int, help="seeds 0..N-1 (default: 3)")
    p.add_argument("--epochs", type=int, help="epochs per run (default: 10; --quick: 1)")
    p.add_argument("--limit", type=int, help="train on the first N images of the split (default: all; --quick: 5000)")
    p.add_argument("--threads", type=int,
                   help="intra-op threads of the in-process runs, both loops (default: torch's default; --quick: 1)")
    p.add_argument("--data", default="mnist", help="dataset (default: mnist)")
    p.add_argument("--json", metavar="FILE", help="also write all numbers to FILE")
    p.add_argument("--child-plain", action="store_true", help=argparse.SUPPRESS)  # one plain run, a process
    p.add_argument("--preset", default="lab2-3c3f-bn", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_plain:
        args.epochs, args.limit, args.threads = args.epochs or 10, args.limit or 0, args.threads or 0
        return child_plain(args)
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
        if args.scenario == "threads":
            results["threads"] = scenario_threads(args)
        if args.scenario in ("defaults", "processes"):
            results["defaults"] = scenario_process(args, Path(tmp), args.epochs)
        if args.scenario in ("epoch1", "processes"):
            results["epoch1"] = scenario_process(args, Path(tmp), 1)
    results["load_after"] = os.getloadavg()
    text = report(results)
    print("\n" + text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
