"""cnnlab.factorial against published and hand-computed numbers, robust tests by simulation.

References:
- R's `npk` data (Yates' 2^3 N, P, K factorial in 6 blocks of 4 plots; Venables & Ripley,
  MASS, 4th ed. p. 165; R `?npk` and `example(aov)`), whose `summary(aov(yield ~ block + N*P*K))`
  table is printed in those sources.
- A balanced two-way design in complete blocks, checked against the textbook sums-of-squares
  formulas written out below (plain numpy means, no model fitting).
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as st

from cnnlab.errors import ConfigError
from cnnlab.factorial import analyze_grid

# ---------------------------------------------------------------------------- npk

# R datasets::npk, 24 rows in R's order (block = gl(6, 4)); the same vectors are written out in
# R's `example(aov)` ("From Venables and Ripley (2002) p.165") and sfsmisc's compresid2way example.
NPK_N = [0, 1, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0, 1, 1, 0, 0, 1, 0, 1, 0, 1, 1, 0, 0]
NPK_P = [1, 1, 0, 0, 0, 1, 0, 1, 1, 1, 0, 0, 0, 1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0]
NPK_K = [1, 0, 0, 1, 0, 1, 1, 0, 0, 1, 0, 1, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0, 1, 0]
NPK_YIELD = [49.5, 62.8, 46.8, 57.0, 59.8, 58.5, 55.5, 56.0, 62.8, 55.8, 69.5, 55.0,
             62.0, 48.8, 45.5, 44.2, 52.0, 51.5, 49.8, 48.8, 57.2, 59.0, 53.2, 56.0]
NPK_BLOCK = [i // 4 + 1 for i in range(24)]

# summary(aov(yield ~ block + N*P*K, npk)) as published (N:P:K is aliased with blocks, 0 df):
#             Df Sum Sq Mean Sq F value  Pr(>F)
# block        5  343.3   68.66   4.447 0.01594
# N            1  189.3  189.28  12.259 0.00437
# P            1    8.4    8.40   0.544 0.47490
# K            1   95.2   95.20   6.166 0.02880
# N:P          1   21.3   21.28   1.378 0.26317
# N:K          1   33.1   33.14   2.146 0.16865
# P:K          1    0.5    0.48   0.031 0.86275
# Residuals   12  185.3   15.44
# (Sums of squares to two decimals: block 343.29, N 189.28, P 8.40, K 95.20, N:P 21.28,
# N:K 33.14, P:K 0.48, Residuals 185.29; N p = 0.004372, K p = 0.028795.)


def npk_grid():
    factors = {"N": [0, 1], "P": [0, 1], "K": [0, 1]}
    cells = {f"n{n}p{p}k{k}": {"N": n, "P": p, "K": k} for n in (0, 1) for p in (0, 1) for k in (0, 1)}
    values = {v: {} for v in cells}
    for n, p, k, b, y in zip(NPK_N, NPK_P, NPK_K, NPK_BLOCK, NPK_YIELD):
        values[f"n{n}p{p}k{k}"][b] = y  # the block plays the part of the seed
    return factors, cells, values


def test_npk_data_is_yates_design():
    # each block is a half replicate: 4 plots, each (N, P, K) combination 3 times in all
    assert len(NPK_YIELD) == 24 and sum(NPK_YIELD) / 24 == pytest.approx(54.875)  # R: mean(npk$yield)
    combos = list(zip(NPK_N, NPK_P, NPK_K))
    assert all(combos.count(c) == 3 for c in itertools.product((0, 1), repeat=3))
    for b in range(6):
        block = combos[4 * b:4 * b + 4]
        assert len(set(block)) == 4
        assert len({(n + p + k) % 2 for n, p, k in block}) == 1  # N:P:K confounded with blocks


def test_npk_classical_anova_matches_published_table():
    fac = analyze_grid(*npk_grid(), robust=None)
    ss = {r["source"]: r for r in fac.anova}
    published = {"block": (5, 343.29), "N": (1, 189.28), "P": (1, 8.40), "K": (1, 95.20),
                 "N:P": (1, 21.28), "N:K": (1, 33.14), "P:K": (1, 0.48), "Residuals": (12, 185.29)}
    assert [r["source"] for r in fac.anova] == list(published)
    for src, (df, s) in published.items():
        assert ss[src]["df"] == df, src
        # the table is rounded to 2 decimals; N:K is 33.135 exactly, which float sums put on
        # either side of the rounding point depending on the CPU's summation order
        assert abs(ss[src]["sum_sq"] - s) <= 0.005 + 1e-9, src
    assert abs(ss["Residuals"]["mean_sq"] - 15.44) <= 0.005 + 1e-9
    assert fac.df_resid == 12 and fac.n_obs == 24
    assert round(ss["N"]["F"], 3) == pytest.approx(12.259)
    assert round(ss["N"]["p"], 6) == pytest.approx(0.004372)
    assert round(ss["K"]["F"], 3) == pytest.approx(6.166)
    assert round(ss["K"]["p"], 6) == pytest.approx(0.028795)
    # the rest of the published F column, to its printed digits
    for src, F, p in [("block", 4.447, 0.01594), ("P", 0.544, 0.47490), ("N:P", 1.378, 0.26317),
                      ("N:K", 2.146, 0.16865), ("P:K", 0.031, 0.86275)]:
        assert round(ss[src]["F"], 3) == pytest.approx(F), src
        assert round(ss[src]["p"], 5) == pytest.approx(p), src
    # with robust=None the terms' tests are the classical table's
    assert fac.robust == "classical"
    for t in fac.terms:
        assert (t.df_num, t.stat, t.df_den, t.p) == (ss[t.name]["df"], ss[t.name]["F"], 12, ss[t.name]["p"])
    # main effect of N: mean yield with N minus without (each over 12 plots); its SS is 24/4 * d^2
    n1 = sum(y for n, y in zip(NPK_N, NPK_YIELD) if n) / 12
    n0 = sum(y for n, y in zip(NPK_N, NPK_YIELD) if not n) / 12
    assert fac.effect("N=1 - N=0").estimate == pytest.approx(n1 - n0, abs=1e-10)
    assert n1 - n0 == pytest.approx(5.616667, abs=1e-6)
    assert 24 / 4 * (n1 - n0) ** 2 == pytest.approx(ss["N"]["sum_sq"], rel=1e-12)


def test_npk_robust_interaction_matches_statsmodels_anova_lm():
    # independent path: statsmodels' formula API and anova_lm(typ=2, robust="hc3"); for the
    # highest-order terms both test all their coefficients with the HC3 covariance
    pd = pytest.importorskip("pandas")
    import statsmodels.api as sm
    import statsmodels.formula.api as smf

    fac = analyze_grid(*npk_grid())
    assert fac.robust == "hc3"
    d = pd.DataFrame({"block": NPK_BLOCK, "N": NPK_N, "P": NPK_P, "K": NPK_K, "y": NPK_YIELD})
    fit = smf.ols("y ~ C(block) + C(N) + C(P) + C(K) + C(N):C(P) + C(N):C(K) + C(P):C(K)", d).fit()
    table = sm.stats.anova_lm(fit, typ=2, robust="hc3")
    for name in ("N:P", "N:K", "P:K"):
        a, b = name.split(":")
        assert fac.term(name).stat == pytest.approx(table.loc[f"C({a}):C({b})", "F"], rel=1e-9)
        assert fac.term(name).p == pytest.approx(table.loc[f"C({a}):C({b})", "PR(>F)"], rel=1e-9)


# ---------------------------------------------------------------------------- balanced two-way in blocks

# A 2 x 3 factorial in 4 complete blocks (seeds), one result per cell and block: y[a][b][seed]
TWO_WAY = {
    (0, 0): [97.9, 98.3, 98.1, 98.4],
    (0, 1): [97.6, 98.0, 97.7, 98.2],
    (0, 2): [96.8, 97.5, 97.0, 97.3],
    (1, 0): [97.1, 97.9, 97.2, 97.6],
    (1, 1): [95.9, 96.8, 96.1, 96.6],
    (1, 2): [91.2, 93.5, 90.4, 92.8],
}
BN = [True, False]
DROP = [0.25, 0.5, 0.75]


def two_way_grid(data=TWO_WAY, seeds=None):
    factors = {"bn": BN, "conv_dropout": DROP}
    cells, values = {}, {}
    for (i, j), ys in data.items():
        name = f"{'bn' if BN[i] else 'nobn'}-d{DROP[j]}"
        cells[name] = {"bn": BN[i], "conv_dropout": DROP[j]}
        values[name] = dict(zip(seeds or range(len(ys)), ys))
    return factors, cells, values


def test_balanced_two_way_blocks_match_textbook_formulas():
    y = np.array([[TWO_WAY[(i, j)] for j in range(3)] for i in range(2)])  # a x b x r
    a, b, r = y.shape
    g = y.mean()
    ma, mb, mr, mab = y.mean(axis=(1, 2)), y.mean(axis=(0, 2)), y.mean(axis=(0, 1)), y.mean(axis=2)
    ss_a = b * r * ((ma - g) ** 2).sum()
    ss_b = a * r * ((mb - g) ** 2).sum()
    ss_blocks = a * b * ((mr - g) ** 2).sum()
    ss_ab = r * ((mab - ma[:, None] - mb[None, :] + g) ** 2).sum()
    ss_total = ((y - g) ** 2).sum()
    ss_e = ss_total - ss_a - ss_b - ss_blocks - ss_ab
    df_e = (a * b - 1) * (r - 1)
    mse = ss_e / df_e
    expected = {"block": (r - 1, ss_blocks), "bn": (a - 1, ss_a), "conv_dropout": (b - 1, ss_b),
                "bn:conv_dropout": ((a - 1) * (b - 1), ss_ab), "Residuals": (df_e, ss_e)}

    fac = analyze_grid(*two_way_grid())
    assert fac.balanced and fac.n_obs == 24 and fac.df_resid == df_e == 15
    for src, (df, ss) in expected.items():
        row = fac.anova_row(src)
        assert row["df"] == df, src
        assert row["sum_sq"] == pytest.approx(ss, rel=1e-10, abs=1e-10), src
        if src != "Residuals":
            F = ss / df / mse
            assert row["F"] == pytest.approx(F, rel=1e-9), src
            assert row["p"] == pytest.approx(st.f.sf(F, df, df_e), rel=1e-9), src
    # the main effect of bn is the difference of marginal means; its robust test is the same
    # hypothesis as its effect's t test (balanced, two levels), so F = t^2 and the p agree
    e = fac.effect("bn=false - bn=true")
    assert e.estimate == pytest.approx(ma[1] - ma[0], abs=1e-10)
    assert fac.term("bn").stat == pytest.approx((e.estimate / e.se) ** 2, rel=1e-9)
    assert fac.term("bn").p == pytest.approx(e.p, rel=1e-9)
    # simple effect and interaction contrast from the cell means
    s = fac.effect("bn=false - bn=true at conv_dropout=0.75")
    assert s.estimate == pytest.approx(mab[1, 2] - mab[0, 2], abs=1e-10)
    ic = fac.effect("(bn=false - bn=true) at conv_dropout=0.75 minus at conv_dropout=0.25")
    assert ic.estimate == pytest.approx(mab[1, 2] - mab[0, 2] - (mab[1, 0] - mab[0, 0]), abs=1e-10)
    assert ic.kind == "interaction" and ic.terms == "bn:conv_dropout" and s.kind == "simple"
    assert ic.ci_low < ic.estimate < ic.ci_high
    half = st.t.ppf(0.975, df_e) * ic.se
    assert (ic.ci_low, ic.ci_high) == pytest.approx((ic.estimate - half, ic.estimate + half), rel=1e-12)
    assert fac.robust == "hc3" and fac.seeds == {n: 4 for n in fac.seeds}


def test_effects_list_and_verdicts():
    fac = analyze_grid(*two_way_grid())
    kinds = [(e.kind, e.terms) for e in fac.effects]
    assert kinds.count(("main", "bn")) == 1
    assert kinds.count(("main", "conv_dropout")) == 2
    assert kinds.count(("simple", "bn:conv_dropout")) == 3
    assert kinds.count(("interaction", "bn:conv_dropout")) == 2
    assert [t.name for t in fac.terms] == ["bn", "conv_dropout", "bn:conv_dropout"]
    assert [(t.df_num, t.df_den) for t in fac.terms] == [(1, 15), (2, 15), (2, 15)]
    inter = fac.term("bn:conv_dropout")
    assert inter.p < 0.05
    assert inter.verdict.startswith("bn's effect depends on conv_dropout (interaction F(2, 15) = ")
    assert "robust p" in inter.verdict
    assert fac.term("bn").verdict.startswith("bn changes accuracy (averaged over conv_dropout; F(1, 15)")
    assert "bn=false - bn=true: -" in fac.term("bn").verdict
    assert fac.term("bn").verdict.endswith("but its effect depends on conv_dropout")

    # no interaction, bn negligible: additive data with a tiny bn effect
    rng = np.random.default_rng(3)
    data = {(i, j): list(97 + 0.01 * i - 0.5 * j + rng.normal(0, 0.05, 6)) for i in range(2) for j in range(3)}
    fac = analyze_grid(*two_way_grid(data), margin=0.5)
    v = fac.term("bn:conv_dropout").verdict
    assert v.startswith("no evidence that bn's effect depends on conv_dropout (robust p = ")
    assert v.endswith("this is not evidence of no interaction")
    assert fac.term("bn").verdict.startswith("bn's effect is negligible within ±0.5 points")


def test_deterministic():
    a = analyze_grid(*two_way_grid())
    b = analyze_grid(*two_way_grid())
    assert repr(a) == repr(b)


# ---------------------------------------------------------------------------- robust errors by simulation

SD_ONE_NOISY = np.array([[0.3, 0.3, 0.3], [0.3, 0.3, 7.0]])  # bn=false, conv_dropout=0.75 is erratic
SD_NOISY_HALF = np.array([[0.3, 0.3, 0.3], [7.0, 7.0, 7.0]])  # every bn=false cell is erratic
MEANS = 98.1 + np.array([0.0, -5.0])[:, None] + np.array([0.0, -0.5, -3.0])[None, :]  # additive


def _sim_design(n_seeds):
    """The 2 x 3 grid's design as analyze_grid builds it: 1, seed dummies, a, b, a:b."""
    rows = [(i, j, s) for i in range(2) for j in range(3) for s in range(n_seeds)]
    i, j, s = (np.array(c) for c in zip(*rows))
    cols = [np.ones(len(rows))] + [(s == k) * 1.0 for k in range(1, n_seeds)]
    a = [(i == 1) * 1.0]
    b = [(j == 1) * 1.0, (j == 2) * 1.0]
    X = np.column_stack(cols + a + b + [x * z for x in a for z in b])
    return (i, j, s), X


