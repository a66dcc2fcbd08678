"""Factorial analysis of a seed-blocked ablation grid: which factors matter, and does one
factor's effect depend on another?

    fac = analyze_grid(
        factors={"bn": [True, False], "conv_dropout": [0.25, 0.5, 0.75]},
        cells={"bn-d25": {"bn": True, "conv_dropout": 0.25}, ...},     # one variant per cell
        values={"bn-d25": {0: 98.1, 1: 98.3, ...}, ...},               # seed -> test accuracy (%)
    )
    fac.terms      # F tests: "bn", "conv_dropout", "bn:conv_dropout"
    fac.anova      # the classical type-II ANOVA table (block and residual rows included)
    fac.effects    # contrasts in accuracy points with 95% CIs: main, simple, interaction

The model
---------
Every cell of the grid is trained with the same seeds, and a seed fixes the data split and
the initialisation, so the seed is a *block*. The model is ordinary least squares with

    y ~ seed (categorical block) + every main effect + every two-factor interaction

(no three-factor or higher terms: with 3+ factors they are pooled into the error). Factors use
treatment coding with the first listed level as the reference; the blocks are the seeds
present, the first in sorted order being the reference. Only the seeds that were run are
analysed, so cells may have different seeds (a sequential design); a seed that appears in only
one cell is left out, with a note, because once seed is a block such an observation says
nothing about the factors.

Tests (`Term`) follow type II (the principle of marginality): a main effect is tested after
the other main effects and the block, ignoring the interactions that contain it; a two-factor
interaction is tested after all main effects and the block. `anova` holds the classical table
(sums of squares from model comparisons, F against the full model's residual mean square),
which reproduces R's `anova`/`aov` and statsmodels' `anova_lm(typ=2)` numbers. The tests in
`terms` are Wald F tests of the same type-II hypotheses (the hypothesis matrix is built from the
classical (X'X)^-1 as R's car::Anova does, so what is tested does not depend on the coding)
with a heteroscedasticity-consistent covariance, F(q, residual df).

Why HC3
-------
Accuracy variances differ a lot between cells (sd 0.3 for a stable variant, 7 for one that
sometimes collapses), which breaks the equal-variance F test: in a simulation of a 2 x 3 grid
with 5 seeds, one cell with sd 7 and five with sd 0.3 and no interaction, the classical
interaction test rejected 12.6% of 4000 null data sets at alpha = 0.05. With the same setup:

    covariance        one noisy cell   noisy half (sd 7 vs 0.3)   sd 0.3 ... 7 gradient
    HC0               10.6%            16.4%                      14.9%
    HC1 = HC2 here     6.5%             8.4%                       7.8%
    HC3                3.7%             3.3%                       3.6%

(in a balanced grid every leverage is equal, so HC1 and HC2 coincide). HC3 is the only one
that holds the level at 5 seeds per cell, at the cost of being somewhat conservative, so it is
the default (`robust="hc3"`). It is not perfect with very few seeds: with 3 seeds per cell and
one noisy cell it rejected 6.1%, and with 2 seeds 11%, so with fewer than 4 seeds per cell a
note says so. With a true interaction of 10 points in the sd-7 cell, HC3 rejects about 60% of
the time at 5 seeds (an honest power figure for such a noisy cell). tests/test_factorial.py
repeats the null and the power simulation (2000 null data sets: 3.6% and 3.5% for the first two
patterns; power 59% over 1000).

HC3 (and HC2) divide by 1 - h_ii; when an observation has leverage 1 (a cell with a single
seed in a two-factor grid is fitted exactly) neither exists, and the analysis falls back to
HC2 where only HC3 fails, else to the classical covariance, with a note. `robust=None` gives
the classical tests throughout.

Effects (`Effect`) are contrasts of the model's estimated marginal means (equal weight per
cell, whatever the number of seeds) in accuracy points: each non-reference level minus the
reference level of each factor averaged over the other factors ("main"); for each pair of
factors (A, B) in the order given, the simple effects of A at each level of B ("simple") and
the interaction contrasts, the simple effect of A at a level of B minus that at B's reference
level ("interaction"). Each has a robust standard error, a two-sided t test and a 95%
t-interval on the residual degrees of freedom.

statsmodels and scipy are imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations, product
from typing import Mapping, Sequence

import numpy as np

from cnnlab.errors import ConfigError
from cnnlab.study import format_level

__all__ = ["Term", "Effect", "Factorial", "analyze_grid", "format_level"]

CONFIDENCE = 0.95
ROBUST_TYPES = ("hc3", "hc2", "hc1", "hc0")
FEW_SEEDS = 4  # below this many seeds in some cell, the robust tests may be too liberal (see above)
_NAN = float("nan")
_LEVERAGE_ONE = 1 - 1e-8


@dataclass(frozen=True)
class Term:
    """One F test: a main effect ("bn") or a two-factor interaction ("bn:conv_dropout")."""
    name: str
    df_num: int
    stat: float  # F
    df_den: int
    p: float
    verdict: str
    kind: str = "main"  # "main" | "interaction"


@dataclass(frozen=True)
class Effect:
    """A contrast of estimated marginal means, in accuracy points, with a 95% CI."""
    label: str
    estimate: float
    ci_low: float
    ci_high: float
    se: float
    p: float
    kind: str  # "main" | "simple" | "interaction"
    terms: str  # the term the effect belongs to: "bn" or "bn:conv_dropout"
    df: int = 0  # degrees of freedom of the t test and interval


@dataclass
class Factorial:
    factors: dict[str, list]  # the factors analysed (those with 2+ levels), levels in order
    terms: list[Term]
    anova: list[dict]  # classical type II: source, df, sum_sq, mean_sq, F, p
    effects: list[Effect]
    n_obs: int
    seeds: dict[str, int]  # variant -> number of seeds analysed
    robust: str  # "hc3", "hc2", ... or "classical"
    balanced: bool  # every cell has the same set of seeds
    df_resid: int
    alpha: float
    margin: float
    notes: list[str] = field(default_factory=list)

    def term(self, name: str) -> Term:
        for t in self.terms:
            if t.name == name:
                return t
        raise KeyError(name)

    def effect(self, label: str) -> Effect:
        for e in self.effects:
            if e.label == label:
                return e
        raise KeyError(label)

    def anova_row(self, source: str) -> dict:
        for row in self.anova:
            if row["source"] == source:
                return row
        raise KeyError(source)


# ---------------------------------------------------------------------------- input checks


def _key(level):
    """A level's identity: bools are not the numbers 0 and 1, and 1 == 1.0."""
    if isinstance(level, bool):
        return ("bool", level)
    if isinstance(level, (int, float)):
        return ("num", float(level))
    if isinstance(level, str):
        return ("str", level)
    raise ConfigError(f"factor level {level!r} is a {type(level).__name__}: levels must be bool, int, float or str")


