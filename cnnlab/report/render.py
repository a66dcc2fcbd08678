"""Format the analysis as a document: a list of blocks rendered to Markdown and to one
self-contained HTML file (images as data: URIs, inline CSS, no scripts, every text escaped).

Nothing is computed here beyond formatting: numbers come from analyze.py (which uses
cnnlab.stats), figures from figures.py. Output is deterministic: iteration follows
study.json's order and sorted seeds, and nothing depends on the clock or on randomness.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from cnnlab import stats
from cnnlab.report.analyze import GAP_WARN_PTS, Analysis, ComparisonStats, VariantStats, distinct, protocol
from cnnlab.report.collect import Study
from cnnlab.study import format_level, seeds_text

if TYPE_CHECKING:
    from cnnlab.report.figures import Fig, Figures

FILES_DIR = "report_files"


# ---------------------------------------------------------------------------- blocks

@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Callout:
    kind: str  # "warning" | "note"
    text: str


@dataclass(frozen=True)
class Code:
    text: str


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    align: str  # one of "l", "r" per column


@dataclass(frozen=True)
class Image:
    name: str  # file name under report_files/
    alt: str
    caption: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str) -> Table:
    return Table(tuple(header), tuple(tuple(str(c) for c in r) for r in rows), align)


# ---------------------------------------------------------------------------- numbers

DASH = "—"


def _ok(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def num(x, digits: int = 2) -> str:
    return f"{x:.{digits}f}" if _ok(x) else DASH


def signed(x, digits: int = 2) -> str:
    return f"{x:+.{digits}f}" if _ok(x) else DASH


def interval(lo, hi, n: int, digits: int = 2) -> str:
    if n == 1:
        return "1 seed: no interval"
    if not (_ok(lo) and _ok(hi)):
        return DASH
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]"


def sd_text(s: stats.Summary) -> str:
    return "n/a (1 seed)" if s.n == 1 else num(s.std)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


# ---------------------------------------------------------------------------- tables

def not_finished(study: Study, variant: str) -> str:
    counts: dict[str, int] = {}
    for r in study.variants[variant].runs:
        if not r.finished:
            counts[r.status] = counts.get(r.status, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "0"


def variants_table(study: Study, an: Analysis) -> Table:
    rows = []
    for name, vs in an.variants.items():
        s = vs.summary
        rows.append((name, s.n, not_finished(study, name), num(s.mean), sd_text(s),
                     interval(s.ci_low, s.ci_high, s.n), f"{vs.params:,}" if vs.params is not None else DASH,
                     num(vs.wall_mean, 1)))
    return table(("variant", "n", "not finished", "test acc mean (%)", "sd", "95% CI", "params",
                  "mean wall time (s)"), rows, "lrlrrrrr")


KIND_WORDS = {"a": "A better", "b": "B better", "equivalent": "equivalent", "undetermined": "undetermined"}


def _ci(d: stats.Decision) -> str:
    return stats.interval_text(d.ci_low, d.ci_high)


def verdict_table(an: Analysis) -> Table:
    """The report's lead: each question, its verdict, the interval it rests on, the seeds it took."""
    rows = [(c.name, c.a, c.b, stats.verdict_text(c.a, c.b, c.decision, detail=False, better=c.comparison.better),
             signed(c.decision.diff),
             _ci(c.decision), c.decision.n)
            for c in an.comparisons]
    level = an.comparisons[0].decision.level if an.comparisons else 0.95
    return table(("question", "A", "B", "verdict", "A − B (pts)", f"{level:.2%} interval".replace(".00%", "%"),
                  "seeds"), rows, "llllrrr")


def comparisons_overview(an: Analysis) -> Table:
    rows = [(c.name, c.a, c.b, signed(c.decision.diff), _ci(c.decision), stats.format_p(c.decision.p),
             KIND_WORDS[c.decision.kind], c.paired.n, interval(c.paired.ci_low, c.paired.ci_high, c.paired.n),
             stats.format_p(c.paired.p))
            for c in an.comparisons]
    return table(("comparison", "A", "B", "A − B (pts)", "interval (adjusted)", "adjusted p", "verdict",
                  "matched seeds", "unadjusted fixed-n 95% CI", "unadjusted p"), rows, "lllrrrlrrr")


def comparisons_by_mode(an: Analysis) -> Table:
    def cell(c: ComparisonStats) -> tuple[str, str]:
        return f"{signed(c.decision.diff)} {_ci(c.decision)}", f"{KIND_WORDS[c.decision.kind]} ({c.decision.n})"

    rows = [(e.name, e.a, e.b, *cell(e), *cell(t)) for e, t in zip(an.by_mode["eval"], an.by_mode["train"])]
    return table(("comparison", "A", "B", "eval mode: A − B [interval]", "verdict (seeds)",
                  "train mode (lab's way): A − B [interval]", "verdict (seeds)"), rows, "lllrlrl")