def _hc3_interaction_p(Y, X, q=2):
    """Robust (HC3) Wald F test of the last q coefficients, one column of Y per data set."""
    n, p = X.shape
    XtXi = np.linalg.inv(X.T @ X)
    P = XtXi @ X.T
    h = np.einsum("ij,ji->i", X, P)
    B = P @ Y
    E = Y - X @ B
    W = E ** 2 / (1 - h[:, None]) ** 2
    LP = P[-q:]
    M = np.einsum("in,ns,jn->sij", LP, W, LP)
    Lb = B[-q:].T
    F = np.einsum("si,si->s", Lb, np.linalg.solve(M, Lb[..., None])[..., 0]) / q
    return st.f.sf(F, q, n - p)


def _simulate(sd, n_seeds=5, n_sim=2000, interaction=0.0, seed=2024):
    (i, j, s), X = _sim_design(n_seeds)
    rng = np.random.default_rng(seed)
    mu = MEANS[i, j] + interaction * ((i == 1) & (j == 2))
    seed_effect = rng.normal(0, 1.0, (n_seeds, n_sim))[s]  # the split/initialisation shift of a seed
    Y = mu[:, None] + seed_effect + rng.normal(0, 1, (len(mu), n_sim)) * sd[i, j][:, None]
    return (i, j, s), X, Y