def _seed_order(seed):
    return (isinstance(seed, str), seed)


def _check_grid(factors, cells):
    """-> (used factor names, their levels, {variant: level indices over used factors}, notes)."""
    if not isinstance(factors, Mapping) or not factors:
        raise ConfigError("factorial analysis needs at least 2 factors with 2 or more levels each; got none")
    notes = []
    index = {}
    for name, levels in factors.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"factor name {name!r} must be a non-empty string")
        if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or len(levels) == 0:
            raise ConfigError(f"factor {name!r} needs a list of levels, got {levels!r}")
        keys = [_key(v) for v in levels]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"factor {name!r} lists a level twice: {list(levels)!r}")
        index[name] = {k: i for i, k in enumerate(keys)}
    used = [f for f in factors if len(factors[f]) >= 2]
    if len(used) < 2:
        raise ConfigError(f"factorial analysis needs at least 2 factors with 2 or more levels each; "
                          f"got {len(used)} ({', '.join(used) or 'none'})")
    for f in factors:
        if f not in used:
            notes.append(f"factor {f} has a single level ({format_level(factors[f][0])}) and is not analysed")

    if not isinstance(cells, Mapping) or not cells:
        raise ConfigError("no grid cells given: cells maps each variant to its factor levels")
    at = {}
    seen = {}
    for variant, lv in cells.items():
        if not isinstance(lv, Mapping) or set(lv) != set(factors):
            got = sorted(lv) if isinstance(lv, Mapping) else lv
            raise ConfigError(f"cell {variant!r} sets factors {got!r}, but the grid's factors are "
                              f"{list(factors)!r}: each cell needs exactly one level per factor")
        idx = []
        for f in factors:
            try:
                k = _key(lv[f])
            except ConfigError:
                k = None
            if k not in index[f]:
                raise ConfigError(f"cell {variant!r} has {f} = {lv[f]!r}, which is not one of {f}'s levels "
                                  f"{list(factors[f])!r}")
            idx.append(index[f][k])
        combo = tuple(idx)
        if combo in seen:
            raise ConfigError(f"cells {seen[combo]!r} and {variant!r} have the same levels: "
                              f"each combination of levels must be one cell")
        seen[combo] = variant
        at[variant] = tuple(idx[list(factors).index(f)] for f in used)
    for combo in product(*(range(len(factors[f])) for f in factors)):
        if combo not in seen:
            where = ", ".join(f"{f}={format_level(factors[f][i])}" for f, i in zip(factors, combo))
            raise ConfigError(f"the grid has no cell for {where}: a factorial analysis needs every combination "
                              f"of levels ({len(seen)} of {math.prod(len(v) for v in factors.values())} present)")
    return used, {f: list(factors[f]) for f in used}, at, notes


