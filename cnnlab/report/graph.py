"""The model graph: Graphviz DOT built from spec.layer_table, rendered with `dot -Tpng`.

One node per layer, labelled on one line with its name, output shape and parameter count; layers of one
block (conv1, fc2, out) sit in one box. When `dot` is not installed (or fails) the caller
gets the reason and shows the layer list instead.

Which `dot` runs: $CNNLAB_DOT when set (a path or a command name), else `dot` on PATH.
Tests point CNNLAB_DOT at a missing file, or pass `dot=` explicitly.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from cnnlab.spec import Layer

DOT_TIMEOUT = 60  # seconds
DOT_DPI = 96

_FILL = {
    "Conv2d": "#cfe2f3", "BatchNorm2d": "#fce5cd", "BatchNorm1d": "#fce5cd", "Dropout": "#eeeeee",
    "ReLU": "#d9ead3", "MaxPool2d": "#d9d2e9", "Linear": "#fff2cc",
}


def _q(text: str) -> str:
    """A DOT double-quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def dot_source(rows: list[Layer], in_shape, title: str = "") -> str:
    lines = [
        "digraph model {",
        '  graph [rankdir=TB, fontname="Helvetica", fontsize=11, nodesep=0.2, ranksep=0.12'
        + (f", label={_q(title)}, labelloc=t" if title else "") + "];",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, fillcolor="#ffffff", height=0.28, margin="0.12,0.04"];',
        '  edge [arrowsize=0.6];',
        f'  input [label={_q("input " + _shape(in_shape))}, fillcolor="#f3f3f3"];',
    ]
    blocks: list[tuple[str, list[Layer]]] = []
    for r in rows:
        if not blocks or blocks[-1][0] != r.block:
            blocks.append((r.block, []))
        blocks[-1][1].append(r)
    for i, (block, layers) in enumerate(blocks):
        lines.append(f"  subgraph cluster_{i} {{")
        lines.append(f'    label={_q(block)}; style="rounded,dashed"; color="#999999"; fontsize=10;')
        for r in layers:
            label = f"{r.name}   {_shape(r.out_shape)}" + (f"   {r.params:,} params" if r.params else "")
            lines.append(f'    n{r.index} [label={_q(label)}, fillcolor="{_FILL.get(r.kind, "#ffffff")}"];')
        lines.append("  }")
    chain = ["input"] + [f"n{r.index}" for r in rows]
    lines.append("  " + " -> ".join(chain) + ";")
    lines.append("}")
    return "\n".join(lines) + "\n"


def find_dot(dot: str | None = None) -> str | None:
    """The dot executable to run, or None when there is none."""
    cmd = dot or os.environ.get("CNNLAB_DOT") or "dot"
    if os.sep in cmd:
        return cmd if os.path.isfile(cmd) and os.access(cmd, os.X_OK) else None
    return shutil.which(cmd)


def render_png(source: str, dot: str | None = None) -> tuple[bytes | None, str]:
    """(PNG bytes, "") or (None, why). Never raises for a missing or failing dot."""
    exe = find_dot(dot)
    if exe is None:
        wanted = dot or os.environ.get("CNNLAB_DOT") or "dot"
        return None, (f"Graphviz `dot` was not found ({wanted!r}); install graphviz "
                      f"(Debian: apt-get install graphviz) to get the model graph")
    try:
        proc = subprocess.run([exe, "-Tpng", f"-Gdpi={DOT_DPI}"], input=source.encode("utf-8"),
                              capture_output=True, timeout=DOT_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"Graphviz `dot` ({exe}) could not run: {e}"
    if proc.returncode != 0 or not proc.stdout.startswith(b"\x89PNG"):
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        return None, f"Graphviz `dot` ({exe}) failed with exit code {proc.returncode}" + (
            f": {err[0]}" if err else "")
    return proc.stdout, ""