def test_simulation_path_equals_analyze_grid():
    (i, j, s), X, Y = _simulate(SD_ONE_NOISY, n_sim=3)
    p_np = _hc3_interaction_p(Y, X)
    for k in range(3):
        data = {(a, b): [] for a in range(2) for b in range(3)}
        for a, b, y in zip(i, j, Y[:, k]):
            data[(a, b)].append(float(y))
        fac = analyze_grid(*two_way_grid(data))
        assert fac.robust == "hc3"
        assert fac.term("bn:conv_dropout").p == pytest.approx(p_np[k], rel=1e-8)


@pytest.mark.parametrize("sd", [SD_ONE_NOISY, SD_NOISY_HALF], ids=["one-noisy-cell", "noisy-half"])
def test_robust_interaction_test_holds_its_level(sd):
    # sds differ 23-fold, 5 seeds, no interaction: HC3's rejection rate at alpha = 0.05 stays
    # within alpha + 3 Monte Carlo standard errors (it is in fact a little conservative)
    n_sim = 2000
    _, X, Y = _simulate(sd, n_sim=n_sim)
    rate = float(np.mean(_hc3_interaction_p(Y, X) < 0.05))
    mcse = math.sqrt(0.05 * 0.95 / n_sim)
    assert rate <= 0.05 + 3 * mcse, rate
    assert rate >= 0.01  # not absurdly conservative either


