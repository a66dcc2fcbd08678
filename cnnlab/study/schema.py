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
run starts (runner.py). Runs go to executors (executors.py, ray.py), whose workers train
them (worker.py); a finished run is never trained again.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from cnnlab.config import RunConfig, config_from_dict
from cnnlab.errors import ConfigError

MARGIN = 0.5  # the default equivalence margin, in percentage points

STUDY_KEYS = ("name", "seeds", "base", "variants", "grid", "comparisons", "margin", "stopping", "export")
STOPPING_KEYS = ("until_resolved", "max_seeds", "step")
EXPORT_KEYS = ("int8", "calibration", "c_header")  # cnnlab.deploy.export_run's options
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=,-]*$")
SECTION_KEYS = {"data": ("name", "val_size", "limit", "normalize"),
                "model": ("preset", "bn", "conv_dropout", "fc_dropout"),
                "train": ("epochs", "batch_size", "lr", "eval_mode", "device", "threads")}


@dataclass(frozen=True)
class Comparison:
    """A - B over matched seeds. Each side is one variant, or the difference of two (an
    interaction contrast: (A1 - A2) - (B1 - B2), still one number per seed)."""

    a: tuple[str, ...]
    b: tuple[str, ...]
    margin: float = MARGIN

    @property
    def variants(self) -> tuple[str, ...]:
        return self.a + self.b

    @staticmethod
    def side_label(side: tuple[str, ...]) -> str:
        return side[0] if len(side) == 1 else f"({side[0]} − {side[1]})"

    @property
    def better(self) -> str:
        """How a verdict says a side won: a variant is "better", a difference "larger"."""
        return "better" if len(self.a) == 1 else "larger"

    @property
    def label_a(self) -> str:
        return self.side_label(self.a)

    @property
    def label_b(self) -> str:
        return self.side_label(self.b)

    def sides(self, acc: dict[str, dict[int, float]]) -> tuple[dict[int, float], dict[int, float]]:
        """Each side's value per seed from per-variant accuracies."""
        from cnnlab.stats import contrast

        def side(names):
            return dict(acc.get(names[0], {})) if len(names) == 1 else contrast([acc.get(n, {}) for n in names], [1, -1])

        return side(self.a), side(self.b)

    def to_json(self) -> dict:
        def one(side):
            return side[0] if len(side) == 1 else list(side)

        return {"a": one(self.a), "b": one(self.b), "margin": self.margin}


@dataclass(frozen=True)
class Stopping:
    until_resolved: bool = False
    max_seeds: int = 20  # seeds 0..max_seeds-1 at most, per variant
    step: int = 1  # seeds added per round to the variants an unresolved comparison needs


@dataclass
class Study:
    name: str
    seeds: list[int]  # a fixed study's seeds; the first round of a sequential one
    variants: dict[str, RunConfig]
    comparisons: dict[str, Comparison] = field(default_factory=dict)
    stopping: Stopping = field(default_factory=Stopping)
    grid: dict[str, list] = field(default_factory=dict)  # factor -> levels
    cells: dict[str, dict[str, Any]] = field(default_factory=dict)  # grid variant -> {factor: level}
    export: dict[str, Any] | None = None  # export every finished run (cnnlab.deploy), with these options

    def resolved(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seeds": self.seeds,
            "variants": {k: v.to_dict() for k, v in self.variants.items()},
            "comparisons": {k: c.to_json() for k, c in self.comparisons.items()},
            "stopping": dataclasses.asdict(self.stopping),
            "grid": self.grid,
            "cells": self.cells,
            "export": self.export,
        }


