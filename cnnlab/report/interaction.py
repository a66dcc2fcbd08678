"""The interaction plot of two factors of a grid (cnnlab.factorial): cell means over seeds.

    fig = interaction_figure(fac, values, cells, "bn", "conv_dropout")

x axis: the levels of b; one line per level of a; each point is a cell's mean over its seeds
with a 95% t-interval (none when the cell has 1 seed). Parallel
lines mean no interaction. With 3+ factors a point pools the cells of the other factors
(their seeds averaged cell by cell first, so each cell weighs the same). Returns a
matplotlib Figure built without pyplot (no global state); the caller saves it.
"""

from __future__ import annotations

import math

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
RC = {"font.size": 8, "axes.titlesize": 9, "axes.grid": True, "grid.alpha": 0.3, "legend.fontsize": 7}


def _point(samples: list[float]):
    """(mean, low, high) of per-seed values: the 95% t-interval, the value itself for n = 1."""
    from cnnlab.stats import summarize

    s = summarize(samples)
    return (s.mean, s.mean, s.mean) if s.n < 2 else (s.mean, s.ci_low, s.ci_high)


def interaction_figure(fac, values, cells, a: str, b: str, ylabel: str = "test accuracy (%)"):
    """Interaction plot of factors a (lines) and b (x axis) for a cnnlab.factorial.Factorial."""
    import matplotlib
    from matplotlib import style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from cnnlab.errors import ConfigError
    from cnnlab.factorial import _key, format_level

    for f in (a, b):
        if f not in fac.factors:
            raise ConfigError(f"interaction_figure: {f!r} is not an analysed factor ({', '.join(fac.factors)})")
    if a == b:
        raise ConfigError("interaction_figure: a and b must be two different factors")
    la, lb = fac.factors[a], fac.factors[b]
    ka, kb = [_key(v) for v in la], [_key(v) for v in lb]

    # per (level of a, level of b): the seed values of one cell, or with 3+ factors the cell
    # means of the cells pooled over the other factors
    groups: dict[tuple[int, int], list[list[float]]] = {}
    for variant, lv in cells.items():
        i, j = ka.index(_key(lv[a])), kb.index(_key(lv[b]))
        vals = [float(v) for _, v in sorted((values.get(variant) or {}).items(), key=lambda kv: str(kv[0]))]
        groups.setdefault((i, j), []).append(vals)

    x = list(range(len(lb)))
    width = 0.08 * (len(la) - 1)
    with style.context("default"), matplotlib.rc_context(RC):
        fig = Figure(figsize=(4.5, 3.2), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for i, level in enumerate(la):
            means, lo, hi = [], [], []
            for j in x:
                cellsets = [v for v in groups.get((i, j), []) if v]
                if len(cellsets) == 1:
                    m, l, h = _point(cellsets[0])
                elif cellsets:  # pooled over other factors: mean and interval of the cell means
                    m, l, h = _point([sum(v) / len(v) for v in cellsets])
                else:
                    m = l = h = math.nan
                means.append(m)
                lo.append(l)
                hi.append(h)
            dx = [j - width / 2 + (width * i / (len(la) - 1) if len(la) > 1 else width / 2) for j in x]
            color = COLORS[i % len(COLORS)]
            ax.plot(dx, means, "o-", color=color, label=f"{a}={format_level(level)}", markersize=4)
            yerr = [[m - l if math.isfinite(m) else 0.0 for m, l in zip(means, lo)],
                    [h - m if math.isfinite(m) else 0.0 for m, h in zip(means, hi)]]
            ax.errorbar(dx, means, yerr=yerr, fmt="none", ecolor=color, elinewidth=1, capsize=2.5)
        ax.set_xticks(x, [format_level(v) for v in lb])
        ax.set_xlim(-0.5, len(lb) - 0.5)
        ax.set_xlabel(b)
        ax.set_ylabel(ylabel)
        ax.legend(title=a, loc="best", frameon=False)
        name = f"{a}:{b}" if any(t.name == f"{a}:{b}" for t in fac.terms) else f"{b}:{a}"
        term = next((t for t in fac.terms if t.name == name), None)
        if term is not None and math.isfinite(term.p):
            pw = "p" if fac.robust == "classical" else "robust p"
            ax.set_title(f"{a} × {b}\ninteraction F({term.df_num}, {term.df_den}) = {term.stat:.3g}, "
                         f"{pw} = {term.p:.2g}")
        else:
            ax.set_title(f"{a} × {b}")
        fig.text(0.99, 0.005, "mean ± 95% CI over seeds", ha="right", va="bottom", fontsize=6, color="#555555")
    return fig
