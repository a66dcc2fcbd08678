"""Statistics over seeds: summaries, paired comparisons, Holm correction, plain-words verdicts.

Every claim the report makes about a variant or a difference comes from here:

    summarize([87.1, 86.9, 87.4])         -> Summary(n, mean, std, ci_low, ci_high)
    paired({0: 87.1, 1: 86.9}, {0: 86.0, 1: 86.5})  -> Paired (matched seeds only)
    holm([p1, p2, p3])                     -> Holm-Bonferroni adjusted p-values
    verdict("BN vs no BN", paired, p_holm) -> one sentence a reader can act on

Conventions: sd uses ddof=1 (seeds are a sample); intervals are two-sided 95% t-intervals;
the paired test is the two-sided paired t-test; `seeds_needed` is the smallest n for which a
paired t-test at alpha = 0.05 (two-sided) has 80% power against the observed effect size,
from the noncentral t distribution (the number G*Power prints for "difference between two
dependent means"). Nothing here formats tables; render.py does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import stats as _st

ALPHA = 0.05
POWER = 0.80
CONFIDENCE = 0.95
SEEDS_CAP = 1000  # seeds_needed gives up above this and reports ">1000"
_NAN = float("nan")


# ---------------------------------------------------------------------------- one sample

@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float  # ddof=1; NaN when n < 2
    ci_low: float  # 95% t-interval for the mean; NaN when n < 2
    ci_high: float

    def describe(self, digits: int = 2, unit: str = "%") -> str:
        """'87.12 ± 0.45 % (95% CI [86.01, 88.23], n = 3)', or the honest n < 2 forms."""
        if self.n == 0:
            return "no finished runs"
        f = f"{{:.{digits}f}}"
        u = unit if unit == "%" else f" {unit}"
        if self.n == 1:
            return f"{f.format(self.mean)}{u} (1 seed: no interval)"
        return (f"{f.format(self.mean)} ± {f.format(self.std)}{u} "
                f"(95% CI [{f.format(self.ci_low)}, {f.format(self.ci_high)}], n = {self.n})")


def t_interval(mean: float, sd: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """mean ± t_{(1+c)/2, n-1} * sd / sqrt(n); (NaN, NaN) for n < 2."""
    if n < 2 or not math.isfinite(sd):
        return _NAN, _NAN
    half = float(_st.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def summarize(values: Iterable[float]) -> Summary:
    """Mean, sd (ddof=1) and 95% t-interval of per-seed values. NaN entries are refused."""
    x = np.asarray(list(values), dtype=float)
    if np.isnan(x).any():
        raise ValueError("summarize: values contain NaN; drop unfinished runs first")
    n = int(x.size)
    if n == 0:
        return Summary(0, _NAN, _NAN, _NAN, _NAN)
    mean = float(x.mean())
    if n == 1:
        return Summary(1, mean, _NAN, _NAN, _NAN)
    sd = float(x.std(ddof=1))
    lo, hi = t_interval(mean, sd, n)
    return Summary(n, mean, sd, lo, hi)


# ---------------------------------------------------------------------------- power

def paired_power(dz: float, n: int, alpha: float = ALPHA) -> float:
    """Power of a two-sided paired t-test with n pairs against standardized effect dz."""
    df = n - 1
    tcrit = _st.t.ppf(1 - alpha / 2, df)
    nc = abs(dz) * math.sqrt(n)
    return float(_st.nct.sf(tcrit, df, nc) + _st.nct.cdf(-tcrit, df, nc))


def seeds_needed(dz: float, power: float = POWER, alpha: float = ALPHA, cap: int = SEEDS_CAP) -> int | None:
    """Smallest n >= 2 with paired_power(dz, n) >= power; None when dz ~ 0 or n would exceed cap.

    Iterates n upward from 2, a block of candidates at a time (the noncentral t cdf is
    vectorized, so checking a block costs about as much as checking one n).
    """
    if not math.isfinite(dz):
        return 2 if dz == dz else None  # infinite effect (sd = 0, mean != 0): the minimum; NaN: unknown
    dz = abs(dz)
    if dz < 1e-9:
        return None
    start, block = 2, 64
    while start <= cap:
        ns = np.arange(start, min(start + block, cap + 1))
        df = ns - 1
        tcrit = _st.t.ppf(1 - alpha / 2, df)
        nc = dz * np.sqrt(ns)
        pw = _st.nct.sf(tcrit, df, nc) + _st.nct.cdf(-tcrit, df, nc)
        hit = np.nonzero(pw >= power)[0]
        if hit.size:
            return int(ns[hit[0]])
        start += block
    return None


# ---------------------------------------------------------------------------- paired

@dataclass(frozen=True)
class Paired:
    seeds: tuple[int, ...]  # the matched seeds, sorted
    n: int
    mean_diff: float  # mean of a[s] - b[s]
    sd_diff: float  # ddof=1; NaN when n < 2
    ci_low: float
    ci_high: float
    t: float
    p: float  # two-sided paired t-test; NaN when n < 2
    effect_size: float  # dz = mean_diff / sd_diff (inf when sd = 0 and mean != 0)
    seeds_needed: int | None  # None: more than SEEDS_CAP (difference ~0) or unknown (n < 2)

    @property
    def seeds_needed_text(self) -> str:
        if self.seeds_needed is not None:
            return str(self.seeds_needed)
        return "unknown (needs 2 matched seeds)" if self.n < 2 else f">{SEEDS_CAP}"


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> Paired:
    """Paired comparison of two variants over the seeds both finished (a - b).

    A seed present on one side only is ignored: pairing is what removes the seed's share of
    the noise (same split, same init stream), so an unmatched value cannot take part.
    """
    seeds = tuple(sorted(set(a) & set(b)))
    d = np.array([float(a[s]) - float(b[s]) for s in seeds], dtype=float)
    n = len(seeds)
    if n == 0:
        return Paired(seeds, 0, _NAN, _NAN, _NAN, _NAN, _NAN, _NAN, _NAN, None)
    mean = float(d.mean())
    if n == 1:
        return Paired(seeds, 1, mean, _NAN, _NAN, _NAN, _NAN, _NAN, _NAN, None)
    sd = float(d.std(ddof=1))
    # Differences that are all equal (to float precision) have sd = 0: the t statistic is
    # infinite unless the mean is 0 too. Treat that exactly instead of letting scipy warn.
    if sd <= 1e-12 * max(1.0, abs(mean)):
        if abs(mean) <= 1e-12:
            return Paired(seeds, n, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, None)
        inf = math.copysign(math.inf, mean)
        return Paired(seeds, n, mean, 0.0, mean, mean, inf, 0.0, inf, 2)
    t = mean / (sd / math.sqrt(n))
    p = float(2 * _st.t.sf(abs(t), n - 1))
    lo, hi = t_interval(mean, sd, n)
    dz = mean / sd
    return Paired(seeds, n, mean, sd, lo, hi, float(t), p, float(dz), seeds_needed(dz))


# ---------------------------------------------------------------------------- multiplicity

def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni step-down adjusted p-values, in the input order.

    Sorted ascending, p_(i) is multiplied by (m - i + 1); a running maximum keeps the
    adjusted values monotone, and each is capped at 1. NaN p-values (comparisons with fewer
    than 2 matched seeds, so no test) stay NaN and do not count towards m.
    """
    p = [float(x) for x in pvalues]
    idx = sorted((i for i, x in enumerate(p) if not math.isnan(x)), key=lambda i: (p[i], i))
    m = len(idx)
    out = [_NAN] * len(p)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