def _merge(base: dict, diff: dict) -> dict:
    """base with diff's keys, tables merged key by key at every depth (so a variant's
    model.args.width changes that one argument); anything else replaced."""
    out = copy.deepcopy(base)
    for key, value in diff.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _margin(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 100:
        raise ConfigError(f"{where}: margin must be a number of percentage points in [0, 100), got {value!r}")
    return float(value)


def comparison_from(value: Any, where: str, variants, margin: float = MARGIN) -> Comparison:
    """One comparison from the study file or study.json:
    [A, B]; [[A1, A2], [B1, B2]] for (A1 - A2) - (B1 - B2); or {a = ..., b = ..., margin = ...}."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"a", "b", "margin"})
        if unknown or "a" not in value or "b" not in value:
            raise ConfigError(f"{where}: a comparison table has keys a, b and optionally margin, got {sorted(value)}")
        a, b = value["a"], value["b"]
        margin = _margin(value.get("margin", margin), where)
    elif isinstance(value, list) and len(value) == 2:
        a, b = value
    else:
        raise ConfigError(f"{where}: must be [variant_a, variant_b], [[A1, A2], [B1, B2]] or "
                          f"{{a = ..., b = ..., margin = ...}}, got {value!r}")
    sides = []
    for side in (a, b):
        names = (side,) if isinstance(side, str) else tuple(side) if isinstance(side, list) else ()
        if not (len(names) in (1, 2) and all(isinstance(n, str) for n in names)):
            raise ConfigError(f"{where}: each side is a variant name or a pair [A, B] meaning A − B, got {side!r}")
        missing = [n for n in names if n not in variants]
        if missing:
            raise ConfigError(f"{where}: unknown variant(s) {', '.join(missing)}; variants are: {', '.join(variants)}")
        if len(names) == 2 and names[0] == names[1]:
            raise ConfigError(f"{where}: {names[0]} − {names[0]} is zero")
        sides.append(names)
    if len(sides[0]) != len(sides[1]):
        raise ConfigError(f"{where}: compare a variant with a variant, or a difference with a difference")
    if sides[0] == sides[1]:
        raise ConfigError(f"{where}: compares {Comparison.side_label(sides[0])} with itself")
    return Comparison(sides[0], sides[1], margin)


def format_level(level: Any) -> str:
    """A grid level as variant names and labels write it: true/false for bools (as in TOML)."""
    return ("true" if level else "false") if isinstance(level, bool) else str(level)


def _factor_key(factor: str, where: str) -> tuple[str, ...]:
    """'bn' -> ('model', 'bn'); 'train.lr' -> ('train', 'lr'); a factory's argument:
    'args.width' or 'model.args.width' -> ('model', 'args', 'width')."""
    parts = factor.split(".")
    if parts[:-1] in (["args"], ["model", "args"]) and parts[-1].isidentifier():
        return ("model", "args", parts[-1])
    if "." in factor:
        section, key = factor.split(".", 1)
        if key in SECTION_KEYS.get(section, ()):
            return section, key
    else:
        hits = [sec for sec, keys in SECTION_KEYS.items() if factor in keys]
        if len(hits) == 1:
            return hits[0], factor
    valid = ", ".join(k for keys in SECTION_KEYS.values() for k in keys)
    raise ConfigError(f"{where}: unknown factor {factor!r}; a factor is a configuration key ({valid}), "
                      "section.key, or a model factory's argument as args.NAME")


def expand_grid(grid: Any, base: dict, where: str) -> tuple[dict[str, dict], dict[str, list], dict[str, dict]]:
    """[grid] factor = [levels] -> (variant -> run config table, factor -> levels, variant -> levels),
    the cartesian product in the order the factors and levels are written; a variant is named
    by its levels, e.g. "bn=true,conv_dropout=0.25"."""
    import itertools

    if not isinstance(grid, dict) or len(grid) < 2:
        raise ConfigError(f"{where}: [grid] needs at least two factors, e.g. bn = [true, false] and "
                          "conv_dropout = [0.25, 0.75]")
    factors, keys = {}, {}
    for factor, levels in grid.items():
        keys[factor] = _factor_key(factor, f"{where}: grid.{factor}")
        if (not isinstance(levels, list) or len(levels) < 2
                or not all(isinstance(x, (bool, int, float, str)) for x in levels)):
            raise ConfigError(f"{where}: grid.{factor} must list two or more levels, got {levels!r}")
        if len({format_level(x) for x in levels}) != len(levels):
            raise ConfigError(f"{where}: grid.{factor} has duplicate levels: {levels!r}")
        factors[factor] = list(levels)
    tables, cells = {}, {}
    for combo in itertools.product(*factors.values()):
        levels = dict(zip(factors, combo))
        name = ",".join(f"{f.split('.')[-1]}={format_level(x)}" for f, x in levels.items())
        diff: dict[str, dict] = {}
        for f, x in levels.items():
            *tables_path, key = keys[f]
            table = diff
            for part in tables_path:
                table = table.setdefault(part, {})
            table[key] = x
        tables[name] = _merge(base, diff)
        cells[name] = levels
    return tables, factors, cells


def seeds_text(seeds) -> str:
    """[0, 1, 2, 5] -> '0–2, 5'."""
    seeds = sorted(seeds)
    parts, i = [], 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if j == i else f"{seeds[i]}, {seeds[j]}" if j == i + 1
                     else f"{seeds[i]}–{seeds[j]}")
        i = j + 1
    return ", ".join(parts) or "none"


def _int(value: Any, where: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{where} must be an integer >= {low}, got {value!r}")
    return value


def _table(data: Any, where: str, name: str, keys: tuple[str, ...]) -> dict:
    """A study file's [name] table, or a one-line error for another type or an unknown key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: [{name}] must be a table")
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise ConfigError(f"{where}: {name}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(keys)}")
    return data


def stopping_from(data: Any, where: str) -> Stopping:
    _table(data, where, "stopping", STOPPING_KEYS)
    until = data.get("until_resolved", False)
    if not isinstance(until, bool):
        raise ConfigError(f"{where}: stopping.until_resolved must be true or false, got {until!r}")
    return Stopping(until, _int(data.get("max_seeds", 20), f"{where}: stopping.max_seeds", 2),
                    _int(data.get("step", 1), f"{where}: stopping.step", 1))


def export_from(data: Any, where: str) -> dict:
    """[export] int8 = true, calibration = 500, c_header = false (cnnlab.deploy.export_run's options)."""
    _table(data, where, "export", EXPORT_KEYS)
    out = {"int8": data.get("int8", True), "calibration": data.get("calibration", 500),
           "c_header": data.get("c_header", False)}
    for key in ("int8", "c_header"):
        if not isinstance(out[key], bool):
            raise ConfigError(f"{where}: export.{key} must be true or false, got {out[key]!r}")
    _int(out["calibration"], f"{where}: export.calibration", 1)
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
    tables: dict[str, dict] = {}
    factors, cells = {}, {}
    if "grid" in data:
        tables, factors, cells = expand_grid(data["grid"], base, where)
    variants_raw = data.get("variants", {} if tables else None)
    if not isinstance(variants_raw, dict) or not (variants_raw or tables):
        raise ConfigError(f"{where}: [variants] is missing or empty; add at least one, e.g. [variants] baseline = {{}}"
                          ", or a [grid]")
    for vname, diff in variants_raw.items():
        if not NAME_RE.match(vname):
            raise ConfigError(f"{where}: variant name {vname!r} must use letters, digits, . _ - = , only")
        if not isinstance(diff, dict):
            raise ConfigError(f"{where}: variants.{vname} must be a table (a diff against [base]), got {diff!r}")
        if vname in tables:
            raise ConfigError(f"{where}: variants.{vname} has the name of a grid cell; rename it")
        tables[vname] = _merge(base, diff)
    variants = {v: config_from_dict(t, f"{where}: variants.{v}") for v, t in tables.items()}
    margin = _margin(data.get("margin", MARGIN), f"{where}: margin")
    comps_raw = data.get("comparisons", {})
    if not isinstance(comps_raw, dict):
        raise ConfigError(f"{where}: [comparisons] must be a table of name = [variant_a, variant_b]")
    comparisons = {c: comparison_from(v, f"{where}: comparisons.{c}", variants, margin) for c, v in comps_raw.items()}
    stopping = stopping_from(data.get("stopping", {}), where)
    export = export_from(data["export"], where) if "export" in data else None
    study = Study(name, seeds, variants, comparisons, stopping, factors, cells, export)
    check_stopping(study, where)
    return study


def check_stopping(study: Study, where: str) -> None:
    st = study.stopping
    if not st.until_resolved:
        return
    if not study.comparisons:
        raise ConfigError(f"{where}: seeds until resolved needs [comparisons] to resolve")
    if len(study.seeds) < 2:
        raise ConfigError(f"{where}: seeds until resolved starts with at least 2 seeds, got {study.seeds}")
    if max(study.seeds) >= st.max_seeds:
        raise ConfigError(f"{where}: the first round's seeds {study.seeds} exceed the budget of "
                          f"max_seeds = {st.max_seeds} (seeds 0..{st.max_seeds - 1})")


def load_study(path) -> Study:
    from cnnlab.fsutil import read_toml

    return study_from_dict(read_toml(path, ConfigError, "study TOML file"), str(path))


def override(study: Study, seeds: int | None = None, epochs: int | None = None, limit: int | None = None,
             device: str | None = None, data: str | None = None, until_resolved: bool | None = None,
             max_seeds: int | None = None, export: bool | None = None) -> Study:
    """Apply command-line overrides to every variant, to the stopping rule and to exporting."""
    from cnnlab.config import validate

    if export and study.export is None:
        study.export = export_from({}, "--export")

    if seeds is not None:
        if seeds < 1:
            raise ConfigError(f"--seeds must be >= 1, got {seeds}")
        study.seeds = list(range(seeds))
    if max_seeds is not None and max_seeds < 2:
        raise ConfigError(f"--max-seeds must be >= 2, got {max_seeds}")
    if until_resolved or max_seeds is not None:
        study.stopping = dataclasses.replace(
            study.stopping, until_resolved=bool(until_resolved or study.stopping.until_resolved),
            max_seeds=max_seeds if max_seeds is not None else study.stopping.max_seeds)
    check_stopping(study, "command line")
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


def decide_all(comparisons: dict[str, Comparison], acc: dict[str, dict[int, float]], sequential: bool) -> dict:
    """name -> (stats.Paired, stats.Decision) for every comparison, as one family (Bonferroni
    over all of them), from accuracies per variant and seed."""
    from cnnlab import stats

    out = {}
    for name, c in comparisons.items():
        pr = stats.paired(*c.sides(acc))
        out[name] = (pr, stats.decide(pr, c.margin, m=len(comparisons), sequential=sequential))
    return out


def next_round(study: Study, seeds: dict[str, list[int]], decisions: dict) -> dict[str, list[int]]:
    """Seeds to add per variant after a round of a sequential study: `step` more matched seeds
    for every variant an unresolved comparison needs, within seeds 0..max_seeds-1. Empty when
    every comparison is resolved or its budget is spent."""
    add: dict[str, list[int]] = {}
    for name, c in study.comparisons.items():
        if decisions[name][1].resolved:
            continue
        # its next `step` seeds that some variant of it has not tried; one another comparison
        # already asked for this round counts for it too
        free = [s for s in range(study.stopping.max_seeds) if any(s not in seeds[v] for v in c.variants)]
        for s in free[: study.stopping.step]:
            for v in c.variants:
                if s not in seeds[v] and s not in add.get(v, []):
                    add.setdefault(v, []).append(s)
    return {v: sorted(ss) for v, ss in add.items()}
