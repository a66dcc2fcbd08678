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
    assert one.n == 1 and one.mean_diff == 0.5 and math.isnan(one.p)
    none = stats.paired({0: 1.0}, {1: 1.0})
    assert none.n == 0 and math.isnan(none.mean_diff)


def test_paired_identical_differences():
    # every seed differs by exactly 0.5: sd = 0, the difference is certain -> p = 0
    p = stats.paired({0: 1.5, 1: 2.5, 2: 3.5}, {0: 1.0, 1: 2.0, 2: 3.0})
    assert p.sd_diff == 0 and p.p == 0.0 and (p.ci_low, p.ci_high) == (0.5, 0.5)
    # identical values: no difference at all -> p = 1, nothing to resolve
    z = stats.paired({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})
    assert z.mean_diff == 0 and z.p == 1.0


# ---------------------------------------------------------------------------- decisions, fixed n

LAB = ({0: 98.0, 1: 98.2, 2: 97.9, 3: 98.1}, {0: 80.0, 1: 87.0, 2: 75.0, 3: 85.0})


def test_fixed_decision_uses_the_bonferroni_t_interval():
    # differences 18.0, 11.2, 22.9, 13.1: mean 16.3, sd 5.2555..., se = sd / 2
    # m = 4 -> alpha 0.0125 each -> t_{1 - 0.00625, 3} = 5.392 (the textbook t table's 0.99375
    # quantile at 3 df lies between t_.99 = 4.541 and t_.995 = 5.841)
    pr = stats.paired(*LAB)
    d = stats.decide(pr, 0.5, m=4, sequential=False)
    sd = float(np.std([18.0, 11.2, 22.9, 13.1], ddof=1))
    half = st.t.ppf(1 - 0.0125 / 2, 3) * sd / 2
    assert 4.541 < st.t.ppf(1 - 0.0125 / 2, 3) < 5.841
    assert (d.ci_low, d.ci_high) == pytest.approx((16.3 - half, 16.3 + half))
    assert d.kind == "a" and d.level == pytest.approx(0.9875) and d.m == 4
    # the adjusted p is Bonferroni's m * p, and it is below alpha exactly when the interval excludes 0
    assert d.p == pytest.approx(min(1, 4 * pr.p))
    assert (d.p <= 0.05) == (d.ci_low > 0)


def test_decision_kinds_and_margin():
    diffs = [0.1, -0.2, 0.15, -0.05, 0.0, 0.12, -0.1, 0.05]  # mean 0.00875, sd 0.12
    close = stats.paired({i: 90 + d for i, d in enumerate(diffs)}, {i: 90.0 for i in range(8)})
    eq = stats.decide(close, 0.5)
    assert eq.kind == "equivalent" and -0.5 < eq.ci_low and eq.ci_high < 0.5
    assert stats.decide(close, 0.0).kind != "equivalent"  # no margin: nothing is equivalent
    noisy = stats.paired({0: 90.0, 1: 80.0, 2: 85.0}, {0: 84.0, 1: 86.0, 2: 85.0})
    d = stats.decide(noisy, 0.5)
    assert d.kind == "undetermined" and d.ci_low < 0 < d.ci_high and d.more is None or d.more > 0
    b = stats.decide(stats.paired(LAB[1], LAB[0]), 0.5)
    assert b.kind == "b" and b.ci_high < 0
    assert stats.verdict_text("p025", "bn", stats.decide(stats.paired(*LAB), 0.5)).startswith("p025 better by 16.30 pts [")
    assert stats.verdict_text("bn", "p025", b, detail=False) == "p025 better by 16.30 pts"


def test_projected_seeds_resolve_at_the_projected_n():
    # if the mean and sd stay as observed, the interval at n + more excludes 0 and at n + more - 1 does not
    for seq in (False, True):
        mean, sd, n, alpha = 3.0, 4.0, 4, 0.05
        more = stats.seeds_more(mean, sd, n, alpha, seq, 0.5)
        assert more is not None and more > 0
        mult = (lambda k: stats.anytime_t(k, alpha)) if seq else (lambda k: st.t.ppf(1 - alpha / 2, k - 1))
        assert mult(n + more) * sd / math.sqrt(n + more) < mean <= mult(n + more - 1) * sd / math.sqrt(n + more - 1)


def test_too_few_seeds_and_degenerate_differences():
    assert stats.decide(stats.paired({0: 1.0}, {0: 0.0}), 0.5).kind == "undetermined"
    assert "at least 2" in stats.verdict_text("a", "b", stats.decide(stats.paired({0: 1.0}, {0: 0.0}), 0.5))
    assert stats.verdict_text("a", "b", stats.decide(stats.paired({}, {}), 0.5)) == "no seed finished on both sides"
    same = stats.paired({0: 1.5, 1: 2.5, 2: 3.5}, {0: 1.0, 1: 2.0, 2: 3.0})  # every seed differs by exactly 0.5
    assert stats.decide(same, 0.1).kind == "a"
    # sequentially, 3 seeds can give no interval at all, whatever the data: nothing is resolved
    d = stats.decide(same, 0.1, m=4, sequential=True)
    assert d.kind == "undetermined" and math.isnan(d.ci_low)


# ---------------------------------------------------------------------------- the sequential e-value

def _e_by_quadrature(x: np.ndarray, mixture) -> float:
    """The safe t-test's e-value from its definition: the Bayes factor of N(dz*sigma, sigma^2)
    (dz = +-d with weight w/2 each) against N(0, sigma^2), sigma integrated out under the right
    Haar prior 1/sigma, by quadrature over log sigma."""
    from scipy import integrate

    def lik(mu_over_sigma):
        def f(logs):
            s = math.exp(logs)
            return math.exp(np.sum(st.norm.logpdf(x, mu_over_sigma * s, s)) + 40)  # scaled: cancels
        return integrate.quad(f, -8, 8, limit=400, epsabs=0, epsrel=1e-10)[0]

    return sum(w / 2 * (lik(dz) + lik(-dz)) for dz, w in mixture) / lik(0.0)


@pytest.mark.parametrize("x", [[1.2, 0.3, 2.1, 1.7], [0.5, -0.2, 0.1, 0.4, -0.3, 0.2], [3.0, 2.5, 4.1]])
def test_e_value_closed_form_equals_its_definition(x):
    x = np.asarray(x)
    n = len(x)
    t = x.mean() / (x.std(ddof=1) / math.sqrt(n))
    for mixture in (((1.0, 1.0),), ((2.0, 1.0),), stats.MIXTURE):
        assert math.exp(stats.log_e_value(t, n, mixture)) == pytest.approx(_e_by_quadrature(x, mixture), rel=1e-6)


def test_anytime_multiplier_inverts_the_e_value():
    for n in (5, 8, 20):
        for alpha in (0.05, 0.0125):
            tstar = stats.anytime_t(n, alpha)
            assert stats.log_e_value(tstar, n) == pytest.approx(math.log(1 / alpha), abs=1e-8)
            assert tstar > st.t.ppf(1 - alpha / 2, n - 1)  # wider than fixed-n: the price of looking
    assert math.isinf(stats.anytime_t(3, 0.05)) and math.isinf(stats.anytime_t(4, 0.0125))
    # any real difference is resolvable in the end: the half-width in sd units shrinks with n
    assert stats.anytime_t(400, 0.0125) / math.sqrt(400) < 0.3


def test_format_p():
    assert [stats.format_p(p) for p in (0.41, 0.1, 0.05, 0.012, 0.0031, 0.0004, 1.0, math.nan)] == [
        "0.41", "0.10", "0.05", "0.012", "0.0031", "< 0.001", "1.00", "n/a"]
