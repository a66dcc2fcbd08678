"""Per-step cost of each speed measure, and the profile of what dominates a training step.

    .venv/bin/python bench/ablate.py                     # lab2-3c3f-bn, 1 thread
    .venv/bin/python bench/ablate.py --preset lab2-2c2f --profile

Every configuration trains its own copy of the same network on the same batches (batch 50,
real MNIST images when cached, random ones otherwise), interleaved round by round in
one process; the figure is the median CPU time per step (process time, so other load on
the machine disturbs it less than wall time). The allocator tuning is process-wide: run
once with --no-tune-allocator to see its share. Numbers: docs/performance.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def batches(n: int = 5000):
    import torch

    try:
        from cnnlab.data import load_dataset

        ds = load_dataset("mnist")
        x = torch.from_numpy(ds.train_images[:n]).float().div_(255.0)
        y = torch.from_numpy(ds.train_labels[:n].astype("int64"))
    except Exception:  # no cached MNIST: random images give the same op costs
        torch.manual_seed(0)
        x, y = torch.rand(n, 1, 28, 28), torch.randint(0, 10, (n,))
    return x, y


def configs(spec):
    """name -> (model, optimizer, fast paths). The first is the plain way, the last the engine's."""
    import torch

    from bench.baseline import plain_model
    from cnnlab import model as M

    torch.manual_seed(0)
    out = {"plain (nn.Dropout, Adam for-loop)": (plain_model(spec, (1, 28, 28), 10), dict(), set())}
    for name, paths in [("FastDropout + fused Adam", set()), ("+ fast max-pool, ReLU after it", {"pool"}),
                        ("+ first conv as GEMM", {"pool", "conv1"}),
                        ("+ native blocks, lean Adam (in C)", {"pool", "conv1", "native"}),
                        ("+ no autograd (steps from Python)", {"pool", "conv1", "native", "step"}),
                        ("+ the step in one C call", {"pool", "conv1", "native", "step", "cstep"}),
                        ("+ runs of 20 steps in one C call (engine)",
                         {"pool", "conv1", "native", "step", "cstep", "runs"})]:
        torch.manual_seed(0)
        out[name] = (M.build_model(spec, (1, 28, 28), 10), dict(fused=True), paths)
    from cnnlab.fastops import LeanAdam

    def opt(m, kw, paths):
        if "native" in paths:  # the engine's optimizer: the same fused kernel, less Python
            return LeanAdam(m.parameters(), lr=1e-3)
        return torch.optim.Adam(m.parameters(), lr=1e-3, **kw)

    return {k: (m, opt(m, kw, paths), paths) for k, (m, kw, paths) in out.items()}


def train_steps(model, opt, x, y, steps: int, start: int, bs: int = 50, step_fn: bool = False,
                runs: bool = False) -> int:
    """steps training steps on consecutive batches from sample `start`; returns where they
    ended. step_fn: the engine's step without autograd (Net.native_train_step); runs: up to
    20 steps per C call with Adam inside (Net.native_train_steps), as the training loop does."""
    import torch
    import torch.nn.functional as F

    model.train()
    while runs and steps > 0:
        k = min(steps, 20)
        idx = torch.arange(start, start + k * bs) % len(y)
        if not model.native_train_steps(opt, x, y, idx, bs, torch.empty(k), torch.empty(k * bs, dtype=torch.int64)):
            break  # the path does not apply (no Adam state yet): one by one below
        steps -= k
        start += k * bs
    for _ in range(steps):
        i = start % (len(y) - bs)
        opt.zero_grad(set_to_none=True)
        if not (step_fn and model.native_train_step(x[i:i + bs], y[i:i + bs]) is not None):
            loss = F.cross_entropy(model(x[i:i + bs]), y[i:i + bs])
            loss.backward()
        opt.step()
        start += bs
    return start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="lab2-3c3f-bn", help="default: lab2-3c3f-bn")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default: 1)")
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds (default: 9)")
    p.add_argument("--steps", type=int, default=20, help="steps per configuration per round (default: 20)")
    p.add_argument("--wall", action="store_true", help="wall time instead of CPU time (use with --threads > 1)")
    p.add_argument("--no-tune-allocator", action="store_true", help="leave glibc malloc's defaults")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's top ops of the engine's step (torch ops only, not inside its C call)")
    args = p.parse_args(argv)

    import torch

    from cnnlab import fastops
    from cnnlab import model as M
    from cnnlab.spec import PRESETS

    torch.set_num_threads(args.threads)
    tuned = False if args.no_tune_allocator else fastops.tune_allocator()
    x, y = batches()
    cfgs = configs(PRESETS[args.preset])
    pos = {k: 0 for k in cfgs}
    times: dict[str, list[float]] = {k: [] for k in cfgs}
    saved = set(M.FAST_PATHS)
    try:
        for k, (m, opt, paths) in cfgs.items():  # warm-up
            M.FAST_PATHS = paths - {"step", "runs"}
            pos[k] = train_steps(m, opt, x, y, 5, pos[k], step_fn="step" in paths)
        for r in range(args.rounds):
            for k in (list(cfgs) if r % 2 == 0 else list(reversed(cfgs))):
                m, opt, paths = cfgs[k]
                M.FAST_PATHS = paths - {"step", "runs"}
                clock = time.perf_counter if args.wall else time.process_time
                t = clock()
                pos[k] = train_steps(m, opt, x, y, args.steps, pos[k], step_fn="step" in paths, runs="runs" in paths)
                times[k].append((clock() - t) / args.steps)
        print(f"{args.preset}, batch 50, {args.threads} thread(s), allocator tuned: {tuned}; "
              f"median {'wall' if args.wall else 'CPU'} ms per step over {args.rounds} rounds")
        ref = statistics.median(times[next(iter(cfgs))])
        for k, ts in times.items():
            med = statistics.median(ts)
            print(f"  {k:42s} {med * 1e3:6.2f} ms  {50 / med:6.0f} samples/s  x{ref / med:.2f}")
        if args.profile:
            from torch.profiler import profile

            k = list(cfgs)[-1]
            m, opt, paths = cfgs[k]
            M.FAST_PATHS = paths - {"step", "runs"}
            with profile() as prof:
                train_steps(m, opt, x, y, 50, 0, step_fn="step" in paths, runs="runs" in paths)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    finally:
        M.FAST_PATHS = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