def comparison_table(c: ComparisonStats, an: Analysis) -> Table:
    pr, d = c.paired, c.decision
    rows = [(f"A = {v}: test accuracy", an.variants[v].summary.describe()) for v in c.comparison.a]
    rows += [(f"B = {v}: test accuracy", an.variants[v].summary.describe()) for v in c.comparison.b]
    matched = f"{pr.n} ({seeds_text(pr.seeds)})" if pr.n else "0"
    dz = DASH if not (isinstance(pr.effect_size, float) and not math.isnan(pr.effect_size)) else (
        "∞ (identical differences)" if math.isinf(pr.effect_size) else f"{pr.effect_size:.2f}")
    rows += [
        ("matched seeds (finished on every side)", matched),
        ("paired difference A − B", f"{signed(pr.mean_diff)} pts"),
        (f"interval the verdict uses: {d.method}", _ci(d)),
        ("adjusted p (agrees with that interval)", stats.format_p(d.p)),
        ("equivalence margin", f"±{d.margin:g} pts"),
        ("unadjusted fixed-n 95% t-interval (for reference only)", interval(pr.ci_low, pr.ci_high, pr.n)),
        ("unadjusted paired t-test p (for reference only)", stats.format_p(pr.p)),
        ("sd of the differences", "n/a (1 seed)" if pr.n == 1 else num(pr.sd_diff)),
        ("effect size dz (mean / sd of differences)", dz),
        ("verdict", c.verdict),
    ]
    return table(("quantity", "value"), rows, "ll")


def comparison_seeds_table(study: Study, c: ComparisonStats, an: Analysis) -> Table:
    status = {(r.variant, r.seed): r.status for r in study.runs}
    acc = {v: an.variants[v].acc for v in c.comparison.variants}
    side_a, side_b = c.comparison.sides(acc)

    def cell(side: tuple[str, ...], values: dict[int, float], seed: int) -> str:
        if seed in values:
            return num(values[seed])
        if len(side) == 1:
            return status.get((side[0], seed), "missing")
        return ", ".join(f"{v}: {status.get((v, seed), 'missing')}" for v in side if seed not in acc[v])

    seeds = sorted({r.seed for v in c.comparison.variants for r in study.variants[v].runs})
    rows = [(seed, cell(c.comparison.a, side_a, seed), cell(c.comparison.b, side_b, seed),
             signed(side_a[seed] - side_b[seed]) if seed in side_a and seed in side_b else "not paired")
            for seed in seeds]
    return table(("seed", f"A = {c.a} (%)", f"B = {c.b} (%)", "A − B (pts)"), rows, "rrrr")


def gap_table(an: Analysis) -> Table:
    rows = []
    for name, vs in an.variants.items():
        seeds = sorted(set(vs.acc_eval) & set(vs.acc_train))
        tr = stats.summarize(vs.acc_train[s] for s in seeds)
        ev = stats.summarize(vs.acc_eval[s] for s in seeds)
        g, gt = vs.gap, vs.train_images_gap
        rows.append((name, g.n, num(tr.mean), num(ev.mean), signed(g.mean), interval(g.ci_low, g.ci_high, g.n),
                     signed(gt.mean) if gt.n else DASH))
    return table(("variant", "n", "test acc, train mode (lab's way, %)", "test acc, eval mode (%)",
                  "eval − train (pts)", "95% CI", "eval − train on training images (pts)"), rows, "lrrrrrr")


# ---------------------------------------------------------------------------- document

def _name(names: Sequence[str], i: int) -> str:
    return names[i] if 0 <= i < len(names) else str(i)


def _fig(fig: "Fig | None") -> list:
    return [Image(fig.name, fig.alt, fig.caption)] if fig else []


