"""The one epoch loop (fit) and train_run, which trains one run with it.

fit takes its steps from a step function (cnnlab.engine.steps): the native C plan for the
lab's networks, torch autograd for any module, or the stacked form for K seeds of one
variant (cnnlab.engine.batched). Everything else about an epoch (the batch order, the
per-step losses and predictions kept on the device, progress, fault injection, then each
run's evaluation, log and checkpoint in Run.end_epoch) is here, once.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from cnnlab import faults
from cnnlab.config import RunConfig
from cnnlab.engine.run import Run, run_directory
from cnnlab.engine.steps import steps_for
from cnnlab.errors import RunError

PROGRESS_STEPS = 20  # steps between progress reports (and the longest run of steps in one C call)


def train_run(cfg: RunConfig, out_dir, *, dataset=None, resume: bool = False, echo=print,
              progress=None, command: str | None = None) -> dict:
    """Train one run into out_dir and return its result.json dict.

    resume=True continues from out_dir/checkpoints/last.safetensors (epoch boundary);
    the result is bit-identical to an uninterrupted run on the same machine and versions.
    `progress(epoch, step, steps)` is called at each epoch start and end (for displays).
    A NaN/Inf loss stops the run, marks it failed and writes no checkpoint after it.
    """
    from cnnlab import checkpoint
    from cnnlab.data import load_dataset

    out = Path(out_dir)
    with run_directory(out):
        run = Run(cfg, out, dataset or load_dataset(cfg.data.name), resume, echo, command, checkpoint)
        (outcome,) = fit([run], steps_for(run), [progress])
    if isinstance(outcome, RunError):
        raise outcome
    return outcome


def fit(runs: list[Run], steps, progresses) -> list:
    """The one epoch loop: train `runs` (one run, or K seeds of one variant trained as one
    network) from their start epoch to the last, taking the steps with `steps` (a step
    function: NativeSteps, AutogradSteps, or cnnlab.engine.batched.StackedSteps), and evaluate,
    log and checkpoint each run's epochs (Run.end_epoch). Returns, per run, its result.json
    dict or the RunError that failed it (a NaN loss fails one run; the others go on)."""
    K, first = len(runs), runs[0]
    device, bs = first.device, first.cfg.train.batch_size
    n = len(first.data.y_train)
    n_steps = math.ceil(n / bs)
    outcome: list = [None] * K
    fault = faults.point()

    def report(k_live, epoch, step):
        for k in k_live:
            if progresses[k]:
                progresses[k](epoch, step, n_steps)

    for epoch in range(first.start_epoch, first.cfg.train.epochs):
        te = time.time()
        live = [k for k in range(K) if outcome[k] is None]
        report(live, epoch, 0)
        steps.train()
        perms = [torch.randperm(n, generator=r.order_gen) for r in runs]  # every run's order, failed or not
        order = torch.stack(perms).to(device)  # (K, n)
        # per-step results stay on the device; the host reads them once, after the epoch
        step_loss = torch.empty(K, n_steps, device=device)
        pred = torch.empty(K, n, dtype=torch.int64, device=device)  # in batch order
        step = 0
        while step < n_steps:
            stop = min(step - step % PROGRESS_STEPS + PROGRESS_STEPS, n_steps)  # the next progress report
            if fault is not None and fault[:2] == ("kill", epoch) and step <= fault[2] < stop:
                stop = fault[2] + 1
            step += steps.take(order, step, stop, step_loss, pred)
            if step % PROGRESS_STEPS == 0:
                report(live, epoch, step)
            faults.maybe_die(fault, "kill", epoch, step - 1)
        steps.sync()
        share = (time.time() - te) / K  # each run's epoch seconds: its share of the steps, then its evaluation
        for k in live:
            try:
                runs[k].end_epoch(epoch, step_loss[k], pred[k], order[k], time.time() - share)
            except RunError as e:  # this run's loss became NaN: it fails alone
                outcome[k] = e
                continue
            report([k], epoch, n_steps)
    return [o if o is not None else r.finish() for o, r in zip(outcome, runs)]