def test_classical_test_is_too_liberal_with_one_noisy_cell():
    # why the robust errors: the equal-variance F test rejects a true null far too often here
    n_sim = 2000
    (i, j, s), X, Y = _simulate(SD_ONE_NOISY, n_sim=n_sim)
    n, p = X.shape
    H = X @ np.linalg.solve(X.T @ X, X.T)
    X0 = X[:, :-2]
    H0 = X0 @ np.linalg.solve(X0.T @ X0, X0.T)
    rss1 = ((Y - H @ Y) ** 2).sum(axis=0)
    rss0 = ((Y - H0 @ Y) ** 2).sum(axis=0)
    F = (rss0 - rss1) / 2 / (rss1 / (n - p))
    rate = float(np.mean(st.f.sf(F, 2, n - p) < 0.05))
    assert rate > 0.05 + 3 * math.sqrt(0.05 * 0.95 / n_sim), rate


def test_robust_interaction_test_detects_a_10_point_interaction():
    # 10 points lost in the erratic cell (sd 7, 5 seeds): rejected most of the time
    _, X, Y = _simulate(SD_ONE_NOISY, n_sim=1000, interaction=-10.0)
    power = float(np.mean(_hc3_interaction_p(Y, X) < 0.05))
    assert power > 0.5, power
    # and a 10-point interaction in a quiet cell is found every time
    sd = SD_ONE_NOISY[::-1, ::-1].copy()  # now the erratic cell is bn=true, conv_dropout=0.25
    _, X, Y = _simulate(sd, n_sim=1000, interaction=-10.0)
    assert float(np.mean(_hc3_interaction_p(Y, X) < 0.05)) > 0.99