# ---------------------------------------------------------------------------- words

def format_p(p: float) -> str:
    """0.41, 0.050, 0.012, 0.0031, < 0.001 (two significant digits below 0.1)."""
    if math.isnan(p):
        return "n/a"
    if p < 0.001:
        return "< 0.001"
    if p >= 0.1:
        return f"{p:.2f}"
    return f"{p:.2g}"


def _p_clause(label: str, p: float) -> str:
    s = format_p(p)
    return f"{label} p {s}" if s.startswith("<") else f"{label} p = {s}"


def verdict(name: str, pr: Paired, p_holm: float, unit: str = "pts", digits: int = 2,
            alpha: float = ALPHA) -> str:
    """One plain-words sentence on whether a paired difference stands out from seed noise."""
    f = f"{{:.{digits}f}}"
    if pr.n == 0:
        return f"{name}: no seed finished on both sides, so there is nothing to compare"
    diff = f"{pr.mean_diff:+.{digits}f} {unit}"
    if pr.n == 1:
        return (f"{name}: {diff} from 1 matched seed: no interval, so it cannot be told apart "
                f"from seed noise; run at least 2 seeds of each")
    ci = f"[{f.format(pr.ci_low)}, {f.format(pr.ci_high)}]"
    seeds = f"{pr.n} seed" + ("s" if pr.n != 1 else "")
    if not math.isnan(p_holm) and p_holm < alpha:
        return f"{name}: {diff} {ci}, distinguishable from seed noise ({_p_clause('Holm', p_holm)})"
    head = f"{name}: {diff} {ci}, not distinguishable from seed noise with {seeds} ({_p_clause('Holm', p_holm)})"
    if pr.seeds_needed is None:
        return (f"{head}; the difference is about zero: more than {SEEDS_CAP} seeds would be "
                f"needed to resolve it, so treat the variants as equivalent here")
    if pr.seeds_needed > pr.n:
        return f"{head}; about {pr.seeds_needed} seeds would be needed to resolve a difference of this size"
    return (f"{head}; borderline: {pr.n} seeds would resolve a difference of this size in 80% of "
            f"studies, but the correction for multiple comparisons keeps it above {alpha:g}; "
            f"a few more seeds would settle it")