def document(study: Study, an: Analysis, figs: "Figures", summaries: dict[str, str]) -> list:
    """The whole report as blocks. `summaries`: variant -> model summary text (or a note)."""
    out: list = [Heading(1, f"Study report: {study.name}")]
    out.append(Para("Everything below is read from the results stored in this directory; nothing was "
                    "trained or re-evaluated to write it. Accuracies are in %, differences in percentage "
                    "points (pts). A variant's interval is the 95% t-interval over its seeds; a comparison's is "
                    "the one its verdict uses (see Verdicts). Every number says how many seeds (n) it rests on."))
    out.append(table(("protocol", ""), protocol(study, an), "ll"))
    unfinished = [r for r in study.runs if not r.finished]
    if unfinished:
        out.append(Callout("warning", f"{an.planned - an.finished} of {an.planned} runs did not finish; "
                           "statistics use finished runs only: "
                           + "; ".join(f"{r.variant} seed {r.seed}: {r.status} ({r.reason})" for r in unfinished)))
    modes = {r.result.get("eval_mode") for r in study.runs if r.finished}
    if len(modes) > 1:
        out.append(Callout("warning", "runs use different headline eval modes "
                           f"({distinct(modes)}); their test accuracies are not directly comparable"))
    out += _verdicts(study, an)
    out += _factorial(study, an, figs)
    out += _overview(study, an)
    out += _comparisons(study, an, figs)
    out += _deployment(study, an, figs)
    out += _variants(study, an, figs, summaries)
    out += _diagnostics(study, an, figs)
    out += _reproducibility(study, an)
    return out


def _overview(study: Study, an: Analysis) -> list:
    out: list = [Heading(2, "Overview")]
    out.append(Para(f"Test accuracy in the headline eval mode, per variant, over finished seeds. "
                    f"n adds up to {an.finished} finished runs of {an.planned}."))
    out.append(variants_table(study, an))
    return out


METHOD_SEQUENTIAL = (
    "How to read the verdicts. Seeds were added in rounds, and after each round every comparison was "
    "checked; a comparison stopped getting seeds once it was resolved. Looking again and again would make "
    "an ordinary confidence interval lie (keep looking and a 95% interval will sooner or later miss), so "
    "each interval here is an anytime-valid confidence sequence: it stays right with the stated "
    "probability however many times it is looked at and whenever the study stops. It comes from the "
    "e-value of the safe t-test (Grünwald, de Heide & Koolen, \"Safe testing\", JRSS B 2024; Pérez-Ortiz "
    "et al., Ann. Statist. 2024). It is wider than a fixed-n interval, which is the price of stopping early. ")
METHOD_FIXED = (
    "How to read the verdicts. The number of seeds was fixed before the study ran, and each interval is "
    "the paired t-interval over the seeds both sides finished. ")
METHOD_COMMON = (
    "Because the study asks {m} questions at once, each interval has confidence {level} (Bonferroni), so "
    "that all of them hold together with at least 95% probability. A verdict reads the interval: above 0, "
    "A is better; below 0, B is better; inside ±margin, the two are equivalent for practical purposes; "
    "otherwise the seeds are not enough to say, and the study says about how many more would be.")


def _verdicts(study: Study, an: Analysis) -> list:
    out: list = [Heading(2, "Verdicts")]
    if not an.comparisons:
        return out + [Para("The study defines no comparisons.")]
    out.append(verdict_table(an))
    d0 = an.comparisons[0].decision
    open_ = [c for c in an.comparisons if not c.decision.resolved]
    if study.sequential:
        budget = study.stopping.max_seeds
        if not open_:
            out.append(Para(f"Seeds until resolved: every comparison is resolved (budget: at most {budget} seeds "
                            "per variant)."))
        else:
            out.append(Callout("note", f"Seeds until resolved: the budget of {budget} seeds per variant is spent "
                               f"(or its runs failed) with {_plural(len(open_), 'comparison')} still undetermined: "
                               + ", ".join(c.name for c in open_) + ". Raise --max-seeds to continue; finished runs "
                               "are kept."))
    out.append(Para((METHOD_SEQUENTIAL if study.sequential else METHOD_FIXED)
                    + METHOD_COMMON.format(m=d0.m, level=f"{d0.level:.2%}".replace(".00%", "%"))))
    return out


