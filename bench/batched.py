"""Batched seeds against separate runs: K seeds of one variant trained as one network
(cnnlab.engine.batched, `cnnlab study --batch-seeds K`) against the same K runs one after another,
on the engine's default kernels and on torch's (the kernels the batched network uses).

    .venv/bin/python bench/batched.py                         # CPU, lab2-3c3f-bn, 3 seeds, 1 epoch on 10,000 images
    .venv/bin/python bench/batched.py --device cuda --epochs 10 --limit 0 --seeds 3 6 12

Prints model-samples/s (training epochs only, as bench.py) and each run's test accuracy; the
batched runs draw the masks of the separate torch-kernel runs, so those two accuracy columns
should agree (up to float rounding). --json FILE keeps the numbers. On a GPU this is the measurement docs/performance.md waits for.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="lab2-3c3f-bn")
    p.add_argument("--data", default="mnist")
    p.add_argument("--device", default="cpu")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--limit", type=int, default=10_000, help="training images (0: the whole 55k split)")
    p.add_argument("--seeds", type=int, nargs="+", default=[3], help="K values to measure (seeds 0..K-1)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)

    import torch

    from cnnlab import model, versions
    from cnnlab.engine.batched import train_batched
    from cnnlab.config import config_from_dict
    from cnnlab.data import load_dataset
    from cnnlab.rundir import read_metrics
    from cnnlab.engine.loop import train_run
    from cnnlab.engine.run import device_name, resolve_device

    torch.set_num_threads(args.threads)
    ds = load_dataset(args.data)

    def cfg(seed):
        return config_from_dict({"data": {"name": args.data, "limit": args.limit}, "model": {"preset": args.preset},
                                 "train": {"epochs": args.epochs, "seed": seed, "device": args.device,
                                           "threads": args.threads}}, "bench")

    def sps(dirs):
        n = json.loads((dirs[0] / "result.json").read_text())["data"]["n_train"]
        secs = sum(r["seconds"] for d in dirs for r in read_metrics(d)[0])
        return n * args.epochs * len(dirs) / secs

    def acc(dirs):
        return [round(json.loads((d / "result.json").read_text())["test_accuracy_eval"], 2) for d in dirs]

    out: dict = {"command": " ".join(sys.argv), "device": device_name(resolve_device(args.device)),
                 "versions": versions(), "protocol": {"dataset": args.data, "preset": args.preset, "epochs": args.epochs,
                                                      "limit": args.limit, "batch_size": 50, "lr": 1e-3},
                 "rows": []}
    print(f"{out['device']}; {args.preset}, {args.data}, limit {args.limit or 'none'}, {args.epochs} epoch(s), batch 50")
    fast = set(model.FAST_PATHS)
    with tempfile.TemporaryDirectory(prefix="cnnlab-batched-") as tmp:
        tmp = Path(tmp)
        for k in args.seeds:
            seeds = list(range(k))
            row = {"K": k}
            for label, paths in (("separate, default kernels", fast), ("separate, torch's kernels", set())):
                model.FAST_PATHS = paths
                dirs = [tmp / f"{label[:12]}-{k}-{s}-{time.time_ns()}" for s in seeds]
                for s, d in zip(seeds, dirs):
                    train_run(cfg(s), d, dataset=ds, echo=lambda _: None)
                row[label] = {"samples_per_s": sps(dirs), "test_accuracy": acc(dirs)}
            # still torch's byte generator for the masks, so that each batched run draws its
            # separate torch-kernel run's masks and their accuracies can be compared
            dirs = [tmp / f"batched-{k}-{s}-{time.time_ns()}" for s in seeds]
            train_batched([cfg(s) for s in seeds], dirs, dataset=ds, echos=[lambda _: None] * k)
            model.FAST_PATHS = fast
            # each run's epoch seconds hold its 1/K share of the batch's steps and its own evaluation
            row["batched"] = {"samples_per_s": sps(dirs),
                              "test_accuracy": acc(dirs)}
            out["rows"].append(row)
            base = row["separate, default kernels"]["samples_per_s"]
            for label in ("separate, default kernels", "separate, torch's kernels", "batched"):
                r = row[label]
                print(f"K={k:3d} {label:26s} {r['samples_per_s']:9.0f} model-samples/s ({r['samples_per_s'] / base:5.2f}x)"
                      f"  test acc {statistics.fmean(r['test_accuracy']):.2f} {r['test_accuracy']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