def _needed_seeds(levels: dict[str, list]) -> int:
    """Seeds per cell (the same seeds in every cell) for at least 1 residual df, and at least 2."""
    sizes = [len(v) for v in levels.values()]
    m = sum(s - 1 for s in sizes) + sum((a - 1) * (b - 1) for a, b in combinations(sizes, 2))
    c = math.prod(sizes)
    return max(2, math.ceil((m + 1) / (c - 1)))


# ---------------------------------------------------------------------------- design

def _design(used, levels, obs_cells, obs_seeds, blocks):
    """Treatment-coded design matrix and the column slice of each term (intercept, block, ...)."""
    n = len(obs_cells)
    cols = [np.ones(n)]
    slices = {}
    seed_pos = {s: i for i, s in enumerate(blocks)}
    sidx = np.array([seed_pos[s] for s in obs_seeds])
    start = len(cols)
    for j in range(1, len(blocks)):
        cols.append((sidx == j).astype(float))
    slices["block"] = slice(start, len(cols))
    ind = {}
    cidx = np.array(obs_cells).reshape(n, len(used))
    for k, f in enumerate(used):
        start = len(cols)
        ind[f] = [(cidx[:, k] == i).astype(float) for i in range(1, len(levels[f]))]
        cols.extend(ind[f])
        slices[f] = slice(start, len(cols))
    for f, g in combinations(used, 2):
        start = len(cols)
        cols.extend(a * b for a in ind[f] for b in ind[g])
        slices[f"{f}:{g}"] = slice(start, len(cols))
    return np.column_stack(cols), slices


def _cell_vector(used, levels, combo, ncol, slices) -> np.ndarray:
    x = np.zeros(ncol)
    x[0] = 1.0
    ind = {}
    for k, f in enumerate(used):
        ind[f] = np.array([1.0 if combo[k] == i else 0.0 for i in range(1, len(levels[f]))])
        x[slices[f]] = ind[f]
    for f, g in combinations(used, 2):
        x[slices[f"{f}:{g}"]] = np.outer(ind[f], ind[g]).ravel()
    return x


