"""Executors: where a study's runs execute. Two small implementations, one interface:

    executor.run(tasks, on_done)   # blocks; calls on_done(task, outcome) as each run ends

- LocalExecutor: worker processes on this machine (spawn), one intra-op thread each.
  A worker killed mid-run breaks the pool; the executor starts a new pool and resumes the
  unfinished runs from their last checkpoint, up to `retries` times per run. With
  batch_seeds > 1 a worker trains up to that many new seeds of a variant as one batched
  network (cnnlab.engine.batched; for GPUs); resumed runs go alone.
- RayExecutor (cnnlab.study.ray): one Ray task per run (or per batch of seeds), same
  outcome format.

Both execute study.worker.execute_tasks, which writes the run directories itself; nothing but a
small outcome dict travels back.
"""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Callable

from cnnlab.study.worker import Task, batch_groups, execute_tasks


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


class LocalExecutor:
    def __init__(self, workers: int, threads: int = 1, retries: int = 2, poll: Callable[[], None] | None = None,
                 batch_seeds: int = 1):
        self.workers, self.threads, self.retries, self.batch_seeds = workers, threads, retries, batch_seeds
        self.poll = poll or (lambda: None)

    def run(self, tasks: list[Task], on_done: Callable[[Task, dict], None]) -> None:
        attempts = {t.label: 0 for t in tasks}
        pending = list(tasks)
        while pending:
            pending = self._one_pool(pending, attempts, on_done)

    def _one_pool(self, tasks, attempts, on_done) -> list[Task]:
        """Run tasks in a fresh pool; return those to retry after the pool broke."""
        retry: list[Task] = []
        ctx = mp.get_context("spawn")
        groups = batch_groups(tasks, self.batch_seeds)
        with ProcessPoolExecutor(min(self.workers, len(groups)), mp_context=ctx, initializer=_init_worker,
                                 initargs=(self.threads,)) as pool:
            futures = {pool.submit(execute_tasks, g, self.threads): g for g in groups}
            while futures:
                done, _ = wait(futures, timeout=1.0, return_when=FIRST_COMPLETED)
                self.poll()
                for f in done:
                    group = futures.pop(f)
                    try:
                        outcomes = f.result()
                    except BrokenProcessPool:
                        outcomes = []
                        for t in group:
                            attempts[t.label] += 1
                            if attempts[t.label] <= self.retries:
                                retry.append(t)
                                outcomes.append(None)
                            else:
                                outcomes.append({"status": "failed", "error": f"worker process died "
                                                 f"{attempts[t.label]} times (killed or out of memory)"})
                    except Exception as e:  # pickling or spawn failure
                        outcomes = [{"status": "failed", "error": f"{type(e).__name__}: {e}"}] * len(group)
                    for t, outcome in zip(group, outcomes):
                        if outcome is not None:
                            on_done(t, outcome)
        return retry
