"""The study report, built from a fake study directory written file by file (docs/layout.md).

No training: the fake runs hold plausible numbers from a seeded RNG, one failed run and one
missing run, and a tiny synthetic IDX dataset so that the example image and the grid of
misclassified images can be drawn. Golden files: tests/golden/*.md; regenerate them with
CNNLAB_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import hashlib
import html.parser
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from conftest import make_idx_dir, synthetic_images
from cnnlab import stats
from cnnlab.config import config_from_dict
from cnnlab.report import build_report, render
from cnnlab.spec import count_params

GOLDEN = Path(__file__).parent / "golden"
ROOT = Path(__file__).resolve().parents[1]

SEEDS = [0, 1, 2, 3]
N_TRAIN, N_VAL, N_TEST, CLASSES, SIZE = 500, 100, 200, 4, (16, 16)
VARIANTS = {  # name: (preset, mean test accuracy, eval-mode minus train-mode gap)
    "bn": ("lab2-3c3f-bn", 88.0, -4.0),  # BN variant: eval mode far below train mode -> warning
    "no-bn": ("lab2-3c3f", 87.6, 0.5),
    "2c3f": ("lab2-2c3f", 93.0, 0.3),
}
COMPARISONS = {"BN vs no BN": ["bn", "no-bn"], "2 conv vs 3 conv": ["2c3f", "no-bn"],
               "2 conv vs BN": ["2c3f", "bn"]}
FAILED = ("no-bn", 2)  # result.json status "failed"
MISSING = ("2c3f", 3)  # no run directory at all
EPOCHS = 4


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_run(run: Path, cfg: dict, seed: int, acc_eval: float, gap: float, rng, data: dict,
               labels: np.ndarray, failed: bool) -> dict:
    """Write one run directory the way training does; return the result.json dict."""
    run.mkdir(parents=True)
    cfg = json.loads(json.dumps(cfg))
    cfg["train"]["seed"] = seed
    (run / "config.toml").write_text(tomli_w.dumps(cfg))
    epochs = 2 if failed else EPOCHS
    rows, log = [], []
    for e in range(epochs):
        tr_acc = acc_eval - 8 * math.exp(-e) - 1 + rng.normal(0, 0.3)
        va_acc = acc_eval - 6 * math.exp(-e) + rng.normal(0, 0.4)
        tr_loss = 400 * (1 - tr_acc / 100) * 10 + rng.normal(0, 5)
        va_loss = 40 * (1 - va_acc / 100) * 10 + rng.normal(0, 1)
        rows.append((e, round(tr_loss, 4), round(tr_acc, 4), round(va_loss, 4), round(va_acc, 4), 1.25))
        log.append(f"Epoch: {e} train loss: {tr_loss:.4f} train accuracy: {tr_acc:.4f} "
                   f"val loss: {va_loss:.4f} val accuracy: {va_acc:.4f}")
    (run / "metrics.csv").write_text("epoch,train_loss,train_acc,val_loss,val_acc,seconds\n"
                                     + "".join(",".join(str(x) for x in r) + "\n" for r in rows))
    idx = rng.permutation(N_TRAIN + N_VAL)
    np.savez(run / "split.npz", train_idx=idx[:N_TRAIN], val_idx=idx[N_TRAIN:])
    base = {"seed": seed, "eval_mode": "eval", "epochs": EPOCHS, "device": "cpu", "kernels": "native (cc -O3)",
            "versions": {"cnnlab": "0.1.0", "torch": "2.13.0", "numpy": "2.4.6", "python": "3.11.2",
                         "platform": "Linux-x86_64"},
            "command": f"cnnlab study lab.toml (seed {seed})", "started": "2024-01-01T00:00:00",
            "params": None, "data": data}
    if failed:
        (run / "train.log").write_text("\n".join(log) + "\n")
        res = {**base, "status": "failed", "wall_seconds": 3.5,
               "error": {"message": "loss became nan at epoch 2, step 7; lower the learning rate (lr=0.001)",
                         "epoch": 2, "step": 7}}
        (run / "result.json").write_text(json.dumps(res, indent=2))
        return res
    # predictions: flip exactly enough labels that the accuracy is acc_eval (rounded to 1/N_TEST)
    wrong = int(round((1 - acc_eval / 100) * N_TEST))
    pred = labels.copy()
    flip = rng.choice(N_TEST, size=wrong, replace=False)
    pred[flip] = (labels[flip] + 1 + rng.integers(0, CLASSES - 1, size=wrong)) % CLASSES
    acc_e = 100.0 * float(np.mean(pred == labels))
    pred_train = labels.copy()
    wrong_t = int(round((1 - (acc_e - gap - rng.normal(0, 0.5)) / 100) * N_TEST))
    pred_train[:wrong_t] = (labels[:wrong_t] + 1) % CLASSES
    acc_t = 100.0 * float(np.mean(pred_train == labels))
    probs = np.full((N_TEST, CLASSES), 0.02, dtype=np.float32)
    probs[np.arange(N_TEST), pred] = 1 - 0.02 * (CLASSES - 1)
    np.savez(run / "predictions.npz", labels=labels.astype(np.int64), pred_eval=pred.astype(np.int64),
             pred_train=pred_train.astype(np.int64), probs_eval=probs)
    log.append(f"test accuracy: {acc_e:.4f}")
    (run / "train.log").write_text("\n".join(log) + "\n")
    res = {**base, "status": "done", "test_accuracy": acc_e, "test_loss": 12.5,
           "test_accuracy_eval": acc_e, "test_accuracy_train": acc_t,
           "train_accuracy_eval": acc_e + 2, "train_accuracy_train": acc_t + 2.5,
           "best_epoch": EPOCHS - 1, "best_val_acc": rows[-1][4],
           "example": {"index": 4, "label": int(labels[4]), "predicted": int(pred[4]),
                       "top_k": [[int(pred[4]), 0.94], [int((pred[4] + 1) % CLASSES), 0.04],
                                 [int((pred[4] + 2) % CLASSES), 0.02]]},
           "wall_seconds": round(float(20 + rng.uniform(0, 5)), 2)}
    (run / "result.json").write_text(json.dumps(res, indent=2))
    return res


def make_study(root: Path, variants=VARIANTS, comparisons=COMPARISONS, seeds=SEEDS) -> dict:
    """Write a study directory; return {"dir", "data_dir", "results": {(variant, seed): result}}."""
    data_dir = make_idx_dir(root / "synth", n_train=N_TRAIN + N_VAL, n_test=N_TEST, size=SIZE, classes=CLASSES)
    _, labels = synthetic_images(N_TEST, SIZE, CLASSES, seed=1)  # make_idx_dir's test labels
    name = f"idx:{data_dir.resolve()}"
    sha = {f: _sha(data_dir / f) for f in sorted(os.listdir(data_dir))}
    data = {"name": name, "source": f"IDX files in {data_dir.resolve()}", "sha256": sha, "n_train": N_TRAIN,
            "n_val": N_VAL, "n_test": N_TEST, "input_shape": [1, *SIZE], "num_classes": CLASSES}
    study = root / "study"
    rng = np.random.default_rng(1234)
    seed_effect = {s: rng.normal(0, 0.6) for s in seeds}  # shared by all variants: pairing removes it
    configs, results = {}, {}
    for v, (preset, mean, gap) in variants.items():
        cfg = config_from_dict({"data": {"name": name, "val_size": N_VAL},
                                "model": {"preset": preset}, "train": {"epochs": EPOCHS}})
        configs[v] = cfg.to_dict()
        params = count_params(cfg.model, (1, *SIZE), CLASSES)
        for s in seeds:
            if (v, s) == MISSING:
                continue
            acc = mean + seed_effect[s] + rng.normal(0, 0.4)
            res = _write_run(study / "runs" / v / f"seed-{s}", configs[v], s, acc, gap, rng, data, labels,
                             failed=(v, s) == FAILED)
            if res["status"] == "done":
                res["params"] = params
                (study / "runs" / v / f"seed-{s}" / "result.json").write_text(json.dumps(res, indent=2))
            results[(v, s)] = res
    (study / "study.json").write_text(json.dumps({
        "name": "lab2-fake", "seeds": seeds, "variants": configs,
        "comparisons": {k: v for k, v in comparisons.items() if set(v) <= set(variants)},
        "command": "cnnlab study studies/lab2.toml --out studies-out/lab2",
        "versions": {"cnnlab": "0.1.0", "torch": "2.13.0", "numpy": "2.4.6", "python": "3.11.2",
                     "platform": "Linux-x86_64"},
    }, indent=2))
    return {"dir": study, "data_dir": data_dir, "results": results}


def _data_module() -> bool:
    try:
        import cnnlab.data  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One fake study, built once (with dot when installed) and shared by the read-only tests."""
    root = tmp_path_factory.mktemp("report")
    info = make_study(root)
    md, html = build_report(info["dir"])
    return {**info, "md": md, "html": html, "text": md.read_text(encoding="utf-8"),
            "html_text": html.read_text(encoding="utf-8")}