def _ssr(y, X) -> tuple[float, int]:
    """Residual sum of squares and rank of the least-squares fit of y on X."""
    if X.shape[1] == 0:
        return float(y @ y), 0
    beta, _, rank, _ = np.linalg.lstsq(X, y, rcond=None)
    r = y - X @ beta
    return float(r @ r), int(rank)


def _conj_complement(L1, L2, V0):
    """Rows spanning the part of L1's row space that is V0-orthogonal to L2 (car's ConjComp).
    This is the type-II hypothesis of a term whose higher-order relatives are L2."""
    if L2.shape[0] == 0:
        return L1
    q, _ = np.linalg.qr(L1 @ V0 @ L2.T, mode="complete")
    r = L1.shape[0] - L2.shape[0]
    return q[:, -r:].T @ L1


# ---------------------------------------------------------------------------- analysis

def analyze_grid(factors: dict[str, list], cells: dict[str, dict[str, object]],
                 values: dict[str, dict[int, float]], alpha: float = 0.05, margin: float = 0.5,
                 robust: str | None = "hc3") -> Factorial:
    """Type-II factorial analysis of a seed-blocked grid (see the module docstring).

    factors: name -> levels (first = reference); cells: variant -> {factor: level}, one per
    combination; values: variant -> {seed: accuracy}. robust: "hc3" (default), "hc2", "hc1",
    "hc0", or None for classical equal-variance tests. Raises ConfigError on a grid that
    cannot be analysed.
    """
    import statsmodels.api as sm
    from scipy import stats as st

    if not (0 < alpha < 1):
        raise ConfigError(f"alpha must be between 0 and 1, got {alpha!r}")
    if not (margin >= 0):
        raise ConfigError(f"margin must be >= 0, got {margin!r}")
    if robust is not None:
        if not isinstance(robust, str) or robust.lower() not in ROBUST_TYPES:
            raise ConfigError(f"robust must be one of {', '.join(ROBUST_TYPES)} or None, got {robust!r}")
        robust = robust.lower()

    used, levels, at, notes = _check_grid(factors, cells)
    need = _needed_seeds(levels)

    # observations, in grid order then seed order
    values = values or {}
    extra = sorted(str(v) for v in values if v not in cells)
    if extra:
        notes.append(f"results of {', '.join(extra)} are not grid cells and are not analysed")
    order = sorted(cells, key=lambda v: at[v])
    per_cell = {}
    for v in order:
        vals = values.get(v) or {}
        if not isinstance(vals, Mapping):
            raise ConfigError(f"results of {v!r} must map seed -> accuracy, got {type(vals).__name__}")
        clean = {}
        for s, y in vals.items():
            try:
                y = float(y)
            except (TypeError, ValueError):
                raise ConfigError(f"variant {v!r}, seed {s!r}: accuracy {y!r} is not a number") from None
            if not math.isfinite(y):
                raise ConfigError(f"variant {v!r}, seed {s!r}: accuracy is {y}; drop unfinished runs first")
            clean[s] = y
        per_cell[v] = clean
    count = {}
    for v in order:
        for s in per_cell[v]:
            count[s] = count.get(s, 0) + 1
    lonely = sorted((s for s, c in count.items() if c == 1), key=_seed_order)
    if lonely and len(lonely) < len(count):
        for s in lonely:
            owner = next(v for v in order if s in per_cell[v])
            notes.append(f"seed {s} was run only for {owner} and is left out: with seed as a block, a seed "
                         f"seen in one cell carries no information about the factors")
            del per_cell[owner][s]
    for v in order:
        if not per_cell[v]:
            raise ConfigError(f"cell {v!r} has no results: every cell needs at least {need} seeds "
                              f"(the same seeds in every cell)")
    seeds_n = {v: len(per_cell[v]) for v in order}
    seed_sets = {frozenset(per_cell[v]) for v in order}
    balanced = len(seed_sets) == 1
    blocks = sorted({s for v in order for s in per_cell[v]}, key=_seed_order)

    obs_cells, obs_seeds, ys = [], [], []
    for v in order:
        for s in sorted(per_cell[v], key=_seed_order):
            obs_cells.append(at[v])
            obs_seeds.append(s)
            ys.append(per_cell[v][s])
    y = np.asarray(ys, dtype=float)
    X, slices = _design(used, levels, obs_cells, obs_seeds, blocks)
    n, p = X.shape
    rank = int(np.linalg.matrix_rank(X))
    if n - p < 1:
        raise ConfigError(f"too few observations to estimate the model: {p} parameters from {n} results; "
                          f"every cell needs at least {need} seeds (the same seeds in every cell)")
    if rank < p:
        raise ConfigError(f"the model cannot be estimated from these seeds (a factor or interaction is "
                          f"confounded with seed because cells were run with different seeds): run the same "
                          f"{need} or more seeds in every cell")
    df_resid = n - p
    if not balanced:
        notes.append("cells have different seeds (unbalanced): type-II tests and model-based means are used")
    for v in order:
        if seeds_n[v] < 2:
            notes.append(f"cell {v} has a single seed: its spread is unknown")

    ols = sm.OLS(y, X).fit()
    beta = np.asarray(ols.params, dtype=float)
    resid = np.asarray(ols.resid, dtype=float)
    ssr_full = float(resid @ resid)
    V0 = np.asarray(ols.normalized_cov_params, dtype=float)  # (X'X)^-1
    mse = ssr_full / df_resid
    scale = max(float(np.mean(y * y)), 1e-300)
    perfect = ssr_full <= 1e-20 * n * scale
    if perfect:
        notes.append("the model fits the data exactly (all residuals are zero): tests and intervals are degenerate")

    # covariance for tests and intervals
    used_cov = "classical"
    V = V0 * mse
    if robust is not None:
        lev = np.einsum("ij,jk,ik->i", X, V0, X)
        candidates = [robust] + (["hc2"] if robust == "hc3" else [])
        for kind in candidates:
            if kind in ("hc2", "hc3") and float(lev.max()) > _LEVERAGE_ONE:
                continue
            Vr = np.asarray(sm.OLS(y, X).fit(cov_type=kind.upper()).cov_params(), dtype=float)
            if np.all(np.isfinite(Vr)):
                V, used_cov = Vr, kind
                break
        if used_cov != robust:
            worst = [v for v, c in seeds_n.items() if c < 2]
            why = (f"cell {', '.join(worst)} has a single seed" if worst
                   else "some observation is fitted exactly (leverage 1)")
            notes.append(f"{robust.upper()} robust errors do not exist here ({why}): "
                         f"{used_cov if used_cov == 'classical' else used_cov.upper()} errors are used instead")
            if used_cov == "classical":
                notes.append("classical errors assume equal variance in every cell")
        if used_cov != "classical" and min(seeds_n.values()) < FEW_SEEDS:
            notes.append(f"with fewer than {FEW_SEEDS} seeds in a cell, robust tests can reject too often when "
                         f"one cell is much noisier than the rest (about 11% instead of 5% with 2 seeds)")

    # classical type-II ANOVA by model comparison
    term_names = [*used, *(f"{f}:{g}" for f, g in combinations(used, 2))]

    def relatives(t):  # higher-order terms containing t
        if ":" in t:
            return []
        return [u for u in term_names if ":" in u and t in u.split(":")]

    all_cols = np.arange(p)
    fdist = st.f
    anova = []
    for src in ["block", *term_names]:
        drop = set(range(p)[slices[src]])
        for r in relatives(src) if src != "block" else []:
            drop |= set(range(p)[slices[r]])
        without = [c for c in all_cols if c not in drop]
        with_t = sorted(set(without) | set(range(p)[slices[src]]))
        ssr0, r0 = _ssr(y, X[:, without])
        ssr1, r1 = _ssr(y, X[:, with_t])
        df = r1 - r0
        ss = max(ssr0 - ssr1, 0.0)
        ms = ss / df if df else _NAN
        F = ms / mse if mse > 0 else (math.inf if ss > 0 else _NAN)
        pv = float(fdist.sf(F, df, df_resid)) if math.isfinite(F) else (0.0 if F == math.inf else _NAN)
        anova.append({"source": src, "df": int(df), "sum_sq": float(ss), "mean_sq": float(ms),
                      "F": float(F), "p": pv})
    anova.append({"source": "Residuals", "df": int(df_resid), "sum_sq": ssr_full, "mean_sq": mse,
                  "F": _NAN, "p": _NAN})

    # Wald tests of the type-II hypotheses
    eye = np.eye(p)
    tests = {}
    for t in term_names:
        if used_cov == "classical":
            row = next(r for r in anova if r["source"] == t)
            tests[t] = (row["df"], row["F"], row["p"])
            continue
        rel = [c for r in relatives(t) for c in range(p)[slices[r]]]
        L1 = eye[list(range(p)[slices[t]]) + rel]
        L2 = eye[rel]
        L = _conj_complement(L1, L2, V0)
        q = L.shape[0]
        Lb = L @ beta
        M = L @ V @ L.T
        F = _wald(Lb, M, q)
        pv = float(fdist.sf(F, q, df_resid)) if math.isfinite(F) else (0.0 if F == math.inf else _NAN)
        tests[t] = (q, F, pv)

    # effects
    tq = float(st.t.ppf((1 + CONFIDENCE) / 2, df_resid))
    grids = {f: range(len(levels[f])) for f in used}
    vec_cache = {}

    def mean_vec(fixed: dict[str, int]) -> np.ndarray:
        """Equal-weight average of the cell-mean rows over the factors not in `fixed`."""
        key = tuple(sorted(fixed.items()))
        if key not in vec_cache:
            free = [f for f in used if f not in fixed]
            rows = []
            for combo in product(*(grids[f] for f in free)):
                full = dict(zip(free, combo), **fixed)
                rows.append(_cell_vector(used, levels, tuple(full[f] for f in used), p, slices))
            vec_cache[key] = np.mean(rows, axis=0)
        return vec_cache[key]

    def effect(label, c, kind, term):
        est = float(c @ beta)
        var = float(c @ V @ c)
        se = math.sqrt(var) if var > 0 else 0.0
        if se > 0:
            tval = est / se
            pv = float(2 * st.t.sf(abs(tval), df_resid))
        else:
            pv = 0.0 if abs(est) > 1e-9 * math.sqrt(scale) else 1.0
        return Effect(label, est, est - tq * se, est + tq * se, se, pv, kind, term, int(df_resid))

    effects = []
    for f in used:
        ref = format_level(levels[f][0])
        for i in range(1, len(levels[f])):
            c = mean_vec({f: i}) - mean_vec({f: 0})
            effects.append(effect(f"{f}={format_level(levels[f][i])} - {f}={ref}", c, "main", f))
    for f, g in combinations(used, 2):
        term = f"{f}:{g}"
        fref, gref = format_level(levels[f][0]), format_level(levels[g][0])
        for i in range(1, len(levels[f])):
            base = f"{f}={format_level(levels[f][i])} - {f}={fref}"
            simple = {j: mean_vec({f: i, g: j}) - mean_vec({f: 0, g: j}) for j in grids[g]}
            for j in grids[g]:
                effects.append(effect(f"{base} at {g}={format_level(levels[g][j])}", simple[j], "simple", term))
            for j in range(1, len(levels[g])):
                effects.append(effect(f"({base}) at {g}={format_level(levels[g][j])} minus at {g}={gref}",
                                      simple[j] - simple[0], "interaction", term))

    robust_word = "p" if used_cov == "classical" else "robust p"
    terms = []
    for t in term_names:
        q, F, pv = tests[t]
        if ":" in t:
            verdict = _interaction_verdict(t, used, q, F, df_resid, pv, alpha, robust_word)
            terms.append(Term(t, int(q), float(F), int(df_resid), float(pv), verdict, "interaction"))
        else:
            mains = [e for e in effects if e.kind == "main" and e.terms == t]
            inter = [u for u in relatives(t) if tests[u][2] < alpha]
            verdict = _main_verdict(t, used, mains, q, F, df_resid, pv, alpha, margin, robust_word, inter)
            terms.append(Term(t, int(q), float(F), int(df_resid), float(pv), verdict, "main"))

    return Factorial(factors=levels, terms=terms, anova=anova, effects=effects, n_obs=int(n),
                     seeds={v: seeds_n[v] for v in cells}, robust=used_cov, balanced=balanced,
                     df_resid=int(df_resid), alpha=float(alpha), margin=float(margin), notes=notes)


