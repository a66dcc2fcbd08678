"""A study's worker side: its tasks, one (variant, seed) run each, and what a worker
process does with them (execute_tasks: train, resume, batch seeds, export), for the local
executor (executors.py) and Ray (ray.py) alike. Each writes its run directory itself
(cnnlab.rundir), so a task returns only a small status."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnlab.config import config_from_dict
from cnnlab.errors import CnnlabError, ConfigError
from cnnlab.rundir import read_result, run_dir
from cnnlab.study.schema import Study
from cnnlab import rundir


@dataclass(frozen=True)
class Task:
    """One (variant, seed) run; plain data so that it pickles to any executor."""

    variant: str
    seed: int
    config: dict  # RunConfig.to_dict()
    run_dir: str
    command: str = ""
    export: dict | None = None  # export the finished run (cnnlab.deploy.export_run options)

    @property
    def label(self) -> str:
        return f"{self.variant}/seed-{self.seed}"


def tasks_for(study: Study, out: Path, command: str = "", seeds: dict[str, list[int]] | None = None) -> list[Task]:
    """One task per (variant, seed): the study's seeds, or `seeds` per variant."""
    tasks = []
    for vname, cfg in study.variants.items():
        for seed in (seeds[vname] if seeds is not None else study.seeds):
            c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
            tasks.append(Task(vname, seed, c.to_dict(), str(run_dir(out, vname, seed)), command, study.export))
    return tasks


def run_state(task: Task) -> str:
    """'done', 'failed' (deterministically, e.g. NaN), 'partial' (interrupted) or 'new'."""
    d = Path(task.run_dir)
    res = read_result(d)
    if res is not None:
        return "done" if res.get("status") == "done" else "failed"
    return "partial" if (d / rundir.CONFIG).exists() else "new"


def needs_work(task: Task) -> bool:
    """A run still to train, or a finished one still to export."""
    state = run_state(task)
    if state in ("new", "partial"):
        return True
    return state == "done" and task.export is not None and not (Path(task.run_dir) / "export" / "export.json").is_file()


def export_finished(task: Task, echo) -> str | None:
    """Export a finished run as the study asks (cnnlab.deploy); None, or why it failed (one line,
    also in the run directory's export-error.txt; the run itself stays done)."""
    from cnnlab.deploy import export_run

    d = Path(task.run_dir)
    try:
        export_run(d, out=d / "export", **task.export, trust_code=True)  # the user's study file named the model
    except CnnlabError as e:
        (d / "export-error.txt").write_text(str(e) + "\n")
        echo(f"export failed: {e}")
        return str(e)
    (d / "export-error.txt").unlink(missing_ok=True)
    return None


def check_existing(task: Task) -> None:
    """A run directory that exists must have been made by the same configuration. Trackers
    (train.log) only record a run, so a study may add or drop them for runs it already has."""
    import tomllib

    def results_config(cfg: dict) -> dict:
        return {**cfg, "train": {k: v for k, v in cfg.get("train", {}).items() if k != "log"}}

    p = Path(task.run_dir) / rundir.CONFIG
    if not p.exists():
        return
    try:
        stored = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, OSError):
        return  # unreadable config of an unfinished run: it will be rewritten on resume
    if results_config(stored) != results_config(task.config):
        raise ConfigError(
            f"{task.run_dir} was trained with a different configuration than the study now asks for; "
            "use a new --out directory for a changed study (finished runs are never overwritten)"
        )


# ---------------------------------------------------------------------------- worker side

_loaded: dict[tuple, Any] = {}  # this worker's last dataset: its runs share it


def _dataset(name: str):
    """The dataset `name`, loaded (and verified) once per worker process for all the runs
    that use it, and again whenever a file in its folder changed (a Ray worker outlives a
    study; `idx:DIR` files can be rewritten between studies)."""
    from cnnlab.data import files_stamp, load_dataset

    key = (name, files_stamp(name))
    if key not in _loaded:
        _loaded.clear()
        _loaded[key] = load_dataset(name)
    return _loaded[key]


