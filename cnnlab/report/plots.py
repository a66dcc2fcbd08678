"""The report's figures, drawn with matplotlib's Agg canvas (no pyplot, no global state).

Each function takes plain numbers and returns PNG bytes. Output is byte-for-byte
reproducible: matplotlib's default style (a user's matplotlibrc is ignored), fixed size and
dpi, and no "Software" or date metadata in the PNG. Every figure carries the protocol line
(dataset, split, epochs, seeds, device, eval mode) at its foot, so a figure copied out of the
report still says what it shows.
"""

from __future__ import annotations

import io
import textwrap
from contextlib import contextmanager
from typing import Sequence

import numpy as np

DPI = 100
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
RC = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.fontsize": 8,
    "path.simplify": True,
}


@contextmanager
def _style():
    """matplotlib's default style plus RC: a user's matplotlibrc cannot change the output."""
    import matplotlib
    from matplotlib import style

    with style.context("default"), matplotlib.rc_context(RC):
        yield


def _figure(width: float, height: float, footer: str, *, left: float = 0.8, right: float = 0.25,
            top: float = 0.6, bottom: float = 0.55, wspace: float = 0.3, hspace: float = 0.4):
    """A Figure with fixed margins (in inches) and the footer text below the axes.

    Fixed margins instead of constrained layout: the same output, at half the drawing time.
    The footer adds to the height, so the axes keep their size.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lines = textwrap.wrap(footer, width=int(width * 17)) if footer else []
    foot = 0.14 * len(lines) + 0.1 if lines else 0.0
    height += foot
    with _style():  # figure creation reads rcParams
        fig = Figure(figsize=(width, height), dpi=DPI)
        FigureCanvasAgg(fig)
        fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=(bottom + foot) / height,
                            top=1 - top / height, wspace=wspace, hspace=hspace)
        if lines:
            fig.text(0.08 / width, 0.06 / height, "\n".join(lines), fontsize=7, color="#444444",
                     va="bottom", ha="left")
    return fig


def png(fig) -> bytes:
    buf = io.BytesIO()
    with _style():
        fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


# ---------------------------------------------------------------------------- curves

def curves(panels: Sequence[dict], footer: str, title: str = "", width_per_panel: float = 4.6,
           height: float = 3.6) -> bytes:
    """Line + band plots. Each panel: {"title", "ylabel", "lines": [(label, curve)]}, where a
    curve has .epochs, .mean, .low, .high (the band, here min-max over seeds)."""
    return png(curves_figure(panels, footer, title, width_per_panel, height))


def curves_figure(panels: Sequence[dict], footer: str, title: str = "", width_per_panel: float = 4.6,
                  height: float = 3.6):
    """curves() as a matplotlib Figure (Agg canvas, no pyplot), for cnnlab.api's Run.plot()."""
    fig = _figure(width_per_panel * len(panels), height, footer)
    with _style():
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, panel in zip(axes, panels):
            for i, (label, cv) in enumerate(panel["lines"]):
                color = COLORS[i % len(COLORS)]
                x = np.asarray(cv.epochs)
                ax.plot(x, cv.mean, color=color, marker="o", markersize=3, linewidth=1.5, label=label)
                ax.fill_between(x, cv.low, cv.high, color=color, alpha=0.18, linewidth=0)
            ax.set_title(panel["title"])
            ax.set_xlabel("epoch")
            ax.set_ylabel(panel["ylabel"])
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.legend(loc="best")
        if title:
            fig.suptitle(title)
    return fig


# ---------------------------------------------------------------------------- confusion