# ---------------------------------------------------------------------------- effects on noiseless data

def test_effects_equal_truth_on_noiseless_three_factor_data():
    factors = {"bn": [True, False], "conv_dropout": [0.25, 0.5, 0.75], "preset": ["small", "wide"]}
    a = {0: 0.0, 1: -2.0}
    b = {0: 0.0, 1: -0.4, 2: -1.5}
    c = {0: 0.0, 1: 0.8}
    ab = {(1, 1): -1.0, (1, 2): -6.0}  # bn off hurts more at high dropout
    ac = {(1, 1): 0.5}
    bc = {(2, 1): 0.3}
    seed_shift = [0.0, 0.7, -0.4, 0.2]
    truth, cells, values = {}, {}, {}
    for i, j, k in itertools.product(range(2), range(3), range(2)):
        mu = 97.0 + a[i] + b[j] + c[k] + ab.get((i, j), 0) + ac.get((i, k), 0) + bc.get((j, k), 0)
        truth[(i, j, k)] = mu
        name = f"v{i}{j}{k}"
        cells[name] = {"bn": factors["bn"][i], "conv_dropout": factors["conv_dropout"][j],
                       "preset": factors["preset"][k]}
        values[name] = {sd: mu + shift for sd, shift in enumerate(seed_shift)}
    del values["v121"][3]  # unbalanced: one cell lacks a seed; still exact

    fac = analyze_grid(factors, cells, values)
    T = np.array([[[truth[(i, j, k)] for k in range(2)] for j in range(3)] for i in range(2)])
    m_bn = T.mean(axis=(1, 2))
    m_do = T.mean(axis=(0, 2))
    assert fac.effect("bn=false - bn=true").estimate == pytest.approx(m_bn[1] - m_bn[0], abs=1e-9)
    assert m_bn[1] - m_bn[0] == pytest.approx(-2.0 + (-1.0 - 6.0) / 3 + 0.5 / 2)
    for j in (1, 2):
        lab = f"conv_dropout={factors['conv_dropout'][j]} - conv_dropout=0.25"
        assert fac.effect(lab).estimate == pytest.approx(m_do[j] - m_do[0], abs=1e-9)
    simple = T.mean(axis=2)  # bn x dropout, averaged over preset
    for j, lv in enumerate(factors["conv_dropout"]):
        e = fac.effect(f"bn=false - bn=true at conv_dropout={lv}")
        assert e.estimate == pytest.approx(simple[1, j] - simple[0, j], abs=1e-9)
    e = fac.effect("(bn=false - bn=true) at conv_dropout=0.75 minus at conv_dropout=0.25")
    assert e.estimate == pytest.approx(-6.0, abs=1e-9)
    e = fac.effect("(bn=false - bn=true) at preset=wide minus at preset=small")
    assert e.estimate == pytest.approx(0.5, abs=1e-9)
    e = fac.effect("(conv_dropout=0.75 - conv_dropout=0.25) at preset=wide minus at preset=small")
    assert e.estimate == pytest.approx(0.3, abs=1e-9)
    e = fac.effect("(conv_dropout=0.5 - conv_dropout=0.25) at preset=wide minus at preset=small")
    assert e.estimate == pytest.approx(0.0, abs=1e-9)
    assert [t.name for t in fac.terms] == ["bn", "conv_dropout", "preset", "bn:conv_dropout",
                                           "bn:preset", "conv_dropout:preset"]
    assert not fac.balanced and fac.seeds["v121"] == 3 and fac.n_obs == 47
    assert any("fits the data exactly" in n for n in fac.notes)
    assert fac.term("bn:conv_dropout").verdict.endswith("averaged over preset)")


