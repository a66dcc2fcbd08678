"""Studies: named variants x seeds, each (variant, seed) a normal run directory.

A study file (TOML):

    name = "lab2"
    seeds = [0, 1, 2]                 # or a count: seeds = 3  ->  0, 1, 2
    [base]                            # a run configuration: [data], [model], [train]
    model = { preset = "lab2-3c3f-bn" }
    train = { epochs = 10 }
    [variants]                        # each a small diff against base (tables merge key by key)
    "lab2-3c3f-bn" = {}
    "lab2-3c3f" = { model = { preset = "lab2-3c3f" } }
    [comparisons]                     # name = [variant_a, variant_b]: reported as a - b over matched seeds
    bn = ["lab2-3c3f-bn", "lab2-3c3f"]

Everything is resolved and checked (keys, types, shapes against the dataset) before any
run starts. Runs go to executors (executors.py); a finished run is never trained again.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnlab.config import RunConfig, config_from_dict
from cnnlab.errors import ConfigError, CnnlabError

STUDY_KEYS = ("name", "seeds", "base", "variants", "comparisons")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class Study:
    name: str
    seeds: list[int]
    variants: dict[str, RunConfig]
    comparisons: dict[str, tuple[str, str]] = field(default_factory=dict)

    def resolved(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seeds": self.seeds,
            "variants": {k: v.to_dict() for k, v in self.variants.items()},
            "comparisons": {k: list(v) for k, v in self.comparisons.items()},
        }


@dataclass(frozen=True)
class Task:
    """One (variant, seed) run; plain data so that it pickles to any executor."""

    variant: str
    seed: int
    config: dict  # RunConfig.to_dict()
    run_dir: str
    command: str = ""

    @property
    def label(self) -> str:
        return f"{self.variant}/seed-{self.seed}"


def _merge(base: dict, diff: dict) -> dict:
    out = copy.deepcopy(base)
    for section, table in diff.items():
        if isinstance(table, dict) and isinstance(out.get(section), dict):
            out[section] = {**out[section], **copy.deepcopy(table)}
        else:
            out[section] = copy.deepcopy(table)
    return out


def study_from_dict(data: Any, where: str = "study") -> Study:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a TOML table")
    unknown = sorted(set(data) - set(STUDY_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(STUDY_KEYS)}")
    name = data.get("name", "study")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"{where}: name must be a simple name (letters, digits, . _ -), got {name!r}")
    seeds = data.get("seeds", 3)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ConfigError(f"{where}: seeds must be >= 1, got {seeds}")
        seeds = list(range(seeds))
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise ConfigError(f"{where}: seeds must be a count or a non-empty list of non-negative integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: seeds has duplicates: {seeds}")
    base = data.get("base", {})
    if not isinstance(base, dict):
        raise ConfigError(f"{where}: [base] must be a table")
    variants_raw = data.get("variants")
    if not isinstance(variants_raw, dict) or not variants_raw:
        raise ConfigError(f"{where}: [variants] is missing or empty; add at least one, e.g. [variants] baseline = {{}}")
    variants = {}
    for vname, diff in variants_raw.items():
        if not NAME_RE.match(vname):
            raise ConfigError(f"{where}: variant name {vname!r} must use letters, digits, . _ - only")
        if not isinstance(diff, dict):
            raise ConfigError(f"{where}: variants.{vname} must be a table (a diff against [base]), got {diff!r}")
        variants[vname] = config_from_dict(_merge(base, diff), f"{where}: variants.{vname}")
    comps_raw = data.get("comparisons", {})
    if not isinstance(comps_raw, dict):
        raise ConfigError(f"{where}: [comparisons] must be a table of name = [variant_a, variant_b]")
    comparisons = {}
    for cname, pair in comps_raw.items():
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, str) for v in pair)):
            raise ConfigError(f"{where}: comparisons.{cname} must be [variant_a, variant_b], got {pair!r}")
        missing = [v for v in pair if v not in variants]
        if missing:
            raise ConfigError(f"{where}: comparisons.{cname} names unknown variant(s) {', '.join(missing)}; "
                              f"variants are: {', '.join(variants)}")
        if pair[0] == pair[1]:
            raise ConfigError(f"{where}: comparisons.{cname} compares {pair[0]} with itself")
        comparisons[cname] = (pair[0], pair[1])
    return Study(name, seeds, variants, comparisons)


def load_study(path) -> Study:
    from cnnlab.fsutil import read_toml

    return study_from_dict(read_toml(path, ConfigError, "study TOML file"), str(path))


def override(study: Study, seeds: int | None = None, epochs: int | None = None, limit: int | None = None,
             device: str | None = None, data: str | None = None) -> Study:
    """Apply command-line overrides to every variant."""
    import dataclasses

    from cnnlab.config import validate

    if seeds is not None:
        if seeds < 1:
            raise ConfigError(f"--seeds must be >= 1, got {seeds}")
        study.seeds = list(range(seeds))
    new = {}
    for name, cfg in study.variants.items():
        d = {k: v for k, v in (("limit", limit), ("name", data)) if v is not None}
        t = {k: v for k, v in (("epochs", epochs), ("device", device)) if v is not None}
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **d),
                                  train=dataclasses.replace(cfg.train, **t))
        validate(cfg, "command line")
        new[name] = cfg
    study.variants = new
    return study


def run_dir(study_dir: Path, variant: str, seed: int) -> Path:
    return Path(study_dir) / "runs" / variant / f"seed-{seed}"


def tasks_for(study: Study, out: Path, command: str = "") -> list[Task]:
    import dataclasses

    tasks = []
    for vname, cfg in study.variants.items():
        for seed in study.seeds:
            c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
            tasks.append(Task(vname, seed, c.to_dict(), str(run_dir(out, vname, seed)), command))
    return tasks


def read_result(run_dir) -> dict | None:
    """A run directory's result.json, or None while there is none (or it is unreadable)."""
    p = Path(run_dir) / "result.json"
    try:
        return json.loads(p.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run_state(task: Task) -> str:
    """'done', 'failed' (deterministically, e.g. NaN), 'partial' (interrupted) or 'new'."""
    d = Path(task.run_dir)
    res = read_result(d)
    if res is not None:
        return "done" if res.get("status") == "done" else "failed"
    return "partial" if (d / "config.toml").exists() else "new"


def check_existing(task: Task) -> None:
    """A run directory that exists must have been made by the same configuration."""
    import tomllib

    p = Path(task.run_dir) / "config.toml"
    if not p.exists():
        return
    try:
        stored = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, OSError):
        return  # unreadable config of an unfinished run: it will be rewritten on resume
    if stored != task.config:
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
    network (cnnlab.batched, each run from scratch). One outcome per task, as execute_task's.
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
            from cnnlab.train import train_run

            train_run(cfgs[0], dirs[0], dataset=dataset, resume=resume_allowed, echo=echos[0],
                      progress=progresses[0], command=tasks[0].command)
            return [{"status": "done"}]
        from cnnlab.batched import NotBatchable, train_batched

        try:
            results = train_batched(cfgs, dirs, dataset=dataset, echos=echos, progresses=progresses,
                                    command=tasks[0].command)
        except NotBatchable as e:  # e.g. a dropout p that only torch's bernoulli_ draws exactly
            for echo in echos:
                echo(f"({e})")
            return [execute_tasks([t], threads, resume_allowed)[0] for t in tasks]
        return [{"status": "failed", "error": str(r)} if isinstance(r, Exception) else {"status": "done"}
                for r in results]
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
    """The units a worker runs: up to `size` new runs of one variant together (cnnlab.batched),
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
