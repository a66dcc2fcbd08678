"""Statistics over seeds: summaries, paired comparisons, and verdicts a reader can act on.

Every claim the report makes about a variant or a difference comes from here:

    summarize([87.1, 86.9, 87.4])                   -> Summary(n, mean, std, ci_low, ci_high)
    paired({0: 87.1, 1: 86.9}, {0: 86.0, 1: 86.5})  -> Paired (matched seeds only, unadjusted)
    decide(paired, 0.5, m=4, sequential=True)       -> Decision: the interval and the verdict
    verdict_text("A", "B", decision)                -> one sentence

Conventions: sd uses ddof=1 (seeds are a sample); `summarize` and `paired` give plain 95%
t-intervals. A verdict uses one interval, and the verdict and the interval always agree:

- **Multiplicity**: the family is the study's m comparisons; each interval has confidence
  1 - alpha/m (Bonferroni), so all m hold together with probability >= 1 - alpha.
- **Fixed n** (a study run with a set number of seeds): the paired t-interval at 1 - alpha/m.
- **Sequential** (`--until-resolved`: seeds are added until the verdicts settle): looking
  after every round would break a fixed-n interval, so the interval is an anytime-valid
  confidence sequence instead. It comes from the e-value of the "safe t-test" (Grünwald, de
  Heide & Koolen, "Safe testing", JRSS B 2024; Pérez-Ortiz, Lardy, de Heide & Grünwald,
  "E-statistics, group invariance and anytime-valid testing", Ann. Statist. 2024): the
  likelihood ratio of the paired t statistic under effect sizes +-dz against 0, mixed over
  the dz in MIXTURE (most weight on dz = 2, informative at 5-20 seeds),
      E_n = sum_k w_k (f_nct(t; n-1, +dz_k sqrt n) + f_nct(t; n-1, -dz_k sqrt n)) / (2 f_t(t; n-1)),
  a test martingale under the null whatever sigma is, so by Ville's inequality it ever
  reaches m/alpha with probability <= alpha/m, however often one looks and whenever one
  stops. The confidence sequence is every mu whose E_n stays below m/alpha: the mean
  +- anytime_t(n) * sd / sqrt(n). It is valid for normal differences; tests/test_sequential.py
  checks by simulation that it holds for the heavy-tailed accuracies of the lab's networks.
- **Verdicts**: "A better" when the interval lies above 0, "B better" when below,
  "equivalent within +-margin" when it lies inside (-margin, margin) (an interval test, the
  same as TOST at that level), otherwise "undetermined", with the seeds a study like this
  would need, projected from the observed mean and sd.

Nothing here formats tables; render.py does.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import optimize
from scipy import stats as _st

ALPHA = 0.05
CONFIDENCE = 0.95
SEEDS_CAP = 100  # projections of the seeds needed give up above this
# The sequential test's alternatives: paired effect sizes dz (mean / sd of differences), each
# +- with half its weight. Most weight on dz = 2, the size of the lab's large effects, so that
# 5-8 seeds can resolve them; dz = 0.5 keeps any real difference resolvable in the end
# (the half-width shrinks to ~0.3 sd by n = 200). docs/statistics.md has the comparison.
MIXTURE = ((2.0, 0.75), (0.5, 0.25))
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


# ---------------------------------------------------------------------------- paired

@dataclass(frozen=True)
class Paired:
    seeds: tuple[int, ...]  # the matched seeds, sorted
    n: int
    mean_diff: float  # mean of a[s] - b[s]
    sd_diff: float  # ddof=1; NaN when n < 2
    ci_low: float  # unadjusted 95% t-interval
    ci_high: float
    t: float
    p: float  # two-sided paired t-test, unadjusted; NaN when n < 2
    effect_size: float  # dz = mean_diff / sd_diff (inf when sd = 0 and mean != 0)


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> Paired:
    """Paired comparison of two sides over the seeds both finished (a - b), unadjusted.

    A seed present on one side only is ignored: pairing is what removes the seed's share of
    the noise (same split, same init stream), so an unmatched value cannot take part.
    """
    seeds = tuple(sorted(set(a) & set(b)))
    d = np.array([float(a[s]) - float(b[s]) for s in seeds], dtype=float)
    n = len(seeds)
    if n == 0:
        return Paired(seeds, 0, _NAN, _NAN, _NAN, _NAN, _NAN, _NAN, _NAN)
    mean = float(d.mean())
    if n == 1:
        return Paired(seeds, 1, mean, _NAN, _NAN, _NAN, _NAN, _NAN, _NAN)
    sd = float(d.std(ddof=1))
    # Differences that are all equal (to float precision) have sd = 0: the t statistic is
    # infinite unless the mean is 0 too. Treat that exactly instead of letting scipy warn.
    if sd <= 1e-12 * max(1.0, abs(mean)):
        if abs(mean) <= 1e-12:
            return Paired(seeds, n, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0)
        inf = math.copysign(math.inf, mean)
        return Paired(seeds, n, mean, 0.0, mean, mean, inf, 0.0, inf)
    t = mean / (sd / math.sqrt(n))
    p = float(2 * _st.t.sf(abs(t), n - 1))
    lo, hi = t_interval(mean, sd, n)
    return Paired(seeds, n, mean, sd, lo, hi, float(t), p, float(mean / sd))


def contrast(sides: Sequence[Mapping[int, float]], signs: Sequence[int]) -> dict[int, float]:
    """Per seed, sum(sign * side[seed]) over the seeds every side has: (A - B) - (C - D) is
    contrast([A, B, C, D], [1, -1, -1, 1]). A pairwise comparison needs no contrast."""
    seeds = set.intersection(*(set(s) for s in sides)) if sides else set()
    return {s: float(sum(sign * float(side[s]) for side, sign in zip(sides, signs))) for s in sorted(seeds)}


# ---------------------------------------------------------------------------- sequential

def log_e_value(t: float, n: int, mixture=MIXTURE) -> float:
    """log E_n of the two-sided safe t-test (module docstring) for t statistic t at n pairs:
    sum over (dz, w) in mixture of w/2 * (f_nct(t; +dz sqrt n) + f_nct(t; -dz sqrt n)) / f_t(t)."""
    if n < 2:
        return 0.0
    nu = n - 1
    nc = np.array([s * dz * math.sqrt(n) for dz, _ in mixture for s in (1, -1)])
    logw = np.array([math.log(w / 2) for _, w in mixture for _ in (1, -1)])
    if nu > 300:  # scipy's noncentral t overflows there; both t laws are normal to within 1/nu
        return float(np.logaddexp.reduce(logw + _st.norm.logpdf(t, nc)) - _st.norm.logpdf(t))
    # far in the tails scipy's noncentral t can return NaN for a density that underflows
    logf = np.nan_to_num(_st.nct.logpdf(t, nu, nc), nan=-np.inf)
    return float(np.logaddexp.reduce(logw + logf) - _st.t.logpdf(t, nu))


@functools.lru_cache(maxsize=4096)
def anytime_t(n: int, alpha: float) -> float:
    """The |t| at which E_n reaches 1/alpha: the confidence sequence is mean +- this * sd/sqrt(n).
    inf while no t can reach it (too few seeds: the first finite value is at n = first_n)."""
    if n < 2:
        return math.inf
    target = math.log(1.0 / alpha)
    f = lambda t: log_e_value(t, n) - target  # noqa: E731 - increasing in t > 0
    hi = 1.0
    while f(hi) < 0:
        hi *= 2.0
        if hi > 1e6 or not math.isfinite(f(hi)):
            return math.inf
    return float(optimize.brentq(f, 0.0, hi, xtol=1e-10, rtol=1e-12))


# ---------------------------------------------------------------------------- decisions

@dataclass(frozen=True)
class Decision:
    kind: str  # "a" (A better) | "b" (B better) | "equivalent" | "undetermined"
    n: int  # matched seeds it rests on
    diff: float  # mean of A - B
    ci_low: float  # the interval the verdict uses: adjusted, sequential when the study is
    ci_high: float
    level: float  # that interval's confidence, 1 - alpha/m
    m: int  # comparisons in the family
    sequential: bool
    margin: float
    p: float  # adjusted p that agrees with the interval (<= alpha exactly when it excludes 0)
    more: int | None  # about this many more seeds would resolve it; None: > SEEDS_CAP or unknown

    @property
    def resolved(self) -> bool:
        return self.kind != "undetermined"

    @property
    def method(self) -> str:
        adj = f"Bonferroni over {self.m}" if self.m > 1 else "one comparison"
        how = "anytime-valid (sequential)" if self.sequential else "fixed-n t"
        return f"{self.level:.2%} {how} interval ({adj})".replace(".00%", "%")


def _multiplier(n: int, alpha: float, sequential: bool) -> float:
    if n < 2:
        return math.inf
    return anytime_t(n, alpha) if sequential else float(_st.t.ppf(1 - alpha / 2, n - 1))


def seeds_more(mean: float, sd: float, n: int, alpha: float, sequential: bool, margin: float,
               cap: int = SEEDS_CAP) -> int | None:
    """Projected extra seeds until the interval resolves, if the mean and sd stay as observed:
    the smallest n' > n whose half-width is below |mean| (one side better) or below
    margin - |mean| (equivalent). None when it would take more than `cap` seeds or sd is unknown."""
    if n < 2 or not (math.isfinite(mean) and math.isfinite(sd)):
        return None
    need = max(abs(mean), margin - abs(mean))
    if need <= 0:
        return None
    for n2 in range(n + 1, cap + 1):
        if _multiplier(n2, alpha, sequential) * sd / math.sqrt(n2) < need:
            return n2 - n
    return None


def decide(pr: Paired, margin: float, m: int = 1, sequential: bool = False,
           alpha: float = ALPHA) -> Decision:
    """The verdict on a paired difference A - B, in a family of m comparisons (module docstring)."""
    m = max(1, int(m))
    a = alpha / m
    level = 1 - a
    if pr.n < 2:
        return Decision("undetermined", pr.n, pr.mean_diff, _NAN, _NAN, level, m, sequential, margin, _NAN, None)
    if not math.isfinite(_multiplier(pr.n, a, sequential)):  # too few seeds for any interval yet
        lo = hi = _NAN
        p = 1.0
    elif pr.sd_diff == 0.0:  # identical differences: the interval is the point
        lo = hi = pr.mean_diff
        p = 0.0 if pr.mean_diff != 0 else 1.0
    else:
        se = pr.sd_diff / math.sqrt(pr.n)
        half = _multiplier(pr.n, a, sequential) * se
        lo, hi = pr.mean_diff - half, pr.mean_diff + half
        if sequential:
            p = min(1.0, m * math.exp(-log_e_value(pr.t, pr.n)))
        else:
            p = min(1.0, m * pr.p)
    if math.isnan(lo):
        kind = "undetermined"
    elif lo > 0:
        kind = "a"
    elif hi < 0:
        kind = "b"
    elif -margin < lo and hi < margin:
        kind = "equivalent"
    else:
        kind = "undetermined"
    more = None if kind != "undetermined" else seeds_more(pr.mean_diff, pr.sd_diff, pr.n, a, sequential, margin)
    return Decision(kind, pr.n, pr.mean_diff, lo, hi, level, m, sequential, margin, p, more)


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


def interval_text(lo: float, hi: float, digits: int = 2) -> str:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "no interval yet"
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]"


def _seeds(n: int) -> str:
    return f"{n} seed" + ("" if n == 1 else "s")


def verdict_text(a: str, b: str, d: Decision, digits: int = 2, detail: bool = True, better: str = "better") -> str:
    """'A better by 15.80 pts [9.10, 22.50] (6 seeds)', 'equivalent within ±0.5 pts ...', or why
    not yet; detail=False leaves out the interval and the seeds (a table shows them beside it).
    a and b name the two sides (a variant, or a difference of two: then better="larger")."""
    ci = interval_text(d.ci_low, d.ci_high, digits)
    if d.n == 0:
        return "no seed finished on both sides"
    if d.kind in ("a", "b"):
        winner = a if d.kind == "a" else b
        inside = (f", inside the ±{d.margin:g} pts margin" if d.margin > 0 and -d.margin < d.ci_low
                  and d.ci_high < d.margin else "")
        head = f"{winner} {better} by {abs(d.diff):.{digits}f} pts"
        return f"{head} {ci} ({_seeds(d.n)}{inside})" if detail else head + (f" ({inside[2:]})" if inside else "")
    if d.kind == "equivalent":
        head = f"equivalent within ±{d.margin:g} pts"
        return f"{head}: {a} − {b} = {d.diff:+.{digits}f} {ci} ({_seeds(d.n)})" if detail else head
    if d.n < 2:
        more = "at least 2 are needed for an interval"
    else:
        more = f"about {d.more} more needed" if d.more is not None else f"more than {SEEDS_CAP} more needed"
    head = f"undetermined after {_seeds(d.n)} ({more})"
    return f"{head}; {a} − {b} = {d.diff:+.{digits}f} {ci}" if detail and d.n >= 1 else head
