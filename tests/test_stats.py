"""cnnlab.stats against numbers worked out by hand (the arithmetic is written out)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st

from cnnlab import stats

T975 = {1: 12.706204736174707, 2: 4.302652729749464, 3: 3.182446305284263, 4: 2.7764451051977934}


def test_t_quantiles_used_below_are_the_textbook_ones():
    for df, t in T975.items():
        assert st.t.ppf(0.975, df) == pytest.approx(t, rel=1e-12)


# ---------------------------------------------------------------------------- summarize

def test_summarize_by_hand():
    # values 1, 2, 3, 4: mean 10/4 = 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5,
    # sd = sqrt(5 / (4 - 1)) = sqrt(5/3) = 1.2909944...; standard error = sd / sqrt(4) = 0.6454972...
    # half-width = t_{0.975, 3} * se = 3.182446305 * 0.6454972 = 2.0542603...
    # CI = [2.5 - 2.0542603, 2.5 + 2.0542603] = [0.4457397, 4.5542603]
    s = stats.summarize([1, 2, 3, 4])
    sd = math.sqrt(5 / 3)
    half = T975[3] * sd / 2
    assert s.n == 4
    assert s.mean == 2.5
    assert s.std == pytest.approx(sd, rel=1e-12)
    assert half == pytest.approx(2.0542603, abs=1e-7)
    assert (s.ci_low, s.ci_high) == pytest.approx((2.5 - half, 2.5 + half), rel=1e-12)
    assert (s.ci_low, s.ci_high) == pytest.approx((0.4457397, 4.5542603), abs=1e-7)


def test_summarize_three_seeds_percent():
    # 87.0, 88.0, 89.5: mean 264.5/3 = 88.1666...; deviations -1.1667, -0.1667, 1.3333;
    # squares 1.36111 + 0.02778 + 1.77778 = 3.16667; sd = sqrt(3.16667/2) = 1.25831
    # half = 4.302653 * 1.25831 / sqrt(3) = 3.12580 -> CI [85.0409, 91.2925]
    s = stats.summarize([87.0, 88.0, 89.5])
    assert s.mean == pytest.approx(88.1666667, abs=1e-7)
    assert s.std == pytest.approx(1.2583057, abs=1e-7)
    assert (s.ci_low, s.ci_high) == pytest.approx((85.0408623, 91.2924710), abs=1e-6)
    assert s.describe() == "88.17 ± 1.26% (95% CI [85.04, 91.29], n = 3)"


def test_summarize_one_seed_has_no_interval():
    s = stats.summarize([87.86])
    assert s.n == 1 and s.mean == 87.86
    assert math.isnan(s.std) and math.isnan(s.ci_low) and math.isnan(s.ci_high)
    assert "1 seed: no interval" in s.describe()


def test_summarize_empty_and_nan():
    s = stats.summarize([])
    assert s.n == 0 and math.isnan(s.mean)
    assert s.describe() == "no finished runs"
    with pytest.raises(ValueError):
        stats.summarize([1.0, float("nan")])


# ---------------------------------------------------------------------------- holm

def test_holm_by_hand():
    # sorted: 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> running max 0.06)
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_holm_caps_at_one_and_is_monotone():
    # sorted 0.2 (x3 = 0.6), 0.5 (x2 = 1.0), 0.7 (x1 = 0.7 -> max 1.0); capped at 1
    assert stats.holm([0.5, 0.2, 0.7]) == pytest.approx([1.0, 0.6, 1.0])
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 0.2, size=12)
    adj = np.array(stats.holm(p))
    order = np.argsort(p)
    assert np.all(np.diff(adj[order]) >= 0)
    assert np.all(adj >= p) and np.all(adj <= 1)


def test_holm_skips_nan_and_handles_ties():
    # the NaN comparison had no test: m = 2, not 3
    out = stats.holm([0.02, float("nan"), 0.04])
    assert out[0] == pytest.approx(0.04) and out[2] == pytest.approx(0.04) and math.isnan(out[1])
    assert stats.holm([0.01, 0.01]) == pytest.approx([0.02, 0.02])
    assert stats.holm([]) == []


# ---------------------------------------------------------------------------- paired

def test_paired_by_hand_on_matched_seeds_only():
    a = {0: 88.0, 1: 87.0, 2: 89.0, 7: 99.0}  # seed 7 has no partner: ignored
    b = {0: 86.5, 1: 86.0, 2: 86.5, 5: 10.0}  # seed 5 has no partner: ignored
    # differences 1.5, 1.0, 2.5: mean 5/3 = 1.6667; deviations -0.1667, -0.6667, 0.8333;
    # squares 0.02778 + 0.44444 + 0.69444 = 1.16667; sd = sqrt(1.16667/2) = 0.763763
    # se = 0.763763 / sqrt(3) = 0.440959; t = 1.6667 / 0.440959 = 3.779645
    # half = 4.302653 * 0.440959 = 1.897292 -> CI [-0.230625, 3.563958]
    p = stats.paired(a, b)
    assert p.seeds == (0, 1, 2) and p.n == 3
    assert p.mean_diff == pytest.approx(5 / 3)
    assert p.sd_diff == pytest.approx(math.sqrt(7 / 12))
    assert p.t == pytest.approx(3.779645, abs=1e-6)
    assert (p.ci_low, p.ci_high) == pytest.approx((-0.230625, 3.563958), abs=1e-6)
    ref = st.ttest_rel([88.0, 87.0, 89.0], [86.5, 86.0, 86.5])
    assert p.p == pytest.approx(ref.pvalue, rel=1e-10)
    assert p.effect_size == pytest.approx((5 / 3) / math.sqrt(7 / 12))


def test_paired_one_and_zero_matched_seeds():
    one = stats.paired({0: 1.0, 1: 2.0}, {1: 1.5})
    assert one.n == 1 and one.mean_diff == 0.5 and math.isnan(one.p) and one.seeds_needed is None
    none = stats.paired({0: 1.0}, {1: 1.0})
    assert none.n == 0 and math.isnan(none.mean_diff)


def test_paired_identical_differences():
    # every seed differs by exactly 0.5: sd = 0, the difference is certain -> p = 0
    p = stats.paired({0: 1.5, 1: 2.5, 2: 3.5}, {0: 1.0, 1: 2.0, 2: 3.0})
    assert p.sd_diff == 0 and p.p == 0.0 and (p.ci_low, p.ci_high) == (0.5, 0.5)
    assert p.seeds_needed == 2
    # identical values: no difference at all -> p = 1, nothing to resolve
    z = stats.paired({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})
    assert z.mean_diff == 0 and z.p == 1.0 and z.seeds_needed is None
    assert z.seeds_needed_text == ">1000"


# ---------------------------------------------------------------------------- seeds needed

def test_seeds_needed_textbook_values():
    # G*Power, "t tests - means: difference between two dependent means (matched pairs)",
    # two tails, alpha 0.05, power 0.80: dz = 1.0 -> 10, dz = 0.8 -> 15, dz = 0.5 -> 34.
    assert stats.seeds_needed(1.0) == 10
    assert stats.seeds_needed(0.8) == 15
    assert stats.seeds_needed(0.5) == 34
    # the power just below and at n = 10 for dz = 1: 0.748 and 0.803
    assert stats.paired_power(1.0, 9) < 0.8 <= stats.paired_power(1.0, 10)
    assert stats.paired_power(1.0, 10) == pytest.approx(0.8031, abs=1e-4)


def test_seeds_needed_monotone_and_capped():
    effects = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 3.0]
    needed = [stats.seeds_needed(d) for d in effects]
    assert needed == sorted(needed, reverse=True)
    assert stats.seeds_needed(-1.0) == stats.seeds_needed(1.0)  # sign does not matter
    assert stats.seeds_needed(0.0) is None
    assert stats.seeds_needed(0.05) is None  # would need ~3100 seeds: above the cap
    assert stats.seeds_needed(math.inf) == 2
    assert stats.seeds_needed(math.nan) is None


# ---------------------------------------------------------------------------- verdict

def test_verdict_distinguishable():
    pr = stats.paired({0: 88.0, 1: 89.0, 2: 88.5, 3: 89.2}, {0: 86.1, 1: 87.3, 2: 86.8, 3: 87.2})
    text = stats.verdict("BN vs no BN", pr, 0.012)
    assert text.startswith(f"BN vs no BN: +{pr.mean_diff:.2f} pts [{pr.ci_low:.2f}, {pr.ci_high:.2f}]")
    assert text.endswith("distinguishable from seed noise (Holm p = 0.012)")


def test_verdict_not_distinguishable_says_seeds_needed():
    pr = stats.paired({0: 88.0, 1: 87.0, 2: 88.6}, {0: 87.5, 1: 87.4, 2: 87.9})
    text = stats.verdict("BN vs no BN", pr, 0.41)
    assert "not distinguishable from seed noise with 3 seeds (Holm p = 0.41)" in text
    assert f"about {pr.seeds_needed} seeds would be needed to resolve a difference of this size" in text


def test_verdict_borderline_after_holm():
    # differences 1.0, 1.2, 0.8, 1.1, 0.9: mean 1.0, sd 0.158 -> dz 6.3, 2 seeds would do, p ~ 1e-5;
    # a Holm p above 0.05 (many comparisons) makes it borderline, not "needs more seeds than it has"
    pr = stats.paired({i: 10 + d for i, d in enumerate([1.0, 1.2, 0.8, 1.1, 0.9])}, {i: 10.0 for i in range(5)})
    assert pr.seeds_needed is not None and pr.seeds_needed <= pr.n
    text = stats.verdict("x", pr, 0.08)
    assert "not distinguishable" in text and "borderline" in text and "would be needed" not in text


def test_verdict_edge_cases():
    assert "1 matched seed: no interval" in stats.verdict("x", stats.paired({0: 1.0}, {0: 0.0}), math.nan)
    assert "nothing to compare" in stats.verdict("x", stats.paired({}, {}), math.nan)
    z = stats.paired({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})
    assert "more than 1000 seeds" in stats.verdict("x", z, 1.0)
    assert "p < 0.001" in stats.verdict("x", stats.paired({0: 1.5, 1: 2.5}, {0: 1.0, 1: 2.0}), 0.0)


def test_format_p():
    assert [stats.format_p(p) for p in (0.41, 0.1, 0.05, 0.012, 0.0031, 0.0004, 1.0, math.nan)] == [
        "0.41", "0.10", "0.05", "0.012", "0.0031", "< 0.001", "1.00", "n/a"]
