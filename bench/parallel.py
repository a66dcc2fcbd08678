"""One process with N threads against N processes with 1 thread each: total training throughput.

    .venv/bin/python bench/parallel.py            # N = the number of cores

Each process trains the engine's network (lab2-3c3f-bn, batch 50) for the same number of
steps; the figure is samples per second of wall time, all processes together. Numbers:
docs/performance.md.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _worker(threads: int, steps: int, preset: str, start, q) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    from bench.ablate import batches, configs, train_steps
    from cnnlab import fastops
    from cnnlab.spec import PRESETS

    torch.set_num_threads(threads)
    fastops.tune_allocator()
    x, y = batches()
    model, opt, _ = list(configs(PRESETS[preset]).values())[-1]  # the engine's configuration
    train_steps(model, opt, x, y, 10, 0, step_fn=True)  # warm-up
    start.wait()
    t = time.perf_counter()
    train_steps(model, opt, x, y, steps, 0, step_fn=True, runs=True)  # the engine's runs of steps in C
    q.put((t, time.perf_counter()))


def measure(procs: int, threads: int, steps: int, preset: str) -> float:
    ctx = mp.get_context("spawn")
    start, q = ctx.Barrier(procs), ctx.Queue()
    ps = [ctx.Process(target=_worker, args=(threads, steps, preset, start, q)) for _ in range(procs)]
    for p in ps:
        p.start()
    spans = [q.get() for _ in ps]
    for p in ps:
        p.join()
    wall = max(e for _, e in spans) - min(s for s, _ in spans)
    return procs * steps * 50 / wall


def main(argv=None) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=cores, help=f"cores to use (default: {cores})")
    p.add_argument("--steps", type=int, default=300, help="training steps per process (default: 300)")
    p.add_argument("--preset", default="lab2-3c3f-bn", help="default: lab2-3c3f-bn")
    args = p.parse_args(argv)
    rows = [(1, 1), (1, args.n), (args.n, 1)]
    print(f"{args.preset}, batch 50, engine; samples/s of wall time, all processes together")
    for procs, threads in rows + rows[::-1]:  # twice, in mirrored order
        sps = measure(procs, threads, args.steps, args.preset)
        print(f"  {procs} process(es) x {threads} thread(s): {sps:7.0f} samples/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
