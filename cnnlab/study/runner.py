"""Run a study into a study directory: lock it, skip finished runs, execute the rest, report.

Progress: one display for the whole study (runs done, epochs in flight, ETA), fed by the
`.progress` file each run writes, so it works the same for every executor.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from cnnlab.errors import ConfigError, RunError
from cnnlab.fsutil import atomic_write_json, exclusive
from cnnlab.rundir import existing_seeds, read_result
from cnnlab.study.schema import Study, decide_all, next_round, seeds_text
from cnnlab.study.worker import Task, check_existing, needs_work, read_progress, tasks_for


class Display:
    """A single tqdm bar in epochs over the whole study on a terminal; plain lines otherwise."""

    def __init__(self, tasks: list[Task], total_epochs: dict[str, int], tty: bool | None = None):
        self.tasks, self.total_epochs = tasks, total_epochs
        self.done, self.failed = 0, 0
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.bar = None
        if self.tty and tasks:
            from tqdm import tqdm

            self.bar = tqdm(total=sum(total_epochs[t.label] for t in tasks), unit="epoch", desc="study",
                            dynamic_ncols=True)
        self.finished: set[str] = set()

    def poll(self) -> None:
        if self.bar is None:
            return
        epochs = sum(self.total_epochs[t.label] if t.label in self.finished else read_progress(t) for t in self.tasks)
        self.bar.n = round(epochs, 2)
        running = sum(1 for t in self.tasks if t.label not in self.finished and read_progress(t) > 0)
        self.bar.set_postfix_str(f"runs {self.done}/{len(self.tasks)} done, {running} running"
                                 + (f", {self.failed} failed" if self.failed else ""), refresh=False)
        self.bar.refresh()

    def run_done(self, task: Task, outcome: dict) -> None:
        self.finished.add(task.label)
        if outcome["status"] == "done":
            self.done += 1
            res = read_result(task.run_dir) or {}
            msg = ("exported " if outcome.get("exported_only") else "done    ") + (
                f"{task.label}: test accuracy {res.get('test_accuracy', float('nan')):.2f}%")
            if outcome.get("export_error"):
                msg += f"; export FAILED: {outcome['export_error']}"
        else:
            self.failed += 1
            msg = f"FAILED  {task.label}: {outcome.get('error')}"
        if self.bar is not None:
            self.bar.write(msg)
            self.poll()
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _previous(out: Path) -> dict:
    try:
        data = json.loads((out / "study.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _accuracies(tasks: list[Task]) -> dict[str, dict[int, float]]:
    acc: dict[str, dict[int, float]] = {}
    for t in tasks:
        res = read_result(t.run_dir)
        if res and res.get("status") == "done" and isinstance(res.get("test_accuracy"), (int, float)):
            acc.setdefault(t.variant, {})[t.seed] = float(res["test_accuracy"])
    return acc


def run_study(study: Study, out: Path, executor, study_file: Path | None = None, command: str = "",
              report: bool = True) -> dict:
    """Run every unfinished (variant, seed) of `study` into `out`; with seeds until resolved,
    in rounds until every comparison is resolved or the budget is spent. Returns counts."""
    from cnnlab.data import load_dataset
    from cnnlab import versions

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create study directory {out}: {e.strerror}; choose a writable --out") from None
    with exclusive(out, ".study.lock", f"another `cnnlab study` is running on {out}; wait for it or use another --out"):
        # check everything before any run starts: data exists, every shape works, no config drift
        datasets = {}
        for vname, cfg in study.variants.items():
            if cfg.data.name not in datasets:
                datasets[cfg.data.name] = load_dataset(cfg.data.name)
            ds = datasets[cfg.data.name]
            from cnnlab.errors import SpecError
            from cnnlab.factory import check_model

            try:
                check_model(cfg.model, ds.input_shape, ds.num_classes)
            except (SpecError, ConfigError) as e:
                raise type(e)(f"variant {vname}: {e}") from None
        if study.export is not None:
            from cnnlab.deploy import require_extra

            require_extra()  # before any run: a missing extra is one line, not an error per run
        sequential = study.stopping.until_resolved
        if not sequential and _previous(out).get("stopping", {}).get("until_resolved"):
            raise ConfigError(f"{out} holds a study run with seeds until resolved; run it with --until-resolved "
                              "again (its intervals must stay sequential), or use a new --out")
        seeds = {v: list(study.seeds) for v in study.variants}
        if sequential:  # a study continued (a larger --max-seeds, or after a crash) keeps every seed it has
            for v in seeds:
                seeds[v] = sorted(set(seeds[v]) | {s for s in existing_seeds(out, v) if s < study.stopping.max_seeds})
        if study_file is not None:
            shutil.copyfile(study_file, out / ".study.toml.tmp")
            (out / ".study.toml.tmp").replace(out / "study.toml")
        t0 = time.time()
        counts = {"total": 0, "skipped": 0, "done": 0, "failed": 0, "exported": 0}
        for round_no in range(1, 10_000):
            tasks = tasks_for(study, out, command, seeds)
            for t in tasks:
                check_existing(t)
            # not key-sorted: the variants keep the study file's order, which the report follows
            atomic_write_json(out / "study.json", {**study.resolved(), "variant_seeds": seeds, "command": command,
                                                   "versions": versions()}, sort_keys=False)
            _run_round(tasks, executor, counts, first=round_no == 1)
            if not sequential:
                break
            decisions = decide_all(study.comparisons, _accuracies(tasks), sequential=True)
            add = next_round(study, seeds, decisions)
            resolved = sum(d.resolved for _, d in decisions.values())
            print(f"round {round_no}: {resolved} of {len(decisions)} comparisons resolved"
                  + (f"; next: {', '.join(f'{v} seed {seeds_text(ss)}' for v, ss in add.items())}" if add else
                     ("" if resolved == len(decisions) else f"; budget spent (max_seeds = {study.stopping.max_seeds})")),
                  flush=True)
            if not add:
                break
            for v, ss in add.items():
                seeds[v] = sorted(seeds[v] + ss)
        counts["wall_seconds"] = time.time() - t0
        if report:
            from cnnlab.report import build_report

            md, html = build_report(out)
            counts["report"] = str(html)
        return counts


def _run_round(tasks: list[Task], executor, counts: dict, first: bool) -> None:
    todo = [t for t in tasks if needs_work(t)]
    if first:
        counts["total"] = len(tasks)
        counts["skipped"] = len(tasks) - len(todo)
        if counts["skipped"]:
            print(f"{counts['skipped']} of {len(tasks)} runs already finished; {len(todo)} to run", flush=True)
    else:
        counts["total"] += len(todo)
    if not todo:
        return
    display = Display(todo, {t.label: t.config["train"]["epochs"] for t in todo})
    executor.poll = display.poll

    def on_done(task, outcome):
        counts["exported" if outcome.get("exported_only") else outcome["status"]] += 1
        display.run_done(task, outcome)

    try:
        executor.run(todo, on_done)
    finally:
        display.close()