def execute_task(task: Task, threads: int = 1, resume_allowed: bool = True) -> dict:
    """Run one task in this process. Returns {"status": ..., "error": ...}; never raises for run failures."""
    return execute_tasks([task], threads, resume_allowed)[0]


def execute_tasks(tasks: list[Task], threads: int = 1, resume_allowed: bool = True) -> list[dict]:
    """Run tasks in this process: one alone, or several seeds of one variant as one batched
    network (cnnlab.engine.batched, each run from scratch). One outcome per task, as execute_task's.
    A group that was interrupted (a retry) trains its new runs together and resumes the rest alone."""
    import torch

    groups = batch_groups(tasks, len(tasks))
    if len(groups) > 1:
        return [outcome for g in groups for outcome in execute_tasks(g, threads, resume_allowed)]

    if threads:
        torch.set_num_threads(threads)
    cfgs = [config_from_dict(t.config, t.label) for t in tasks]
    dirs = [Path(t.run_dir) for t in tasks]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    logs = []
    try:
        for d in dirs:
            logs.append(open(d / "stdout.log", "a"))
        echos = [lambda line, log=log: print(line, file=log, flush=True) for log in logs]
        progresses = [_progress_writer(d / ".progress", c.train.epochs) for d, c in zip(dirs, cfgs)]
        dataset = _dataset(cfgs[0].data.name)
        if len(tasks) == 1:
            from cnnlab.engine.loop import train_run

            outcome = {"status": "done"}
            if run_state(tasks[0]) == "done":  # here only to be exported
                outcome["exported_only"] = True
            else:
                train_run(cfgs[0], dirs[0], dataset=dataset, resume=resume_allowed, echo=echos[0],
                          progress=progresses[0], command=tasks[0].command)
            if tasks[0].export is not None:
                outcome["export_error"] = export_finished(tasks[0], echos[0])
            return [outcome]
        from cnnlab.engine.batched import NotBatchable, train_batched

        try:
            results = train_batched(cfgs, dirs, dataset=dataset, echos=echos, progresses=progresses,
                                    command=tasks[0].command)
        except NotBatchable as e:  # e.g. a dropout p that only torch's bernoulli_ draws exactly
            for echo in echos:
                echo(f"({e})")
            return [execute_tasks([t], threads, resume_allowed)[0] for t in tasks]
        outcomes = [{"status": "failed", "error": str(r)} if isinstance(r, Exception) else {"status": "done"}
                    for r in results]
        for t, echo, outcome in zip(tasks, echos, outcomes):
            if t.export is not None and outcome["status"] == "done":
                outcome["export_error"] = export_finished(t, echo)
        return outcomes
    except CnnlabError as e:
        return [{"status": "failed", "error": str(e)}] * len(tasks)
    except Exception as e:  # a bug or an environment fault: keep the study going, record it
        import traceback

        text = traceback.format_exc()
        for d in dirs:
            (d / "error.txt").write_text(text)
        return [{"status": "failed", "error": f"{type(e).__name__}: {e} (traceback in {d / 'error.txt'})"}
                for d in dirs]
    finally:
        for log in logs:
            log.close()


def _progress_writer(path: Path, epochs: int):
    def progress(epoch, step, steps):
        try:
            path.write_text(json.dumps({"epoch": epoch, "step": step, "steps": steps, "epochs": epochs}))
        except OSError:
            pass

    return progress


def batch_groups(tasks: list[Task], size: int) -> list[list[Task]]:
    """The units a worker runs: up to `size` new runs of one variant together (cnnlab.engine.batched),
    every other task alone. A partly trained run resumes alone."""
    groups: list[list[Task]] = []
    for t in tasks:
        last = groups[-1] if groups else None
        if (size > 1 and last and len(last) < size and last[0].variant == t.variant
                and run_state(last[0]) == "new" and run_state(t) == "new"):
            last.append(t)
        else:
            groups.append([t])
    return groups


def read_progress(task: Task) -> float:
    """Epochs done by this task (fractional), read from its .progress file."""
    try:
        p = json.loads((Path(task.run_dir) / ".progress").read_text())
        return p["epoch"] + p["step"] / max(1, p["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0