def _factorial(study: Study, an: Analysis, figs: "Figures") -> list:
    if not an.grid:
        return []
    factors = ", ".join(f"{f} ({', '.join(format_level(x) for x in levels)})" for f, levels in study.grid.items())
    out: list = [Heading(2, "Factorial analysis"), Para(
        f"The grid crosses {factors}. Each eval mode gets a two-way analysis of its accuracies with seed as a "
        "block (a seed fixes the split and the initial weights of every cell): main effects and every "
        "two-factor interaction, tested with heteroscedasticity-robust (HC3) errors, because the cells' "
        "spreads differ a lot. An interaction means one factor's effect depends on the level of the other."
        + (" These tests are fixed-n analyses of the seeds the sequential study took; the verdicts above, "
           "not these p-values, carry the error control of seeds until resolved." if study.sequential else ""))]
    for g in an.grid:
        out.append(Heading(3, f"{g.mode} mode" + (" (model.eval())" if g.mode == "eval" else " (the lab's way)")))
        fac = g.factorial
        if fac is None:
            out.append(Callout("note", f"No factorial analysis in {g.mode} mode: {g.error}"))
            continue
        out.append(Bullets(tuple(t.verdict for t in fac.terms)))
        out.append(table(("term", "F", "df", f"{'robust ' if fac.robust != 'classical' else ''}p"),
                         [(t.name, num(t.stat), f"{t.df_num}, {t.df_den}", stats.format_p(t.p))
                          for t in fac.terms], "lrrr"))
        out.append(table(("effect (pts)", "kind", "estimate", "95% CI", "p"),
                         [(e.label, e.kind, signed(e.estimate), interval(e.ci_low, e.ci_high, 2),
                           stats.format_p(e.p)) for e in fac.effects], "llrrr"))
        for note in fac.notes:
            out.append(Callout("note", note))
        for (mode, _, _), fig in figs.interaction.items():
            if mode == g.mode:
                out += _fig(fig)
    return out


def _kb(x) -> str:
    return DASH if x is None else f"{x / 1000:.1f}"


def _us(d: dict, kind: str) -> str:
    p50, p99 = d.get(f"latency_{kind}_p50_us"), d.get(f"latency_{kind}_p99_us")
    return DASH if p50 is None else f"{p50:.0f} / {p99:.0f}" if p99 is not None else f"{p50:.0f}"


def _deployment(study: Study, an: Analysis, figs: "Figures") -> list:
    if not an.deploy:
        return []
    d0 = an.deploy[0].decision
    out: list = [Heading(2, "Deployment"), Para(
        "Each exported run's last checkpoint as ONNX: fp32 (BatchNorm folded) and int8 (static post-training "
        "quantisation: QDQ, per-channel weights, calibrated on the run's own training images), both run with "
        "onnxruntime's CPU provider on the whole test set (cnnlab export; docs/deploy.md). int8 − fp32 is "
        f"paired by seed; its interval is the {d0.method}, and int8 is called equivalent when that interval "
        f"lies within ±{d0.margin:g} pts.")]
    out.append(table(("variant", "n", "fp32 test acc (%)", "int8 test acc (%)", "int8 − fp32 (pts)", "interval",
                      "verdict", "argmax agreement (%)"),
                     [(dv.variant, len(dv.seeds), f"{num(dv.fp32.mean)} ± {sd_text(dv.fp32)}",
                       f"{num(dv.int8.mean)} ± {sd_text(dv.int8)}", signed(dv.paired.mean_diff),
                       _ci(dv.decision), stats.verdict_text("int8", "fp32", dv.decision, detail=False),
                       num(dv.agreement.mean)) for dv in an.deploy], "lrrrrrlr"))
    out.append(Para("Size, work and latency: one image (batch 1) on one CPU thread, 100 warm-up runs then 1,000 "
                    "timed, p50 / p99 in µs, the median over the exported seeds; measured when the run was "
                    "exported, on the CPU named, and never re-measured here."))
    out.append(table(("variant", "params", "MACs", "fp32 (KB)", "int8 (KB)", "torch µs", "ORT fp32 µs",
                      "ORT int8 µs", "CPU"),
                     [(dv.variant, DASH if dv.figures["params"] is None else f"{dv.figures['params']:,.0f}",
                       DASH if dv.figures["macs"] is None else f"{dv.figures['macs']:,.0f}",
                       _kb(dv.figures["size_fp32_bytes"]), _kb(dv.figures["size_int8_bytes"]),
                       _us(dv.figures, "torch"), _us(dv.figures, "fp32"), _us(dv.figures, "int8"), dv.cpus)
                      for dv in an.deploy], "lrrrrrrrl"))
    for dv in an.deploy:
        if dv.notes:
            out.append(Callout("note", f"{dv.variant}: runs without a usable export: " + "; ".join(dv.notes)))
    out += _fig(figs.deploy)
    return out