def _wald(Lb: np.ndarray, M: np.ndarray, q: int) -> float:
    """(Lb)' M^-1 (Lb) / q, with the degenerate cases (M numerically zero or singular) made explicit."""
    size = float(np.max(np.abs(M))) if M.size else 0.0
    if size == 0.0 or not np.all(np.isfinite(M)):
        return math.inf if np.any(np.abs(Lb) > 0) else _NAN
    w, U = np.linalg.eigh((M + M.T) / 2)
    keep = w > size * 1e-12
    if not np.all(keep):
        z = U.T @ Lb
        if np.any(np.abs(z[~keep]) > 1e-9 * max(1.0, float(np.max(np.abs(Lb))))):
            return math.inf
        return float(np.sum(z[keep] ** 2 / w[keep]) / q)
    z = U.T @ Lb
    return float(np.sum(z * z / w) / q)


# ---------------------------------------------------------------------------- verdicts

def _p(p: float) -> str:
    """'= 0.041', '< 0.001' or 'n/a': cnnlab.stats.format_p after a p."""
    from cnnlab.stats import format_p

    text = format_p(p)
    return text if text[0] in "<n" else f"= {text}"


def _f(F: float) -> str:
    return "inf" if F == math.inf else "n/a" if not math.isfinite(F) else f"{F:.3g}" if F < 10 else f"{F:.1f}"


