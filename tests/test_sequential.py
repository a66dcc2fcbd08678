"""Seeds until resolved: the sequential rule's error rates and speed by simulation (no training),
the rounds on real code paths, and a real study that stops, continues and re-runs as a no-op.

The simulated accuracies are shaped like the lab's (eval mode, 10 epochs, MNIST): the p = 0.75
BatchNorm network mostly near 84% with collapses to 55-75% in about one seed in seven (seeds
0-2 gave 74.7-87.3 on one machine), the p = 0.25 one at 98.1 +- 0.34.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import write_tiny_study

from cnnlab import stats
from cnnlab.study import Comparison, Stopping, Study, decide_all, next_round

ALPHA = stats.ALPHA
N0, MAX = 3, 20


def bn_arm(rng, size):
    """Accuracies like the p = 0.75 BN network's in eval mode: heavy left tail."""
    base = rng.normal(84.0, 4.0, size)
    return np.where(rng.random(size) < 0.15, rng.uniform(55.0, 75.0, size), base)


def student_t_arm(rng, size):
    return 90.0 + 2.0 * rng.standard_t(2, size)  # infinite variance


def sequential(diffs: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """The rule of stats.decide on each row of paired differences, looked at after every seed
    from N0 to MAX: (kind per study: 1 A better, -1 B better, 0 not, stopping n)."""
    sims = diffs.shape[0]
    kind, stop = np.zeros(sims, int), np.full(sims, MAX)
    open_ = np.ones(sims, bool)
    for n in range(N0, MAX + 1):
        x = diffs[:, :n]
        half = stats.anytime_t(n, alpha) * x.std(axis=1, ddof=1) / math.sqrt(n)
        mean = x.mean(axis=1)
        better = np.sign(mean) * ((mean - half > 0) | (mean + half < 0))
        hit = open_ & (better != 0)
        kind[hit], stop[hit] = better[hit], n
        open_ &= ~hit
    return kind, stop


def mc_bound(p: float, sims: int) -> float:
    return p + 3 * math.sqrt(p * (1 - p) / sims)


@pytest.mark.parametrize("arm", [bn_arm, student_t_arm, lambda rng, size: rng.normal(90.0, 6.3, size)],
                         ids=["lab-shaped", "student-t2", "normal"])
def test_false_better_rate_under_the_null_stays_below_alpha(arm):
    # identical variants: every "better" verdict is false. 4000 studies, looked at after every seed.
    rng = np.random.default_rng(17)
    sims = 4000
    diffs = arm(rng, (sims, MAX)) - arm(rng, (sims, MAX))
    kind, _ = sequential(diffs, ALPHA)
    assert np.mean(kind != 0) <= mc_bound(ALPHA, sims)
    # a fixed-n t-test looked at the same way is what the sequential interval protects against
    fixed_rate = 0.0
    for n in range(N0, MAX + 1):
        x = diffs[:, :n]
        tcrit = stats.t_interval(0.0, 1.0, n, 1 - ALPHA)[1] * math.sqrt(n)
        fixed_rate = max(fixed_rate, np.mean(np.abs(x.mean(1)) / (x.std(1, ddof=1) / math.sqrt(n)) > tcrit))
    assert fixed_rate < 0.1  # one look is fine ...
    peeking = np.zeros(sims, bool)
    for n in range(N0, MAX + 1):
        x = diffs[:, :n]
        lo, hi = stats.t_interval(0.0, 1.0, n)
        peeking |= np.abs(x.mean(1)) / (x.std(1, ddof=1) / math.sqrt(n)) > hi * math.sqrt(n)
    if arm is not student_t_arm:
        assert peeking.mean() > 2 * ALPHA  # ... but peeking after every seed is not


def test_family_of_four_null_comparisons_keeps_the_familywise_rate():
    # four comparisons, each at alpha / 4 (Bonferroni): no false verdict in any of them, 95% of studies
    rng = np.random.default_rng(3)
    sims = 2000
    any_false = np.zeros(sims, bool)
    for _ in range(4):
        kind, _ = sequential(bn_arm(rng, (sims, MAX)) - bn_arm(rng, (sims, MAX)), ALPHA / 4)
        any_false |= kind != 0
    assert any_false.mean() <= mc_bound(ALPHA, sims)


def test_a_true_ten_point_difference_resolves_in_a_median_of_at_most_six_seeds():
    # 10 points with the spread of the p = 0.75 network (sd 6.3: seeds 0-2 spanned 74.7-87.3)
    rng = np.random.default_rng(5)
    sims = 2000
    kind, stop = sequential(rng.normal(10.0, 6.3, (sims, MAX)), ALPHA)
    assert np.median(stop) <= 6
    assert np.mean(kind == 1) > 0.95 and np.all(kind >= 0)
    # the lab's dropout question among its four: p = 0.25 against the heavy-tailed p = 0.75 network
    a = rng.normal(98.1, 0.34, (sims, MAX))
    kind, stop = sequential(a - bn_arm(rng, (sims, MAX)), ALPHA / 4)
    assert np.median(stop) <= 7 and np.mean(kind == 1) > 0.95


def test_the_rounds_on_the_real_code_path_match_the_rule():
    # decide_all + next_round, as the runner calls them, over simulated studies of the lab's shape:
    # which comparisons get seeds, when they stop, and the verdicts, against the vectorized rule
    rng = np.random.default_rng(11)
    names = ["bn", "nobn", "p025"]
    comps = {"bn": Comparison(("bn",), ("nobn",)), "dropout": Comparison(("p025",), ("bn",))}
    study = Study("sim", list(range(N0)), {v: None for v in names}, comps, Stopping(True, 12, 1))
    for _ in range(25):
        acc = {"bn": bn_arm(rng, 12), "nobn": rng.normal(92.7, 2.3, 12), "p025": rng.normal(98.1, 0.34, 12)}
        seeds = {v: list(range(N0)) for v in names}
        while True:
            got = {v: {s: float(acc[v][s]) for s in seeds[v]} for v in names}
            decisions = decide_all(comps, got, sequential=True)
            add = next_round(study, seeds, decisions)
            if not add:
                break
            for v, ss in add.items():
                seeds[v] = sorted(seeds[v] + ss)
        # every comparison is resolved, or its variants ran every seed of the budget
        for name, c in comps.items():
            d = decisions[name][1]
            assert d.resolved or all(seeds[v] == list(range(12)) for v in c.variants)
            # the verdict is the rule's on the seeds it saw
            diffs = np.array([acc[c.a[0]][s] - acc[c.b[0]][s] for s in range(d.n)])
            half = stats.anytime_t(d.n, ALPHA / 2) * diffs.std(ddof=1) / math.sqrt(d.n)
            assert (d.ci_low, d.ci_high) == pytest.approx((diffs.mean() - half, diffs.mean() + half))
        # a variant gets seeds only while a comparison that needs it is open
        assert len(seeds["nobn"]) <= max(len(seeds["bn"]), len(seeds["p025"]))


def test_a_round_adds_step_seeds_once_however_many_open_comparisons_share_a_variant():
    und = stats.decide(stats.paired({0: 1.0, 1: 2.0}, {0: 1.5, 1: 1.0}), 0.5)
    assert not und.resolved
    names = ["t25", "f25", "t75", "f75", "other"]
    comps = {"bn25": Comparison(("t25",), ("f25",)), "bn75": Comparison(("t75",), ("f75",)),
             "inter": Comparison(("t75", "f75"), ("t25", "f25"))}
    seeds = {v: [0, 1, 2] for v in names}
    for step, expected in ((1, [3]), (2, [3, 4])):
        study = Study("s", [0, 1, 2], {v: None for v in names}, comps, Stopping(True, 8, step))
        add = next_round(study, seeds, {c: (None, und) for c in comps})
        assert add == {v: expected for v in ("t25", "f25", "t75", "f75")}  # "other" is in no open comparison
    # a failed seed stays tried: the next seed is the first untried one, within the budget
    seeds = {"t25": [0, 1, 2, 3], "f25": [0, 1, 2], "t75": list(range(8)), "f75": list(range(8)), "other": []}
    study = Study("s", [0, 1, 2], {v: None for v in names}, comps, Stopping(True, 8, 1))
    assert next_round(study, seeds, {c: (None, und) for c in comps}) == {"f25": [3]}
    resolved = stats.decide(stats.paired({i: 10.0 + i % 2 for i in range(8)}, {i: 0.0 for i in range(8)}), 0.5)
    assert next_round(study, seeds, {c: (None, resolved) for c in comps}) == {}


def test_an_interaction_contrast_is_one_paired_difference_per_seed():
    acc = {"a1": {0: 90.0, 1: 91.0, 2: 92.0}, "a2": {0: 80.0, 1: 80.0, 2: 81.0},
           "b1": {0: 95.0, 1: 95.0, 2: 96.0}, "b2": {0: 94.0, 1: 94.5}}
    c = Comparison(("a1", "a2"), ("b1", "b2"))
    a, b = c.sides(acc)
    assert a == {0: 10.0, 1: 11.0, 2: 11.0} and b == {0: 1.0, 1: 0.5}
    pr = stats.paired(a, b)
    assert pr.n == 2 and pr.mean_diff == pytest.approx((9.0 + 10.5) / 2)
    assert c.label_a == "(a1 − a2)"


# ---------------------------------------------------------------------------- a real study

def _results(out):
    return {str(p.parent.relative_to(out / "runs")): p.stat().st_mtime_ns
            for p in sorted((out / "runs").glob("*/seed-*/result.json"))}


def test_a_study_until_resolved_stops_continues_and_reruns_as_a_noop(tmp_path, idx_dir, capsys):
    from cnnlab.cli import main

    out = tmp_path / "out"
    study = write_tiny_study(tmp_path / "seq.toml", idx_dir, extra='c = { model = { preset = "lab2-2c3f", conv_dropout = 0.25 } }')
    # 2 seeds give no interval yet, nor 3: the budget of 3 is spent with the comparison open
    assert main(["study", str(study), "--out", str(out), "--until-resolved", "--max-seeds", "3"]) == 0
    text = capsys.readouterr().out
    assert "round 1: 0 of 1 comparisons resolved; next: b seed 2, a seed 2" in text
    assert "budget spent (max_seeds = 3)" in text
    first = _results(out)
    # c is in no comparison: it keeps the first round's seeds only
    assert sorted(first) == ["a/seed-0", "a/seed-1", "a/seed-2", "b/seed-0", "b/seed-1", "b/seed-2",
                             "c/seed-0", "c/seed-1"]
    sj = json.loads((out / "study.json").read_text())
    assert sj["variant_seeds"] == {"a": [0, 1, 2], "b": [0, 1, 2], "c": [0, 1]}
    assert sj["stopping"] == {"until_resolved": True, "max_seeds": 3, "step": 1}
    rep = (out / "report.md").read_text()
    assert "## Verdicts" in rep and "undetermined after 3 seeds" in rep
    assert "budget of 3 seeds per variant is spent" in rep
    # a larger budget continues where the study stopped; finished runs are not trained again
    assert main(["study", str(study), "--out", str(out), "--until-resolved", "--max-seeds", "4"]) == 0
    second = _results(out)
    assert {k: second[k] for k in first} == first
    assert set(second) - set(first) == {"a/seed-3", "b/seed-3"}
    # the same again: nothing to train, the report rebuilt byte for byte
    before = (out / "report.md").read_bytes()
    assert main(["study", str(study), "--out", str(out), "--until-resolved", "--max-seeds", "4"]) == 0
    assert "0 runs trained, 10 already finished" in capsys.readouterr().out
    assert _results(out) == second and (out / "report.md").read_bytes() == before
    # a sequential study directory cannot be re-read as a fixed-n one
    assert main(["study", str(study), "--out", str(out)]) == 2
    assert "run it with --until-resolved" in capsys.readouterr().err


def test_bad_stopping_and_comparison_input_is_one_clear_error(tmp_path):
    from cnnlab.errors import ConfigError
    from cnnlab.study import study_from_dict

    base = {"name": "x", "variants": {"a": {}, "b": {}}, "comparisons": {"ab": ["a", "b"]}}
    cases = [
        ({"stopping": {"until_resolved": "yes"}}, "stopping.until_resolved must be true or false"),
        ({"stopping": {"max_seeds": 1}}, "stopping.max_seeds must be an integer >= 2"),
        ({"stopping": {"patience": 3}}, "unknown key(s) patience"),
        ({"stopping": {"until_resolved": True, "max_seeds": 2}}, "exceed the budget of max_seeds = 2"),
        ({"stopping": {"until_resolved": True}, "comparisons": {}}, "needs [comparisons]"),
        ({"margin": -1}, "margin must be a number of percentage points"),
        ({"comparisons": {"ab": {"a": "a", "b": "b", "margin": "wide"}}}, "comparisons.ab: margin"),
        ({"comparisons": {"ab": [["a", "b"], "a"]}}, "a difference with a difference"),
        ({"comparisons": {"ab": [["a", "a"], ["a", "b"]]}}, "a − a is zero"),
        ({"comparisons": {"ab": ["a", "z"]}}, "unknown variant(s) z"),
        ({"grid": {"bn": [True, False]}}, "[grid] needs at least two factors"),
        ({"grid": {"bn": [True, False], "colour": [1, 2]}}, "unknown factor 'colour'"),
        ({"grid": {"bn": [True], "conv_dropout": [0.25, 0.5]}}, "grid.bn must list two or more levels"),
        ({"grid": {"bn": [True, False], "lr": [0.001, 0.001]}}, "grid.lr has duplicate levels"),
    ]
    for diff, message in cases:
        with pytest.raises(ConfigError) as e:
            study_from_dict({**base, **diff}, "s.toml")
        assert message in str(e.value) and str(e.value).startswith("s.toml")


def test_a_grid_expands_into_named_cells_beside_explicit_variants():
    from cnnlab.study import study_from_dict

    s = study_from_dict({"name": "g", "base": {"model": {"preset": "lab2-3c3f-bn"}},
                         "grid": {"bn": [True, False], "model.conv_dropout": [0.25, 0.75]},
                         "variants": {"lab": {"model": {"preset": "lab2-2c2f"}}},
                         "comparisons": {"i": [["bn=true,conv_dropout=0.75", "bn=false,conv_dropout=0.75"],
                                               ["bn=true,conv_dropout=0.25", "bn=false,conv_dropout=0.25"]]}})
    assert list(s.variants) == ["bn=true,conv_dropout=0.25", "bn=true,conv_dropout=0.75",
                                "bn=false,conv_dropout=0.25", "bn=false,conv_dropout=0.75", "lab"]
    cell = s.variants["bn=false,conv_dropout=0.75"].model
    assert not any(b.bn for b in cell.conv + cell.fc) and all(b.dropout == 0.75 for b in cell.conv)
    assert s.cells["bn=true,conv_dropout=0.25"] == {"bn": True, "model.conv_dropout": 0.25}
    assert s.grid == {"bn": [True, False], "model.conv_dropout": [0.25, 0.75]}
    assert s.comparisons["i"].label_a == "(bn=true,conv_dropout=0.75 − bn=false,conv_dropout=0.75)"