def _comparisons(study: Study, an: Analysis, figs: "Figures") -> list:
    out: list = [Heading(2, "Comparisons")]
    if not an.comparisons:
        return out + [Para("The study defines no comparisons.")]
    out.append(Para(
        "Each comparison is paired by seed: seed s of A and seed s of B share the data split and the "
        "random streams, so only seeds finished on both sides count. A side may be a difference of two "
        "variants (an interaction: does A1 − A2 differ from B1 − B2?). The adjusted interval and p are the "
        "ones the verdict uses (see Verdicts); the unadjusted fixed-n interval and p are shown for "
        "reference only and support no verdict."))
    out.append(comparisons_overview(an))
    out.append(Para(
        "The same comparisons in both evaluation modes: eval mode (model.eval(), the correct way) and "
        "train mode (dropout and batch-statistics BatchNorm left on, as the lab evaluated). Where the two "
        "disagree, a conclusion drawn from the lab's way of evaluating does not carry over to the model "
        "as it is used."))
    out.append(comparisons_by_mode(an))
    for c in an.comparisons:
        out.append(Heading(3, f"{c.name}: {c.a} vs {c.b}"))
        out.append(comparison_table(c, an))
        out.append(comparison_seeds_table(study, c, an))
        out += _fig(figs.compare.get(c.name))
    return out


def _variants(study: Study, an: Analysis, figs: "Figures", summaries: dict[str, str]) -> list:
    out: list = [Heading(2, "Variants"),
                 Para("The lab's sections for each variant: model summary, model graph, loss and accuracy "
                      "plots, training log, test accuracy, and one test image with its prediction.")]
    for name, vs in an.variants.items():
        v = study.variants[name]
        preset = v.config.get("model", {}).get("preset") if isinstance(v.config.get("model"), dict) else None
        out.append(Heading(3, f"Variant {name}"))
        out.append(Para(f"{len(vs.finished_seeds)} of {vs.planned} seeds finished"
                        + (f" (seeds {seeds_text(vs.finished_seeds)})" if vs.finished_seeds else "")
                        + (f"; model from preset {preset}" if preset else "") + "."))
        out.append(Heading(4, f"Model summary: {name}"))
        out.append(Code(summaries[name]))
        out.append(Heading(4, f"Model graph: {name}"))
        gi = figs.graph.get(name)
        if gi is not None and gi.fig is not None:
            out += _fig(gi.fig)
        else:
            out.append(Callout("note", f"No graph image: {gi.reason if gi else 'not available'}."
                               + (" The layers, in order:" if gi and gi.rows else "")))
            if gi and gi.rows:
                out.append(table(("layer", "block", "output shape", "params"),
                                 [(r.name, r.block, "[" + ", ".join(map(str, r.out_shape)) + "]", f"{r.params:,}")
                                  for r in gi.rows], "llrr"))
        out.append(Heading(4, f"Loss plot: {name}"))
        out += _fig(figs.loss.get(name)) or [Para("No metrics.csv from a finished run.")]
        out.append(Heading(4, f"Accuracy plot: {name}"))
        out += _fig(figs.accuracy.get(name)) or [Para("No metrics.csv from a finished run.")]
        out.append(Heading(4, f"Training log: {name}" + (f", seed {vs.log_seed}" if vs.log_seed is not None else "")))
        if vs.log:
            first = next((r for r in v.runs if r.seed == vs.log_seed), None)
            which = "the first finished seed" if first and first.finished else "an unfinished run (no seed finished)"
            out.append(Para(f"train.log of seed {vs.log_seed}, {which}:"))
            out.append(Code(vs.log.rstrip("\n")))
        else:
            out.append(Para("No train.log found."))
        out.append(Heading(4, f"Test accuracy: {name}"))
        out += _test_accuracy(study, vs)
        out.append(Heading(4, f"Example prediction: {name}"))
        out += _example(vs, figs)
    return out


def _test_accuracy(study: Study, vs: VariantStats) -> list:
    mode = distinct(vs.eval_modes)
    out: list = [Para(f"Test accuracy ({mode} mode): {vs.summary.describe()}.")]
    rows = []
    for r in study.variants[vs.name].runs:
        res = r.result or {}
        if r.finished:
            rows.append((r.seed, "done", num(res.get("test_accuracy")), num(res.get("test_accuracy_eval")),
                         num(res.get("test_accuracy_train")), str(res.get("best_epoch", DASH)),
                         num(res.get("best_val_acc")), num(res.get("wall_seconds"), 1)))
        else:
            rows.append((r.seed, f"{r.status}: {r.reason}", DASH, DASH, DASH, DASH, DASH,
                         num(res.get("wall_seconds"), 1)))
    out.append(table(("seed", "status", "test acc (%)", "eval mode (%)", "train mode (%)", "best epoch",
                      "best val acc (%)", "wall time (s)"), rows, "rlrrrrrr"))
    return out