def _finished(results, variant=None):
    return {(v, s): r for (v, s), r in results.items()
            if r["status"] == "done" and (variant is None or v == variant)}


def _section(md: str, heading: str) -> str:
    """The markdown from `heading` up to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    start = md.index(heading + "\n")
    m = re.compile(r"^#{1,%d} " % level, re.M).search(md, start + len(heading) + 1)
    return md[start: m.start() if m else len(md)]


def _tables(md: str) -> list[list[list[str]]]:
    """Every markdown table as rows of cells (header first, alignment row dropped)."""
    out, cur = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                cur.append(cells)
        elif cur:
            out.append(cur)
            cur = []
    return out


# ---------------------------------------------------------------------------- content

def test_every_section_is_there_with_real_numbers(built):
    md, res = built["text"], built["results"]
    for h in ["# Study report: lab2-fake", "## Overview", "## Comparisons", "### BN vs no BN: bn vs no-bn",
              "### 2 conv vs 3 conv: 2c3f vs no-bn", "## Variants", "## Diagnostics",
              "### Confusion matrix: 2c3f", "### Misclassified test images: 2c3f",
              "### Train-mode vs eval-mode evaluation", "## Reproducibility", "### Command",
              "### Configurations", "### Versions", "### Device", "### Data", "### Runs and wall time"]:
        assert h + "\n" in md, h
    for v in VARIANTS:
        for h in [f"### Variant {v}", f"#### Model summary: {v}", f"#### Model graph: {v}",
                  f"#### Loss plot: {v}", f"#### Accuracy plot: {v}", f"#### Training log: {v}, seed 0",
                  f"#### Test accuracy: {v}", f"#### Example prediction: {v}"]:
            assert h + "\n" in md, h
    # protocol with the split sizes, epochs, seeds, device, eval mode
    assert f"{N_TRAIN} train / {N_VAL} validation / {N_TEST} test" in md
    assert "| epochs" in md and f"| {EPOCHS} " in md
    assert "0–3 (10 of 12 runs finished)" in md
    assert "| kernels " in md and "native (cc -O3)" in md  # which kernels trained: float rounding depends on them
    assert "| device" in md and "cpu" in md and "eval (model.eval()" in md
    # the lab's model summary, exactly as cnnlab.summary prints it for this input
    from cnnlab.spec import PRESETS
    from cnnlab.summary import format_summary

    assert format_summary(PRESETS["lab2-3c3f-bn"], (1, *SIZE), CLASSES) in md
    # training log of the first seed, verbatim
    log0 = (built["dir"] / "runs" / "bn" / "seed-0" / "train.log").read_text().rstrip("\n")
    assert log0 in _section(md, "#### Training log: bn, seed 0")
    # per-variant test accuracy: mean ± sd and CI from the stored per-seed values
    accs = [res[("bn", s)]["test_accuracy"] for s in SEEDS]
    s = stats.summarize(accs)
    assert f"{s.mean:.2f} ± {s.std:.2f}% (95% CI [{s.ci_low:.2f}, {s.ci_high:.2f}], n = 4)" in md
    for a in accs:
        assert f"{a:.2f}" in _section(md, "#### Test accuracy: bn")
    # example prediction from result.json
    ex = res[("bn", 0)]["example"]
    assert f"Test image #4 (seed 0): true label {ex['label']}, predicted {ex['predicted']}" in md
    # figures referenced by relative path and present
    for ref in re.findall(r"\]\((report_files/[^)]+)\)", md):
        assert (built["dir"] / ref).is_file(), ref
    for name in ["loss-bn.png", "accuracy-bn.png", "example-bn.png", "compare-BN-vs-no-BN.png", "confusion.png"]:
        assert f"(report_files/{name})" in md, name
    # a band is always said to be min-max
    assert "band: min-max over seeds" in md


def test_failed_and_missing_runs_shown_and_excluded(built):
    md = built["text"]
    assert "no-bn seed 2: failed (loss became nan at epoch 2, step 7; lower the learning rate (lr=0.001))" in md
    assert "2c3f seed 3: missing (no run directory: not started)" in md
    rows = {r[0]: r for r in _tables(_section(md, "## Overview"))[0][1:]}
    assert rows["no-bn"][1] == "3" and rows["no-bn"][2] == "1 failed"
    assert rows["2c3f"][1] == "3" and rows["2c3f"][2] == "1 missing"
    assert rows["bn"][1] == "4" and rows["bn"][2] == "0"
    seeds = _section(md, "### BN vs no BN: bn vs no-bn")
    assert "matched seeds (finished on every side) | 3 (0, 1, 3)" in re.sub(r" +", " ", seeds)
    assert re.search(r"\|\s+2 \|\s+\d+\.\d\d \|\s+failed \|\s+not paired \|", seeds)


def test_variants_table_adds_up(built):
    """n sums to the finished runs; means and sds are those of the per-seed values."""
    res = built["results"]
    table = _tables(_section(built["text"], "## Overview"))[0]
    assert table[0][:4] == ["variant", "n", "not finished", "test acc mean (%)"]
    rows = table[1:]
    assert [r[0] for r in rows] == list(VARIANTS)
    assert sum(int(r[1]) for r in rows) == len(_finished(res)) == 10
    for r in rows:
        accs = [x["test_accuracy"] for x in _finished(res, r[0]).values()]
        assert int(r[1]) == len(accs)
        assert float(r[3]) == pytest.approx(np.mean(accs), abs=0.005)
        assert float(r[4]) == pytest.approx(np.std(accs, ddof=1), abs=0.005)
        walls = [x["wall_seconds"] for x in _finished(res, r[0]).values()]
        assert float(r[7]) == pytest.approx(np.mean(walls), abs=0.05)


def test_comparisons_match_stats_and_verdicts(built):
    res, md = built["results"], built["text"]
    acc = {v: {s: r["test_accuracy"] for (vv, s), r in _finished(res, v).items()} for v in VARIANTS}
    prs = {k: stats.paired(acc[a], acc[b]) for k, (a, b) in COMPARISONS.items()}
    # a fixed-n study of 3 comparisons: Bonferroni t-intervals at 1 - 0.05/3
    decided = {k: stats.decide(pr, 0.5, m=3) for k, pr in prs.items()}
    verdicts = {r[0]: r for r in _tables(_section(md, "## Verdicts"))[0][1:]}
    for k, (a, b) in COMPARISONS.items():
        d = decided[k]
        sec = _section(md, f"### {k}: {a} vs {b}")
        assert stats.verdict_text(a, b, d) in sec
        assert "| adjusted p (agrees with that interval)" in sec and stats.format_p(d.p) in sec
        assert "interval the verdict uses: 98.33% fixed-n t interval (Bonferroni over 3)" in sec
        assert d.p == pytest.approx(min(1.0, 3 * prs[k].p))
        row = verdicts[k]
        assert row[3] == stats.verdict_text(a, b, d, detail=False)
        assert row[5] == stats.interval_text(d.ci_low, d.ci_high) and row[6] == str(d.n)
    # with 2-3 seeds and a Bonferroni family of 3, only the exactly constant difference resolves
    assert {k: d.kind for k, d in decided.items()} == {"BN vs no BN": "undetermined",
                                                       "2 conv vs 3 conv": "undetermined", "2 conv vs BN": "a"}
    assert "undetermined after 3 seeds" in md and "2c3f better by 4.50 pts" in md
    # the report leads with the verdicts, before the overview
    assert md.index("## Verdicts") < md.index("## Overview") < md.index("## Comparisons")


def test_comparisons_in_both_eval_modes(built):
    res, md = built["results"], built["text"]
    table = next(t for t in _tables(_section(md, "## Comparisons")) if "train mode (lab's way): A − B [interval]" in t[0])
    rows = {r[0]: r for r in table[1:]}
    for mode, col in (("eval", 3), ("train", 5)):
        acc = {v: {s: r[f"test_accuracy_{mode}"] for (vv, s), r in _finished(res, v).items()} for v in VARIANTS}
        prs = {k: stats.paired(acc[a], acc[b]) for k, (a, b) in COMPARISONS.items()}
        for k, pr in prs.items():
            name = next(r for r in rows if r == k or r.startswith(k))
            assert rows[name][col].startswith(f"{pr.mean_diff:+.2f} ["), (mode, k)
            d = stats.decide(pr, 0.5, m=3)
            assert rows[name][col].endswith(stats.interval_text(d.ci_low, d.ci_high))
            assert rows[name][col + 1] == f"{render.KIND_WORDS[d.kind]} ({d.n})"


def test_diagnostics(built):
    md, res = built["text"], built["results"]
    diag = _section(md, "## Diagnostics")
    assert "Best variant by mean test accuracy: 2c3f" in diag
    # confusion matrix counts: summed over the best variant's finished seeds
    conf = np.zeros((CLASSES, CLASSES), dtype=int)
    for (v, s) in _finished(res, "2c3f"):
        with np.load(built["dir"] / "runs" / v / f"seed-{s}" / "predictions.npz") as z:
            np.add.at(conf, (z["labels"], z["pred_eval"]), 1)
    table = _tables(_section(md, "### Confusion matrix: 2c3f"))[0]
    assert [[int(c) for c in r[1:1 + CLASSES]] for r in table[1:]] == conf.tolist()
    assert sum(int(r[1 + CLASSES]) for r in table[1:]) == N_TEST * 3
    # misclassified grid (needs the dataset loader) or its table, with the count of errors
    with np.load(built["dir"] / "runs" / "2c3f" / "seed-0" / "predictions.npz") as z:
        wrong = int(np.sum(z["labels"] != z["pred_eval"]))
    assert f"Seed 0: {wrong} of {N_TEST} test images misclassified" in diag
    if _data_module():
        assert "(report_files/misclassified.png)" in diag
    # the BN variant's eval mode is far below its train mode: one WARNING, for it only
    warnings = re.findall(r"> \*\*WARNING:\*\* (\S+): eval-mode test accuracy", md)
    assert warnings == ["bn"]
    assert "dropout or BatchNorm behaving differently between train and eval mode" in md
    gap = {r[0]: r for r in _tables(_section(md, "### Train-mode vs eval-mode evaluation"))[0][1:]}
    for v in VARIANTS:
        fin = _finished(res, v).values()
        g = np.mean([r["test_accuracy_eval"] - r["test_accuracy_train"] for r in fin])
        assert float(gap[v][4]) == pytest.approx(g, abs=0.005)


def test_reproducibility_block(built):
    rep = _section(built["text"], "## Reproducibility")
    assert "cnnlab study studies/lab2.toml --out studies-out/lab2" in rep
    assert 'preset = "lab2-3c3f-bn"' in rep and "[train]" in rep
    assert "| torch" in rep and "2.13.0" in rep
    for f, h in _finished(built["results"])[("bn", 0)]["data"]["sha256"].items():
        assert f in rep and h in rep
    walls = [r["wall_seconds"] for r in built["results"].values()]
    assert f"Total wall time: {sum(walls):.1f} s" in rep
    assert "runs/no-bn/seed-2" in rep


# ---------------------------------------------------------------------------- golden tables

def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("CNNLAB_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"{path} missing; run with CNNLAB_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(encoding="utf-8"), f"{name} differs from the golden file"


def test_golden_variants_table(built):
    from cnnlab.report import analyze, collect

    study = collect.load_study(built["dir"])
    text = render.to_markdown([render.variants_table(study, analyze.analyze(study))])
    assert text.rstrip("\n") in built["text"]  # the very table the report shows
    _golden("variants_table.md", text)


def test_golden_comparison_tables(built):
    from cnnlab.report import analyze, collect

    study = collect.load_study(built["dir"])
    an = analyze.analyze(study)
    blocks = [render.comparisons_overview(an)]
    for c in an.comparisons:
        blocks += [render.Heading(3, c.name), render.comparison_table(c, an), render.comparison_seeds_table(study, c, an)]
    for b in blocks:
        if isinstance(b, render.Table):
            assert render.to_markdown([b]).rstrip("\n") in built["text"]
    _golden("comparison_tables.md", render.to_markdown(blocks))


# ---------------------------------------------------------------------------- determinism

def _digest(study: Path) -> dict[str, str]:
    files = [study / "report.md", study / "report.html", *sorted((study / "report_files").glob("*"))]
    return {f.relative_to(study).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_rebuild_is_byte_identical_in_a_fresh_process(built):
    before = _digest(built["dir"])
    assert len(before) > 10
    env = {**os.environ, "PYTHONHASHSEED": "random"}
    proc = subprocess.run([sys.executable, "-m", "cnnlab.cli", "report", str(built["dir"])],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(built["md"]), str(built["html"])]
    assert _digest(built["dir"]) == before


def test_stale_figures_are_removed(tmp_path):
    info = make_study(tmp_path, variants={k: VARIANTS[k] for k in ("bn", "no-bn")}, seeds=[0, 1])
    files = info["dir"] / "report_files"
    files.mkdir()
    (files / "loss-old-variant.png").write_bytes(b"\x89PNG old")
    build_report(info["dir"])
    assert not (files / "loss-old-variant.png").exists()
    assert (files / "loss-bn.png").exists()


# ---------------------------------------------------------------------------- graph

@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz dot is not installed")
def test_graph_rendered_with_dot(built):
    png = built["dir"] / "report_files" / "graph-bn.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(report_files/graph-bn.png)" in built["text"]
    from cnnlab.report import graph
    from cnnlab.spec import PRESETS, layer_table

    rows = layer_table(PRESETS["lab2-3c3f-bn"], (1, *SIZE), CLASSES)
    src = graph.dot_source(rows, (1, *SIZE))
    assert src.count("[label=") == len(rows) + 1  # one node per layer, plus the input
    assert '"Conv2d-1   [6, 16, 16]   60 params"' in src


@pytest.mark.parametrize("how", ["env", "path", "failing"])
def test_graph_fallback_without_dot(tmp_path, monkeypatch, how):
    info = make_study(tmp_path, variants={"bn": VARIANTS["bn"]}, seeds=[0, 1])
    if how == "env":
        monkeypatch.setenv("CNNLAB_DOT", str(tmp_path / "no-such-dot"))
    elif how == "path":
        monkeypatch.delenv("CNNLAB_DOT", raising=False)
        empty = tmp_path / "empty-bin"
        empty.mkdir()
        monkeypatch.setenv("PATH", str(empty))
    else:
        fake = tmp_path / "dot"
        fake.write_text("#!/bin/sh\necho 'Error: syntax error in line 1' >&2\nexit 1\n")
        fake.chmod(0o755)
        monkeypatch.setenv("CNNLAB_DOT", str(fake))
    md_path, _ = build_report(info["dir"])
    md = md_path.read_text()
    sec = _section(md, "#### Model graph: bn")
    if how == "failing":
        assert "> **NOTE:** No graph image: Graphviz `dot`" in sec and "failed with exit code 1: Error: syntax error" in sec
    else:
        assert "> **NOTE:** No graph image: Graphviz `dot` was not found" in sec and "install graphviz" in sec
    layers = _tables(sec)[0]
    assert layers[0] == ["layer", "block", "output shape", "params"]
    assert layers[1] == ["Conv2d-1", "conv1", "[6, 16, 16]", "60"]
    assert not list((info["dir"] / "report_files").glob("graph-*.png"))


# ---------------------------------------------------------------------------- dataset missing

def test_report_builds_when_the_dataset_is_gone(tmp_path):
    info = make_study(tmp_path, variants={k: VARIANTS[k] for k in ("bn", "2c3f")}, seeds=[0, 1])
    shutil.rmtree(info["data_dir"])
    md_path, html_path = build_report(info["dir"])
    md = md_path.read_text()
    ex = _section(md, "#### Example prediction: bn")
    assert "> **NOTE:** The image itself is not shown:" in ex
    assert "(report_files/example-bn.png)" in ex  # the prediction, without the image
    mis = _section(md, "### Misclassified test images: 2c3f")
    assert "The images are not shown:" in mis
    table = _tables(mis)[0]
    assert table[0] == ["test index", "true", "predicted"] and 1 <= len(table) - 1 <= 25
    assert not (info["dir"] / "report_files" / "misclassified.png").exists()


def test_example_image_with_the_dataset(built):
    if not _data_module():
        pytest.skip("cnnlab.data is not available yet")
    ex = _section(built["text"], "#### Example prediction: bn")
    assert "NOTE" not in ex
    from PIL import Image

    w, h = Image.open(built["dir"] / "report_files" / "example-bn.png").size
    assert w > h  # image and top-k bars side by side


# ---------------------------------------------------------------------------- not a study

@pytest.mark.parametrize("kind", ["empty", "missing", "file", "badjson"])
def test_cli_report_on_a_non_study_dir(tmp_path, capsys, kind):
    from cnnlab.cli import main

    target = tmp_path / "nope"
    if kind == "empty":
        target.mkdir()
    elif kind == "file":
        target.write_text("x")
    elif kind == "badjson":
        target.mkdir()
        (target / "study.json").write_text("{not json")
    assert main(["report", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cnnlab report: error: ")
    assert str(target) in err
    expected = {"empty": "study.json is missing", "missing": "no such directory", "file": "not a directory",
                "badjson": "not valid JSON"}[kind]
    assert expected in err


def test_study_json_naming_an_unknown_variant(tmp_path):
    from cnnlab.errors import CnnlabError

    info = make_study(tmp_path, variants={"bn": VARIANTS["bn"]}, seeds=[0])
    sj = info["dir"] / "study.json"
    data = json.loads(sj.read_text())
    data["comparisons"] = {"x": ["bn", "nope"]}
    sj.write_text(json.dumps(data))
    with pytest.raises(CnnlabError, match="unknown variant"):
        build_report(info["dir"])


# ---------------------------------------------------------------------------- html

class _Imgs(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tags, self.external = [], set(), []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        for k in ("src", "href"):
            v = a.get(k) or ""
            if v and not (v.startswith("data:") or v.startswith("#")):
                self.external.append(v)


def _check_html_images(text: str, expected: int) -> None:
    import base64

    from PIL import Image

    p = _Imgs()
    p.feed(text)
    assert not p.external, p.external
    assert "script" not in p.tags and "link" not in p.tags
    assert len(p.imgs) == expected
    for a in p.imgs:
        src = a["src"]
        assert src.startswith("data:image/png;base64,") and len(src) > 100
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        im = Image.open(io.BytesIO(png))
        im.verify()
        assert im.format == "PNG"
        assert (int(a["width"]), int(a["height"])) == im.size
        assert a.get("alt")


def test_html_is_self_contained(built):
    text = built["html_text"]
    n_md_images = len(re.findall(r"!\[[^\]]*\]\(report_files/", built["text"]))
    _check_html_images(text, n_md_images)
    assert "http://" not in text and "https://" not in text
    # every text is escaped: a variant name with markup stays text
    assert "<script" not in text


def test_html_escapes_names(tmp_path):
    evil = "<b>bn</b> & \"x\""
    info = make_study(tmp_path, variants={evil: VARIANTS["bn"], "no-bn": VARIANTS["no-bn"]},
                      comparisons={"<i>cmp</i>": [evil, "no-bn"]}, seeds=[0, 1])
    _, html_path = build_report(info["dir"])
    text = html_path.read_text()
    assert "<b>bn</b>" not in text and "<i>cmp</i>" not in text
    assert "&lt;b&gt;bn&lt;/b&gt; &amp; &quot;x&quot;" in text
    md = (info["dir"] / "report.md").read_text()
    assert "<b>" not in md and "### Variant &lt;b>bn&lt;/b> & \"x\"" in md


def test_report_with_no_finished_run(tmp_path):
    """Every run missing or failed: the report still builds and says so, with n = 0."""
    info = make_study(tmp_path, variants={"bn": VARIANTS["bn"], "no-bn": VARIANTS["no-bn"]}, seeds=[2],
                      comparisons={"BN vs no BN": ["bn", "no-bn"]})
    shutil.rmtree(info["dir"] / "runs" / "bn")
    md = build_report(info["dir"])[0].read_text()
    assert "0 of 2 runs finished" in md
    rows = {r[0]: r for r in _tables(_section(md, "## Overview"))[0][1:]}
    assert rows["bn"][1:3] == ["0", "1 missing"] and rows["no-bn"][1:3] == ["0", "1 failed"]
    verdicts = {r[0]: r for r in _tables(_section(md, "## Verdicts"))[0][1:]}
    assert verdicts["BN vs no BN"][3] == "no seed finished on both sides"
    assert "No finished runs: nothing to diagnose." in md
    assert "(no summary: no finished run records the input shape and number of classes)" in md


@pytest.mark.browser
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_html_renders_in_headless_chromium(built, tmp_path):
    from PIL import Image

    html_path = built["html"]
    shot = tmp_path / "shot.png"
    common = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", "--enable-logging=stderr", "--v=0"]

    def run(*extra):
        profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
        return subprocess.run([*common, f"--user-data-dir={profile}", *extra, html_path.as_uri()],
                              capture_output=True, text=True, timeout=120)

    dom = run("--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console
    assert "<h1 id=\"sec-study-report-lab2-fake\">" in dom.stdout
    _check_html_images(dom.stdout, len(re.findall(r"<img ", built["html_text"])))
    # the browser resolved every image: data URIs only, nothing fetched
    assert "ERR_" not in dom.stderr
    shotp = run("--screenshot=" + str(shot), "--window-size=1200,3000", "--hide-scrollbars")
    assert shotp.returncode == 0 and shot.is_file(), shotp.stderr[-2000:]
    im = Image.open(shot).convert("RGB")
    assert im.size == (1200, 3000)
    colors = im.resize((120, 300)).getcolors(maxcolors=1 << 16)
    assert colors is None or len(colors) > 50  # not a blank page
    # the README's screenshot (docs/report-screenshot.png): refreshed only when asked
    out = ROOT / "docs" / "report-screenshot.png"
    if os.environ.get("CNNLAB_UPDATE_SCREENSHOT") == "1":
        small = im.crop((0, 0, 1200, 2000)).resize((600, 1000), Image.LANCZOS)
        small = small.quantize(colors=128, method=Image.Quantize.MEDIANCUT)
        small.save(out, optimize=True)
        assert out.stat().st_size < 300_000


def test_a_grid_study_gets_the_factorial_analysis_in_both_modes(tmp_path):
    cells = {"bn=true,conv=3": ("lab2-3c3f-bn", 86.0, 3.0), "bn=false,conv=3": ("lab2-3c3f", 90.0, 0.5),
             "bn=true,conv=2": ("lab2-2c3f", 93.0, 1.0), "bn=false,conv=2": ("lab2-2c2f", 93.2, 0.5)}
    info = make_study(tmp_path, variants=cells, comparisons={}, seeds=[0, 1, 2, 3, 4])
    sj = info["dir"] / "study.json"
    data = json.loads(sj.read_text())
    data["grid"] = {"bn": [True, False], "conv": [3, 2]}
    data["cells"] = {v: {"bn": v.startswith("bn=true"), "conv": int(v[-1])} for v in cells}
    sj.write_text(json.dumps(data))
    md_path, _ = build_report(info["dir"])
    md = md_path.read_text()
    sec = _section(md, "## Factorial analysis")
    assert "The grid crosses bn (true, false), conv (3, 2)." in sec
    for mode, words in (("eval", "(model.eval())"), ("train", "(the lab's way)")):
        part = _section(sec, f"### {mode} mode {words}")
        terms = {r[0]: r for r in _tables(part)[0][1:]}
        assert set(terms) == {"bn", "conv", "bn:conv"}
        # the numbers are cnnlab.factorial's on this mode's accuracies
        from cnnlab.factorial import analyze_grid

        values = {v: {s: r[f"test_accuracy_{mode}"] for (vv, s), r in info["results"].items() if vv == v}
                  for v in cells}
        fac = analyze_grid(data["grid"], data["cells"], values)
        assert terms["bn:conv"][3] == stats.format_p(fac.term("bn:conv").p)
        assert fac.term("bn:conv").verdict in part
        assert f"interaction-{mode}-" in part
    assert len(list((info["dir"] / "report_files").glob("interaction-*.png"))) == 2
    # rebuilt from the stored results: byte for byte
    before = md_path.read_bytes()
    build_report(info["dir"])
    assert md_path.read_bytes() == before