# ---------------------------------------------------------------------------- unbalanced data

def _noisy_grid(seed=7, n=5):
    rng = np.random.default_rng(seed)
    data = {(i, j): list(MEANS[i, j] + rng.normal(0, SD_ONE_NOISY[i, j], n)) for i in range(2) for j in range(3)}
    return two_way_grid(data)


def test_one_cell_with_an_extra_seed():
    factors, cells, values = _noisy_grid()
    values["nobn-d0.75"][5] = 70.0  # a seed only this cell has: carries no information, left out
    fac = analyze_grid(factors, cells, values)
    assert all(math.isfinite(x) for t in fac.terms for x in (t.stat, t.p))
    assert all(math.isfinite(x) for e in fac.effects for x in (e.estimate, e.se, e.ci_low, e.ci_high, e.p))
    assert fac.seeds["nobn-d0.75"] == 5 and fac.n_obs == 30
    assert any("seed 5" in n and "left out" in n for n in fac.notes)
    base = analyze_grid(*_noisy_grid())
    assert repr(base.terms) == repr(fac.terms)


def test_unbalanced_sequential_design_matches_statsmodels_formula_api():
    pd = pytest.importorskip("pandas")
    import statsmodels.api as sm
    import statsmodels.formula.api as smf

    factors, cells, values = _noisy_grid()
    rng = np.random.default_rng(11)
    for name in ("nobn-d0.75", "nobn-d0.5"):  # a sequential design gave two cells 3 more seeds
        for s in (5, 6, 7):
            values[name][s] = float(MEANS[1, 2] + rng.normal(0, 5))
    del values["bn-d0.25"][2]  # and one run is missing
    fac = analyze_grid(factors, cells, values)
    assert not fac.balanced and fac.robust == "hc3" and fac.n_obs == 35
    assert fac.seeds["nobn-d0.75"] == 8 and fac.seeds["bn-d0.25"] == 4
    assert all(math.isfinite(x) for t in fac.terms for x in (t.stat, t.p))
    assert all(math.isfinite(x) for e in fac.effects for x in (e.estimate, e.se, e.ci_low, e.ci_high, e.p))

    rows = [(c["bn"], c["conv_dropout"], s, y) for v, c in cells.items() for s, y in values[v].items()]
    d = pd.DataFrame(rows, columns=["bn", "drop", "seed", "y"])
    d["bn"] = d["bn"].astype(str)
    fit = smf.ols("y ~ C(seed) + C(bn) + C(drop) + C(bn):C(drop)", d).fit()
    table = sm.stats.anova_lm(fit, typ=2)
    names = {"block": "C(seed)", "bn": "C(bn)", "conv_dropout": "C(drop)",
             "bn:conv_dropout": "C(bn):C(drop)", "Residuals": "Residual"}
    for src, sm_name in names.items():
        row = fac.anova_row(src)
        assert row["df"] == table.loc[sm_name, "df"]
        assert row["sum_sq"] == pytest.approx(table.loc[sm_name, "sum_sq"], rel=1e-9)
        if src != "Residuals":
            assert row["p"] == pytest.approx(table.loc[sm_name, "PR(>F)"], rel=1e-7)
    robust = sm.stats.anova_lm(fit, typ=2, robust="hc3")
    assert fac.term("bn:conv_dropout").stat == pytest.approx(robust.loc["C(bn):C(drop)", "F"], rel=1e-9)
    classical = analyze_grid(factors, cells, values, robust=None)
    for t in classical.terms:
        assert t.p == pytest.approx(table.loc[names[t.name], "PR(>F)"], rel=1e-7)