def _example(vs: VariantStats, figs: "Figures") -> list:
    ex = vs.example
    if ex is None:
        return [Para("No finished run records an example prediction.")]
    names = figs.variant_class_names.get(vs.name, [])
    try:
        top = ", ".join(f"{_name(names, int(c))}: {float(p):.3f}" for c, p in ex.get("top_k", []))
        label, pred = _name(names, int(ex["label"])), _name(names, int(ex["predicted"]))
    except (KeyError, TypeError, ValueError):
        return [Callout("note", f"result.json `example` of seed {vs.example_seed} is incomplete: {ex!r}")]
    out: list = [Para(f"Test image #{ex.get('index')} (seed {vs.example_seed}): true label {label}, "
                      f"predicted {pred}" + (f"; top-k probabilities {top}" if top else "") + ".")]
    note = figs.example_note.get(vs.name)
    if note:
        out.append(Callout("note", note))
    return out + _fig(figs.example.get(vs.name))


def _diagnostics(study: Study, an: Analysis, figs: "Figures") -> list:
    d = an.diagnostics
    out: list = [Heading(2, "Diagnostics")]
    if d.best is None:
        out.append(Para("No finished runs: nothing to diagnose."))
    else:
        best = an.variants[d.best]
        out.append(Para(f"Best variant by mean test accuracy: {d.best} ({best.summary.describe()})."))
        out.append(Heading(3, f"Confusion matrix: {d.best}"))
        for note in d.notes:
            out.append(Callout("note", note))
        if d.confusion is not None:
            out += _fig(figs.confusion)
            names = figs.class_names or [str(i) for i in range(d.confusion.shape[0])]
            rows = []
            for i, row in enumerate(d.confusion):
                total = int(row.sum())
                rows.append((names[i], *(int(x) for x in row), total,
                             num(100.0 * row[i] / total) if total else DASH))
            out.append(Para(f"Counts summed over seeds {seeds_text(d.confusion_seeds)} "
                            "(rows: true class; columns: predicted class)."))
            out.append(table(("true / predicted", *names, "total", "recall (%)"), rows,
                             "l" + "r" * (len(names) + 2)))
        else:
            out.append(Para("No readable predictions.npz for this variant."))
        out.append(Heading(3, f"Misclassified test images: {d.best}"))
        if d.misclassified:
            out.append(Para(f"Seed {d.misclassified_seed}: {d.n_wrong} of {d.n_test} test images misclassified; "
                            f"the first {len(d.misclassified)} in test-set order:"))
            if figs.misclassified_note:
                out.append(Callout("note", figs.misclassified_note))
            if figs.misclassified is not None:
                out += _fig(figs.misclassified)
            else:
                names = figs.class_names
                out.append(table(("test index", "true", "predicted"),
                                 [(i, _name(names, t), _name(names, p)) for i, t, p in d.misclassified], "rll"))
        elif d.misclassified_seed is not None:
            out.append(Para(f"Seed {d.misclassified_seed}: no test image is misclassified."))
        else:
            out.append(Para("No readable predictions.npz for this variant."))
    out.append(Heading(3, "Train-mode vs eval-mode evaluation"))
    out.append(Para(
        "The lab evaluated with the model still in training mode: dropout kept dropping units (its p = 0.75 "
        "drops three quarters of them) and BatchNorm normalized with the test batch's own statistics. "
        "cnnlab records both: eval mode (model.eval(), the correct way) and train mode (the lab's way). "
        "The table gives the mean over seeds of each, and of their per-seed difference."))
    for name, gap in an.warnings:
        vs = an.variants[name]
        out.append(Callout("warning", (
            f"{name}: eval-mode test accuracy is {abs(gap):.2f} pts below train-mode accuracy on average "
            f"(n = {vs.gap.n}; threshold {GAP_WARN_PTS:g} pts). This points to dropout or BatchNorm behaving "
            "differently between train and eval mode; see below.")))
    if an.warnings:
        out.append(Para(
            "Why a drop in eval mode matters: switching to model.eval() should not cost accuracy. A large drop "
            "means the network relies on its train-mode behaviour: heavy dropout (such as the lab's p = 0.75, "
            "which keeps only a quarter of the units, so eval mode's full activations are far from what the "
            "next layers saw in training), or BatchNorm running statistics that do not match the test data "
            "(few training steps, small batches, activations whose scale drifts). Neither number is then a "
            "trustworthy estimate; check the dropout probability and the number of steps first."))
    else:
        out.append(Para(f"No variant loses more than {GAP_WARN_PTS:g} pts when switching to eval mode."))
    out.append(gap_table(an))
    return out


def _toml(config: dict) -> str:
    try:
        import tomli_w

        return tomli_w.dumps(config).rstrip("\n")
    except Exception:  # noqa: BLE001 - e.g. a value TOML cannot hold: show it as JSON
        return json.dumps(config, indent=2, sort_keys=True)