def _others(t: str, used: Sequence[str]) -> str:
    rest = [f for f in used if f not in t.split(":")]
    return " and ".join([", ".join(rest[:-1]), rest[-1]] if len(rest) > 2 else rest)


def _interaction_verdict(t, used, q, F, df, p, alpha, pw) -> str:
    a, b = t.split(":")
    over = _others(t, used)
    tail = f", averaged over {over}" if over else ""
    if math.isfinite(p) and p < alpha:
        return f"{a}'s effect depends on {b} (interaction F({q}, {df}) = {_f(F)}, {pw} {_p(p)}{tail})"
    return (f"no evidence that {a}'s effect depends on {b} ({pw} {_p(p)}{tail}); "
            f"this is not evidence of no interaction")


def _main_verdict(t, used, mains, q, F, df, p, alpha, margin, pw, inter) -> str:
    over = _others(t, used)
    test = f"F({q}, {df}) = {_f(F)}, {pw} {_p(p)}"
    how = f"(averaged over {over}; {test})" if over else f"({test})"

    def ci(e):
        return f"{e.estimate:+.2f} points [{e.ci_low:+.2f}, {e.ci_high:+.2f}]"

    sizes = "; ".join(f"{e.label}: {ci(e)}" for e in mains)
    if all(-margin < e.ci_low and e.ci_high < margin for e in mains):
        s = f"{t}'s effect is negligible within ±{margin:g} points {how}: {sizes}"
    elif math.isfinite(p) and p < alpha:
        s = f"{t} changes accuracy {how}: {sizes}"
    else:
        s = f"no evidence that {t} changes accuracy {how}: {sizes}"
    if inter:
        s += f"; but its effect depends on {' and '.join(next(x for x in u.split(':') if x != t) for u in inter)}"
    return s