def test_single_seed_cell_falls_back_with_a_note():
    factors, cells, values = _noisy_grid()
    values["bn-d0.5"] = {0: values["bn-d0.5"][0]}
    fac = analyze_grid(factors, cells, values)
    assert fac.robust == "classical"
    assert any("single seed" in n for n in fac.notes)
    assert all(math.isfinite(t.p) for t in fac.terms)


# ---------------------------------------------------------------------------- errors

def test_config_errors():
    factors, cells, values = two_way_grid()
    with pytest.raises(ConfigError, match="at least 2 factors with 2 or more levels"):
        analyze_grid({"bn": BN, "conv_dropout": [0.5]},
                     {"a": {"bn": True, "conv_dropout": 0.5}, "b": {"bn": False, "conv_dropout": 0.5}},
                     {"a": {0: 1.0, 1: 2.0}, "b": {0: 1.0, 1: 2.0}})
    with pytest.raises(ConfigError, match="at least 2 factors"):
        analyze_grid({"bn": BN}, {"a": {"bn": True}, "b": {"bn": False}}, {})
    missing = dict(cells)
    del missing["nobn-d0.5"]
    with pytest.raises(ConfigError, match=r"no cell for bn=false, conv_dropout=0\.5"):
        analyze_grid(factors, missing, values)
    bad = dict(cells, **{"nobn-d0.5": {"bn": False, "conv_dropout": 0.6}})
    with pytest.raises(ConfigError, match="not one of conv_dropout's levels"):
        analyze_grid(factors, bad, values)
    bad = dict(cells, **{"nobn-d0.5": {"bn": False}})
    with pytest.raises(ConfigError, match="exactly one level per factor"):
        analyze_grid(factors, bad, values)
    bad = dict(cells, **{"nobn-d0.5": {"bn": 0, "conv_dropout": 0.5}})  # 0 is not the bool False
    with pytest.raises(ConfigError, match="not one of bn's levels"):
        analyze_grid(factors, bad, values)
    one_seed = {v: {0: ys[0]} for v, ys in values.items()}
    with pytest.raises(ConfigError, match="at least 2 seeds"):
        analyze_grid(factors, cells, one_seed)
    empty = dict(values, **{"nobn-d0.5": {}})
    with pytest.raises(ConfigError, match="has no results: every cell needs at least 2 seeds"):
        analyze_grid(factors, cells, empty)
    # bn=true cells ran seeds 0-3, bn=false cells seeds 10-13: bn is confounded with seed
    split = {v: {s + (10 if not cells[v]["bn"] else 0): y for s, y in ys.items()} for v, ys in values.items()}
    with pytest.raises(ConfigError, match="confounded with seed"):
        analyze_grid(factors, cells, split)
    with pytest.raises(ConfigError, match="robust"):
        analyze_grid(factors, cells, values, robust="hc9")
    nan = dict(values, **{"nobn-d0.5": {0: float("nan"), 1: 90.0, 2: 91.0, 3: 92.0}})
    with pytest.raises(ConfigError, match="unfinished"):
        analyze_grid(factors, cells, nan)