def _reproducibility(study: Study, an: Analysis) -> list:
    done = [r for r in study.runs if r.finished]
    out: list = [Heading(2, "Reproducibility"), Heading(3, "Command")]
    out.append(Code(study.command or "(not recorded in study.json)"))
    out.append(Heading(3, "Configurations"))
    for name, v in study.variants.items():
        out.append(Para(f"{name} (train.seed is set per run):"))
        out.append(Code(_toml(v.config)))
    out.append(Heading(3, "Versions"))
    keys = sorted(set(study.versions) | {k for r in done for k in (r.result.get("versions") or {})
                                         if isinstance(r.result.get("versions"), dict)})
    rows = []
    for k in keys:
        runs = distinct(str(r.result["versions"][k]) for r in done
                         if isinstance(r.result.get("versions"), dict) and k in r.result["versions"])
        rows.append((k, str(study.versions.get(k, DASH)), runs if done else DASH))
    out.append(table(("package", "study.json", "runs"), rows, "lll") if rows else Para("No versions recorded."))
    out.append(Heading(3, "Device"))
    devices: dict[str, int] = {}
    for r in done:
        devices[str(r.result.get("device", "not recorded"))] = devices.get(str(r.result.get("device", "not recorded")), 0) + 1
    out.append(Para("; ".join(f"{d}: {_plural(n, 'run')}" for d, n in sorted(devices.items())) or "No finished runs."))
    out.append(Heading(3, "Data"))
    hashes: dict[tuple[str, str], int] = {}
    for r in done:
        sha = (r.result.get("data") or {}).get("sha256") if isinstance(r.result.get("data"), dict) else None
        for f, h in (sha or {}).items():
            hashes[(str(f), str(h))] = hashes.get((str(f), str(h)), 0) + 1
    files = sorted({f for f, _ in hashes})
    clash = [f for f in files if sum(1 for g, _ in hashes if g == f) > 1]
    if clash:
        out.append(Callout("warning", "runs used different data for " + ", ".join(clash)
                           + ": their results are not comparable"))
    out.append(table(("file", "sha256", "runs"), [(f, h, n) for (f, h), n in sorted(hashes.items())], "llr")
               if hashes else Para("No data hashes recorded."))
    out.append(Heading(3, "Runs and wall time"))
    walls = [(r, r.result.get("wall_seconds")) for r in study.runs if r.result]
    total = sum(w for _, w in walls if _ok(w))
    done_total = sum(w for r, w in walls if _ok(w) and r.finished)
    out.append(Para(f"Total wall time: {total:.1f} s ({total / 60:.1f} min) over {_plural(sum(1 for _, w in walls if _ok(w)), 'run')} "
                    f"that recorded it; finished runs: {done_total:.1f} s."))
    out.append(table(("variant", "seed", "status", "wall time (s)", "run directory"),
                     [(r.variant, r.seed, r.status, num((r.result or {}).get("wall_seconds"), 1),
                       r.path.relative_to(study.path).as_posix()) for r in study.runs], "lrlrl"))
    return out


# ---------------------------------------------------------------------------- markdown

def _md(text: str) -> str:
    """Markdown text: anything that looks like an HTML tag is shown, not interpreted."""
    return re.sub(r"<(?=[A-Za-z/!?])", "&lt;", text)