def confusion(matrix: np.ndarray, class_names: Sequence[str], footer: str, title: str = "") -> bytes:
    k = matrix.shape[0]
    side = max(4.0, 0.45 * k + 2.0)
    fig = _figure(side + 1.4, side, footer, left=1.0, bottom=0.75, right=0.3, top=0.45)
    with _style():
        ax = fig.subplots()
        im = ax.imshow(matrix, cmap="Blues", interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.8, label="count")
        ax.set_xticks(range(k), [str(c) for c in class_names], rotation=45 if k > 10 else 0, ha="right" if k > 10 else "center")
        ax.set_yticks(range(k), [str(c) for c in class_names])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.grid(False)
        top = matrix.max() if matrix.size else 0
        for i in range(k):
            for j in range(k):
                if matrix[i, j]:
                    ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if matrix[i, j] > top / 2 else "black")
        if title:
            ax.set_title(title)
    return png(fig)


# ---------------------------------------------------------------------------- images

def _show(ax, image: np.ndarray) -> None:
    """An image with values 0..255: (H, W) in gray, (H, W, 3) in colour."""
    if image.ndim == 3:
        ax.imshow(np.clip(image, 0, 255).astype(np.uint8), interpolation="nearest")
    else:
        ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")


def image_grid(images: Sequence[np.ndarray], captions: Sequence[str], footer: str, title: str = "",
               cols: int = 5) -> bytes:
    n = len(images)
    cols = max(1, min(cols, n))
    rows = max(1, -(-n // cols))
    fig = _figure(1.6 * cols + 0.4, 1.75 * rows + 0.9, footer, left=0.2, right=0.2, top=0.7, bottom=0.1,
                  wspace=0.15, hspace=0.35)
    with _style():
        axes = fig.subplots(rows, cols, squeeze=False)
        for k, ax in enumerate(axes.ravel()):
            ax.axis("off")
            if k < n:
                _show(ax, images[k])
                ax.set_title(captions[k], fontsize=8)
        if title:
            fig.suptitle(title)
    return png(fig)


def example(image: np.ndarray | None, caption: str, top_k: Sequence[tuple[str, float]], footer: str,
            title: str = "") -> bytes:
    """One test image with its prediction, and the top-k probabilities as bars."""
    panels = 2 if image is not None else 1
    fig = _figure(3.3 * panels + 0.6, 3.4, footer, left=0.3 if image is not None else 1.0, wspace=0.45,
                  top=0.75)
    with _style():
        axes = fig.subplots(1, panels, squeeze=False)[0]
        if image is not None:
            _show(axes[0], image)
            axes[0].axis("off")
            axes[0].set_title(caption)
        ax = axes[-1]
        names = [str(c) for c, _ in top_k][::-1]
        probs = [float(p) for _, p in top_k][::-1]
        ax.barh(range(len(probs)), probs, color=COLORS[0])
        ax.set_yticks(range(len(probs)), names)
        ax.set_xlim(0, 1)
        ax.set_xlabel("probability")
        ax.set_title("top-k" if image is not None else f"{caption}\ntop-k (image not available)")
        for y, p in enumerate(probs):
            ax.text(min(p + 0.02, 0.8), y, f"{p:.3f}", va="center", fontsize=8)
        if title:
            fig.suptitle(title)
    return png(fig)


# ---------------------------------------------------------------------------- deployment

def size_accuracy(points: Sequence[tuple[str, float, float, float, float]], footer: str, title: str = "") -> bytes:
    """Model size against accuracy, one marker per variant and format: points are
    (label, size in KB, mean accuracy, ci_low, ci_high); the error bar is the 95% CI over seeds."""
    fig = _figure(5.6, 3.8, footer, left=0.8, right=1.9)
    with _style():
        ax = fig.subplots()
        for i, (label, kb, mean, lo, hi) in enumerate(points):
            yerr = None if np.isnan(lo) else [[mean - lo], [hi - mean]]
            ax.errorbar([kb], [mean], yerr=yerr, fmt="os"[i % 2], color=COLORS[(i // 2) % len(COLORS)],
                        capsize=3, markersize=5, label=label)
        ax.set_xlabel("model file size (KB)")
        ax.set_ylabel("test accuracy (%)")
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7, frameon=False)
        if title:
            ax.set_title(title)
    return png(fig)
