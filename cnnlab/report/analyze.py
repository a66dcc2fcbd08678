"""Numbers for the report, from a collected Study: per-variant summaries, curves over seeds,
comparisons with their verdicts (one family: Bonferroni, sequential when the study was), a
grid's factorial analysis, deployment figures, train/eval-mode gaps, the best variant's
confusion matrix and misclassified images. Plain data in, plain data out; render.py formats it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnnlab import stats
from cnnlab.report.collect import Run, Study, Variant, load_predictions
from cnnlab.study import MARGIN, Comparison, decide_all, seeds_text

GAP_WARN_PTS = 2.0  # warn when eval-mode test accuracy is this far below train-mode, on average
MAX_MISCLASSIFIED = 25


@dataclass
class Curve:
    epochs: list[int]
    mean: list[float]
    low: list[float]  # band: min over seeds
    high: list[float]  # band: max over seeds
    n: list[int]  # seeds contributing at each epoch


@dataclass
class VariantStats:
    name: str
    planned: int  # runs the study asked for
    finished_seeds: list[int]
    acc: dict[int, float]  # headline test accuracy per finished seed
    summary: stats.Summary
    acc_eval: dict[int, float]
    acc_train: dict[int, float]
    gap: stats.Summary  # test_accuracy_eval - test_accuracy_train over seeds having both
    train_images_gap: stats.Summary  # the same on training images
    params: int | None
    wall: dict[int, float]  # wall_seconds per finished seed
    eval_modes: list[str]
    curves: dict[str, Curve]  # metrics column -> curve over finished seeds
    log_seed: int | None  # the seed whose train.log is shown
    log: str | None
    in_shape: tuple[int, int, int] | None
    num_classes: int | None
    example: dict[str, Any] | None  # result.json "example" of log_seed's run
    example_seed: int | None

    @property
    def wall_mean(self) -> float | None:
        return float(np.mean(list(self.wall.values()))) if self.wall else None


@dataclass
class ComparisonStats:
    name: str
    comparison: Comparison
    paired: stats.Paired  # unadjusted, fixed-n: shown labelled as such
    decision: stats.Decision  # the verdict and the interval it uses
    verdict: str

    @property
    def a(self) -> str:
        return self.comparison.label_a

    @property
    def b(self) -> str:
        return self.comparison.label_b


@dataclass
class Diagnostics:
    best: str | None
    classes: int
    confusion: np.ndarray | None  # (classes, classes), rows = true, cols = predicted
    confusion_seeds: list[int]
    misclassified_seed: int | None
    misclassified: list[tuple[int, int, int]]  # (test index, true, predicted), at most 25
    n_wrong: int  # misclassified count for misclassified_seed
    n_test: int
    notes: list[str] = field(default_factory=list)  # predictions that could not be read


@dataclass
class GridStats:
    """The factorial analysis of a [grid] study in one eval mode, or why there is none."""

    mode: str  # "eval" | "train"
    values: dict[str, dict[int, float]]  # grid variant -> seed -> accuracy in that mode
    factorial: Any = None  # cnnlab.factorial.Factorial
    error: str = ""


@dataclass
class DeployStats:
    """One variant's exported runs (cnnlab.deploy's export.json): what int8 costs, over seeds."""

    variant: str
    seeds: list[int]  # the finished runs with an export.json
    fp32: stats.Summary  # test accuracy of the fp32 ONNX model (onnxruntime)
    int8: stats.Summary
    paired: stats.Paired  # int8 - fp32, by seed
    decision: stats.Decision  # equivalent within the margin, one side better, or undetermined
    verdict: str
    agreement: stats.Summary  # int8's argmax agreement with fp32, %
    figures: dict[str, float | None]  # sizes, params, MACs, latency p50/p99: medians over seeds
    cpus: str  # the CPU(s) the latencies were measured on
    notes: list[str]  # finished runs without a usable export, and why


@dataclass
class Analysis:
    variants: dict[str, VariantStats]
    comparisons: list[ComparisonStats]
    by_mode: dict[str, list[ComparisonStats]]  # "eval"/"train" -> the comparisons on that mode's accuracy
    diagnostics: Diagnostics
    warnings: list[tuple[str, float]]  # (variant, mean gap) for eval far below train mode
    finished: int
    planned: int
    grid: list[GridStats] = field(default_factory=list)  # eval mode first; empty without a [grid]
    deploy: list[DeployStats] = field(default_factory=list)  # empty when no run was exported


def _num(x: Any) -> float | None:
    if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
        return float(x)
    return None


def _by_seed(runs: list[Run], key: str) -> dict[int, float]:
    out = {}
    for r in runs:
        v = _num(r.result.get(key))
        if v is not None:
            out[r.seed] = v
    return out


def curve(runs: list[Run], column: str) -> Curve | None:
    """Mean and min-max band of one metrics column over runs, epoch by epoch."""
    per_epoch: dict[int, list[float]] = {}
    for r in runs:
        if not r.metrics or column not in r.metrics:
            continue
        for e, v in zip(r.metrics["epoch"], r.metrics[column]):
            if math.isfinite(v):
                per_epoch.setdefault(int(e), []).append(v)
    if not per_epoch:
        return None
    epochs = sorted(per_epoch)
    vals = [per_epoch[e] for e in epochs]
    return Curve(epochs, [float(np.mean(v)) for v in vals], [float(min(v)) for v in vals],
                 [float(max(v)) for v in vals], [len(v) for v in vals])


def _gap(eval_: dict[int, float], train: dict[int, float]) -> stats.Summary:
    seeds = sorted(set(eval_) & set(train))
    return stats.summarize([eval_[s] - train[s] for s in seeds])


def variant_stats(v: Variant) -> VariantStats:
    done = v.finished
    acc = {r.seed: float(r.result["test_accuracy"]) for r in done}
    acc_eval, acc_train = _by_seed(done, "test_accuracy_eval"), _by_seed(done, "test_accuracy_train")
    params = sorted({int(r.result["params"]) for r in done if _num(r.result.get("params")) is not None})
    info = v.data_info
    shape = info.get("input_shape")
    in_shape = tuple(int(x) for x in shape) if isinstance(shape, list) and len(shape) == 3 else None
    num_classes = int(info["num_classes"]) if _num(info.get("num_classes")) is not None else None
    log_run = next((r for r in done if r.log), None) or next((r for r in v.runs if r.log), None)
    ex_run = next((r for r in done if isinstance(r.result.get("example"), dict)), None)
    return VariantStats(
        name=v.name,
        planned=len(v.runs),
        finished_seeds=[r.seed for r in done],
        acc=acc,
        summary=stats.summarize(acc[s] for s in sorted(acc)),
        acc_eval=acc_eval,
        acc_train=acc_train,
        gap=_gap(acc_eval, acc_train),
        train_images_gap=_gap(_by_seed(done, "train_accuracy_eval"), _by_seed(done, "train_accuracy_train")),
        params=params[0] if params else None,
        wall=_by_seed(done, "wall_seconds"),
        eval_modes=sorted({str(r.result.get("eval_mode")) for r in done}),
        curves={c: cv for c in ("train_loss", "val_loss", "train_acc", "val_acc")
                if (cv := curve(done, c)) is not None},
        log_seed=log_run.seed if log_run else None,
        log=log_run.log if log_run else None,
        in_shape=in_shape,  # type: ignore[arg-type]
        num_classes=num_classes,
        example=ex_run.result["example"] if ex_run else None,
        example_seed=ex_run.seed if ex_run else None,
    )


def compare(study: Study, vstats: dict[str, VariantStats], key: str = "acc") -> list[ComparisonStats]:
    """The study's comparisons as one family, on one accuracy per seed: `acc` (headline),
    `acc_eval` or `acc_train`; sequential intervals when the study ran until resolved."""
    acc = {name: getattr(vs, key) for name, vs in vstats.items()}
    decided = decide_all(study.comparisons, acc, study.sequential)
    out = []
    for name, c in study.comparisons.items():
        pr, d = decided[name]
        out.append(ComparisonStats(name, c, pr, d, stats.verdict_text(c.label_a, c.label_b, d, better=c.better)))
    return out


def grid_stats(study: Study, vstats: dict[str, VariantStats]) -> list[GridStats]:
    """Main effects and two-factor interactions of a [grid] study, seed as block, in both eval modes."""
    if not study.grid or not study.cells:
        return []
    from cnnlab.errors import CnnlabError
    from cnnlab.factorial import analyze_grid

    out = []
    for mode, key in (("eval", "acc_eval"), ("train", "acc_train")):
        values = {v: getattr(vstats[v], key) for v in study.cells if v in vstats}
        g = GridStats(mode, values)
        try:
            g.factorial = analyze_grid(study.grid, study.cells, values)
        except CnnlabError as e:
            g.error = str(e)
        out.append(g)
    return out


DEPLOY_FIGURES = ("size_fp32_bytes", "size_int8_bytes", "params", "macs", "latency_torch_p50_us",
                  "latency_torch_p99_us", "latency_fp32_p50_us", "latency_fp32_p99_us", "latency_int8_p50_us",
                  "latency_int8_p99_us")


def deployment(study: Study) -> list[DeployStats]:
    """int8 against fp32 per variant over the exported seeds, as one family of comparisons
    (sequential intervals when the study ran until resolved: its seeds were chosen by looking)."""
    per = {}
    for name, v in study.variants.items():
        done = v.finished
        exported = [r for r in done if r.export and _num(r.export.get("test_accuracy_int8")) is not None]
        if not exported and not any(r.export for r in done):
            continue
        notes = [f"seed {r.seed}: {r.export_note or 'no int8 accuracy in export.json'}"
                 for r in done if r not in exported]
        per[name] = (exported, notes)
    if not per:
        return []
    m = len(per)
    out = []
    for name, (runs, notes) in per.items():
        fp32 = {r.seed: float(r.export["test_accuracy_fp32"]) for r in runs}
        int8 = {r.seed: float(r.export["test_accuracy_int8"]) for r in runs}
        pr = stats.paired(int8, fp32)
        d = stats.decide(pr, MARGIN, m=m, sequential=study.sequential)
        figures = {}
        for key in DEPLOY_FIGURES:
            vals = [x for r in runs if (x := _num(r.export.get(key))) is not None]
            figures[key] = float(np.median(vals)) if vals else None
        agree = [x for r in runs if (x := _num(r.export.get("argmax_agreement_int8"))) is not None]
        out.append(DeployStats(
            name, [r.seed for r in runs], stats.summarize(fp32.values()), stats.summarize(int8.values()), pr, d,
            stats.verdict_text("int8", "fp32", d), stats.summarize(agree), figures,
            ", ".join(sorted({str(r.export.get("cpu_model")) for r in runs})) or "not recorded", notes))
    return out


def _pred_key(run: Run) -> str:
    return "pred_train" if run.result.get("eval_mode") == "train" else "pred_eval"


def diagnostics(study: Study, vstats: dict[str, VariantStats]) -> Diagnostics:
    ranked = sorted((vs for vs in vstats.values() if vs.summary.n > 0),
                    key=lambda vs: (-vs.summary.mean, vs.name))
    if not ranked:
        return Diagnostics(None, 0, None, [], None, [], 0, 0)
    best = ranked[0]
    classes = best.num_classes or 0
    conf = None
    seeds, notes = [], []
    mis: list[tuple[int, int, int]] = []
    mis_seed, n_wrong, n_test = None, 0, 0
    for run in study.variants[best.name].finished:
        arrays, why = load_predictions(run)
        if arrays is None:
            notes.append(why)
            continue
        labels = arrays["labels"].astype(np.int64).ravel()
        pred = arrays[_pred_key(run)].astype(np.int64).ravel()
        if labels.shape != pred.shape:
            notes.append(f"{run.variant} seed {run.seed}: labels and predictions differ in length")
            continue
        k = max(classes, int(labels.max(initial=0)) + 1, int(pred.max(initial=0)) + 1)
        if conf is None or conf.shape[0] < k:
            grown = np.zeros((k, k), dtype=np.int64)
            if conf is not None:
                grown[: conf.shape[0], : conf.shape[1]] = conf
            conf = grown
        np.add.at(conf, (labels, pred), 1)
        seeds.append(run.seed)
        if mis_seed is None:
            wrong = np.nonzero(labels != pred)[0]
            mis_seed, n_wrong, n_test = run.seed, int(wrong.size), int(labels.size)
            mis = [(int(i), int(labels[i]), int(pred[i])) for i in wrong[:MAX_MISCLASSIFIED]]
    return Diagnostics(best.name, conf.shape[0] if conf is not None else classes, conf, seeds,
                       mis_seed, mis, n_wrong, n_test, notes)


def analyze(study: Study) -> Analysis:
    vstats = {name: variant_stats(v) for name, v in study.variants.items()}
    warnings = [(vs.name, vs.gap.mean) for vs in vstats.values()
                if vs.gap.n > 0 and vs.gap.mean < -GAP_WARN_PTS]
    return Analysis(
        variants=vstats,
        comparisons=compare(study, vstats),
        by_mode={"eval": compare(study, vstats, "acc_eval"), "train": compare(study, vstats, "acc_train")},
        diagnostics=diagnostics(study, vstats),
        warnings=warnings,
        finished=sum(len(vs.finished_seeds) for vs in vstats.values()),
        planned=sum(vs.planned for vs in vstats.values()),
        grid=grid_stats(study, vstats),
        deploy=deployment(study),
    )


def distinct(values) -> str:
    """The distinct values, sorted and joined: what a protocol line says of the runs."""
    vals = {v for v in values if v is not None and v != ""}
    try:
        ordered = sorted(vals)
    except TypeError:
        ordered = sorted(vals, key=str)
    return ", ".join(str(v) for v in ordered) or "not recorded"


# ---------------------------------------------------------------------------- protocol

def protocol(study: Study, an: Analysis) -> list[tuple[str, str]]:
    """The facts every number and figure depends on, as (label, value) pairs."""
    done = [r for r in study.runs if r.finished]
    data = [r.result.get("data") if isinstance(r.result.get("data"), dict) else {} for r in done]
    cfg = [v.config for v in study.variants.values()]
    section = lambda c, s: c.get(s) if isinstance(c.get(s), dict) else {}  # noqa: E731
    splits = distinct(f"{d.get('n_train')} train / {d.get('n_val')} validation / {d.get('n_test')} test"
                       for d in data if d)
    modes = distinct(r.result.get("eval_mode") for r in done)
    mode_words = {"eval": "eval (model.eval(): dropout off, BatchNorm running statistics)",
                  "train": "train (the lab's way: dropout and BatchNorm left in training mode)"}
    return [
        ("dataset", distinct(section(c, "data").get("name") for c in cfg)),
        ("data source", distinct(d.get("source") for d in data)),
        ("split", splits),
        ("epochs", distinct(section(c, "train").get("epochs") for c in cfg)),
        ("batch size", distinct(section(c, "train").get("batch_size") for c in cfg)),
        ("optimizer", "Adam, lr " + distinct(section(c, "train").get("lr") for c in cfg)),
        ("seeds", f"{seeds_text(study.seeds)} ({an.finished} of {an.planned} runs finished)"),
        ("device", distinct(r.result.get("device") for r in done)),
        ("kernels", distinct(r.result.get("kernels") for r in done)),  # float rounding depends on them
        ("eval mode", mode_words.get(modes, modes)),
    ]


def protocol_line(study: Study, an: Analysis) -> str:
    p = dict(protocol(study, an))
    return (f"Protocol: {p['dataset']}; split {p['split']}; {p['epochs']} epochs; seeds {p['seeds']}; "
            f"device {p['device']}; eval mode {distinct(r.result.get('eval_mode') for r in study.runs if r.finished)}.")