def _md_cell(text: str) -> str:
    return _md(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> str:
    header = [_md_cell(h) for h in t.header]
    rows = [[_md_cell(c) for c in r] for r in t.rows]
    widths = [max([len(header[i]), 3] + [len(r[i]) for r in rows]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w)
                                 for c, w, a in zip(cells, widths, t.align)) + " |"

    rule = "|" + "|".join((":" + "-" * (w + 1)) if a == "l" else ("-" * (w + 1) + ":")
                          for w, a in zip(widths, t.align)) + "|"
    return "\n".join([line(header), rule] + [line(r) for r in rows])


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def to_markdown(blocks: list) -> str:
    parts = []
    for b in blocks:
        if isinstance(b, Heading):
            parts.append("#" * b.level + " " + _md(b.text))
        elif isinstance(b, Para):
            parts.append(_md(b.text))
        elif isinstance(b, Callout):
            parts.append(f"> **{b.kind.upper()}:** {_md(b.text)}")
        elif isinstance(b, Code):
            f = _fence(b.text)
            parts.append(f"{f}text\n{b.text}\n{f}")
        elif isinstance(b, Table):
            parts.append(_md_table(b))
        elif isinstance(b, Image):
            alt = _md(b.alt).replace("[", "(").replace("]", ")")
            parts.append(f"![{alt}]({FILES_DIR}/{b.name})\n\n*{_md(b.caption)}*")
        elif isinstance(b, Bullets):
            parts.append("\n".join(f"- {_md(item)}" for item in b.items))
        else:  # pragma: no cover - a new block type without a renderer is a bug
            raise TypeError(f"unknown block {b!r}")
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------- html

CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#1b1b1b;background:#fff;margin:0;line-height:1.45}
main{max-width:1100px;margin:0 auto;padding:24px 28px 64px}
h1{font-size:1.8em;border-bottom:2px solid #ddd;padding-bottom:.3em}
h2{font-size:1.45em;border-bottom:1px solid #e4e4e4;padding-bottom:.2em;margin-top:2em}
h3{font-size:1.2em;margin-top:1.6em}h4{font-size:1.02em;margin-top:1.3em;color:#333}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
th,td{border:1px solid #d8d8d8;padding:4px 8px;vertical-align:top}
th{background:#f4f6f8;text-align:left}td.r{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafafa}
pre{background:#f6f8fa;border:1px solid #e1e4e8;padding:10px 12px;overflow-x:auto;font-size:.82em;line-height:1.35}
code{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555;margin-top:.3em;max-width:900px}
.warning{background:#fff4e5;border-left:4px solid #e69500;padding:8px 12px;margin:.8em 0}
.note{background:#eef5fb;border-left:4px solid #4a90c8;padding:8px 12px;margin:.8em 0}
nav.toc{background:#fafafa;border:1px solid #e6e6e6;padding:8px 16px;margin:1em 0;font-size:.92em}
nav.toc ul{margin:.2em 0;padding-left:1.3em;columns:3;column-gap:2em}
nav.toc li{break-inside:avoid}
""".strip()


def _png_size(png: bytes) -> tuple[int, int] | None:
    if png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR":
        return struct.unpack(">II", png[16:24])
    return None


def _ids(blocks: list) -> dict[int, str]:
    ids, used = {}, set()
    for i, b in enumerate(blocks):
        if isinstance(b, Heading):
            base = "sec-" + (re.sub(r"[^a-z0-9]+", "-", b.text.lower()).strip("-") or "x")
            hid, k = base, 2
            while hid in used:
                hid, k = f"{base}-{k}", k + 1
            used.add(hid)
            ids[i] = hid
    return ids


def to_html(blocks: list, images: dict[str, bytes], title: str) -> str:
    e = html.escape
    ids = _ids(blocks)
    toc = ["<nav class=\"toc\"><strong>Contents</strong><ul>"]
    for i, b in enumerate(blocks):
        if isinstance(b, Heading) and b.level in (2, 3):
            indent = ' style="margin-left:1.2em"' if b.level == 3 else ""
            toc.append(f'<li{indent}><a href="#{ids[i]}">{e(b.text)}</a></li>')
    toc.append("</ul></nav>")
    body = []
    for i, b in enumerate(blocks):
        if isinstance(b, Heading):
            body.append(f'<h{b.level} id="{ids[i]}">{e(b.text)}</h{b.level}>')
        elif isinstance(b, Para):
            body.append(f"<p>{e(b.text)}</p>")
        elif isinstance(b, Callout):
            body.append(f'<div class="{e(b.kind)}"><strong>{e(b.kind.upper())}:</strong> {e(b.text)}</div>')
        elif isinstance(b, Code):
            body.append(f"<pre><code>{e(b.text)}</code></pre>")
        elif isinstance(b, Table):
            rows = ["<table>", "<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in b.header) + "</tr></thead>",
                    "<tbody>"]
            for r in b.rows:
                rows.append("<tr>" + "".join(f'<td class="{a}">{e(c)}</td>' for c, a in zip(r, b.align)) + "</tr>")
            rows.append("</tbody></table>")
            body.append("\n".join(rows))
        elif isinstance(b, Image):
            png = images[b.name]
            size = _png_size(png)
            dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
            data = base64.b64encode(png).decode("ascii")
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{e(b.alt)}"{dims}>'
                        f"<figcaption>{e(b.caption)}</figcaption></figure>")
        elif isinstance(b, Bullets):
            body.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in b.items) + "</ul>")
        else:  # pragma: no cover
            raise TypeError(f"unknown block {b!r}")
    # The table of contents goes right after the title and the protocol block.
    first_h2 = next((k for k, b in enumerate(body) if b.startswith("<h2")), len(body))
    body[first_h2:first_h2] = ["\n".join(toc)]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{e(title)}</title>\n<style>\n{CSS}\n</style>\n</head>\n<body>\n<main>\n"
            + "\n".join(body) + "\n</main>\n</body>\n</html>\n")