def test_import_is_cheap():
    code = ("import sys, cnnlab, cnnlab.factorial, cnnlab.report.interaction; "
            "bad = [m for m in ('torch', 'statsmodels', 'pandas', 'matplotlib') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------- figure

def test_interaction_figure():
    from matplotlib.figure import Figure

    from cnnlab.report.interaction import interaction_figure

    factors, cells, values = two_way_grid()
    fac = analyze_grid(factors, cells, values)
    for a, b, n_lines in (("bn", "conv_dropout", 2), ("conv_dropout", "bn", 3)):
        fig = interaction_figure(fac, values, cells, a, b)
        assert isinstance(fig, Figure)
        assert tuple(fig.get_size_inches()) == pytest.approx((4.5, 3.2))
        ax = fig.axes[0]
        lines = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
        assert len(lines) == n_lines
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [ln.get_label() for ln in lines]
        assert ax.get_xlabel() == b and ax.get_ylabel() == "test accuracy (%)"
        assert len(lines[0].get_xdata()) == len(factors[b])
    # cell means are the plotted y values
    fig = interaction_figure(fac, values, cells, "bn", "conv_dropout")
    ys = [ln.get_ydata() for ln in fig.axes[0].get_lines() if not ln.get_label().startswith("_")]
    assert ys[1][2] == pytest.approx(np.mean(TWO_WAY[(1, 2)]))
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:4] == b"\x89PNG"
