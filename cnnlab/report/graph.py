"""The model graph: Graphviz DOT built from spec.layer_table, rendered with `dot -Tpng`.

One node per layer, labelled on one line with its name, output shape and parameter count; layers of one
block (conv1, fc2, out) sit in one box. When `dot` is not installed (or fails) the caller
gets the reason and shows the layer list instead.

module_dot(module, in_shape) draws any nn.Module from its torch.fx trace instead: one node per
layer and per function call (torch.add, F.relu, flatten, mean, ...), an edge per data flow, so a
skip connection shows as the edge that skips the block; when tracing fails it falls back to the
layer list as a chain and says why.

Which `dot` runs: $CNNLAB_DOT when set (a path or a command name), else `dot` on PATH.
Tests point CNNLAB_DOT at a missing file, or pass `dot=` explicitly.
"""

from __future__ import annotations

import dataclasses
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


def _header(title: str) -> list[str]:
    return [
        "digraph model {",
        '  graph [rankdir=TB, fontname="Helvetica", fontsize=11, nodesep=0.2, ranksep=0.12'
        + (f", label={_q(title)}, labelloc=t" if title else "") + "];",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, fillcolor="#ffffff", height=0.28, margin="0.12,0.04"];',
        '  edge [arrowsize=0.6];',
    ]


def dot_source(rows: list[Layer], in_shape, title: str = "") -> str:
    lines = _header(title) + [f'  input [label={_q("input " + _shape(in_shape))}, fillcolor="#f3f3f3"];']
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


def module_dot(module, in_shape, title: str = "") -> tuple[str, str]:
    """(DOT source, why) for any nn.Module on inputs of shape in_shape (C, H, W).

    The graph comes from torch.fx.symbolic_trace, with output shapes from ShapeProp on one zero
    input of batch 1 (eval mode, no autograd; parameters, buffers and training flags stay as
    they were): a node per layer (its output shape and parameters, "frozen" when none train),
    per function or method call (add, relu, flatten, mean, ...) and per parameter used
    directly; an edge per tensor passed on, so x + f(x) has the edge from x to the add. Nodes
    of one submodule (layer1.0) sit in one box. why is "".

    When torch.fx cannot trace or run the module (data-dependent control flow, ...), the source
    is dot_source of cnnlab.summary.module_layers' rows (a chain, boxed by top-level child)
    and why says so: "torch.fx could not trace the model: <first line of the error>; the graph
    shows the layer list". A cnnlab Net gets the lab's graph, dot_source of its spec's layer
    table (the report's), why "". SpecError when the module does not run on that input at all.
    """
    from cnnlab.summary import _first_line, is_lab_net, module_layers, quiet_forward, zero_input

    if is_lab_net(module):
        from cnnlab.errors import SpecError
        from cnnlab.spec import layer_table

        shape = tuple(module.in_shape)
        if tuple(in_shape) != shape:
            raise SpecError(f"this network was built for input {shape}, not {tuple(in_shape)}")
        return dot_source(layer_table(module.spec, shape, module.num_classes), shape, title), ""
    import torch.fx
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        with quiet_forward(module):
            gm = torch.fx.symbolic_trace(module)
            ShapeProp(gm).propagate(zero_input(module, in_shape))
    except Exception as e:  # noqa: BLE001 - any failure to trace falls back to the layer list
        rows = module_layers(module, tuple(in_shape))  # SpecError when it does not run at all
        rows = [dataclasses.replace(r, block=r.block.split(".")[0]) for r in rows]
        why = f"torch.fx could not trace the model: {_first_line(e)}; the graph shows the layer list"
        return dot_source(rows, in_shape, title), why
    return _fx_dot(gm, in_shape, title), ""


def _node_shape(node, batched: bool = True) -> str:
    """"   [C, H, W]": the node's output shape without the batch dimension (batched), else whole."""
    meta = node.meta.get("tensor_meta")
    if meta is None:
        return ""
    if not hasattr(meta, "shape") and isinstance(meta, (tuple, list)):  # a tuple of tensors: the first one's
        meta = next((m for m in meta if hasattr(m, "shape")), None)
    if meta is None or not hasattr(meta, "shape"):
        return ""
    return "   " + _shape(tuple(meta.shape)[1:] if batched else tuple(meta.shape))


def _params_text(params) -> str:
    total = sum(p.numel() for p in params)
    if not total:
        return ""
    frozen = not any(p.requires_grad for p in params)
    return f"   {total:,} params" + (" (frozen)" if frozen else "")


def _fx_dot(gm, in_shape, title: str) -> str:
    import torch

    lines = _header(title)
    ids: dict = {}
    clusters: dict[str, list[str]] = {}
    loose: list[str] = []
    edges: list[str] = []
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        ident = "input" if node.op == "placeholder" and not ids else f"n_{node.name}"
        ids[node] = ident
        group = ""
        fill = "#ffffff"
        if node.op == "placeholder":
            label = ("input " + _shape(in_shape)) if ident == "input" else node.name
            fill = "#f3f3f3"
        elif node.op == "call_module":
            mod = gm.get_submodule(node.target)
            kind = type(mod).__name__
            label = f"{node.target}: {kind}{_node_shape(node)}{_params_text(list(mod.parameters()))}"
            fill = _FILL.get(kind, "#ffffff")
            group = node.target.rpartition(".")[0]
        elif node.op == "get_attr":
            attr = gm
            for part in node.target.split("."):
                attr = getattr(attr, part)
            params = [attr] if isinstance(attr, torch.nn.Parameter) else []
            label = f"{node.target}{_node_shape(node, batched=False)}{_params_text(params)}"
            fill = "#fff2cc" if params else "#eeeeee"
            group = node.target.rpartition(".")[0]
        else:  # call_function, call_method
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
            label = f"{name}{_node_shape(node)}"
            fill = "#ead1dc"
            stack = list((node.meta.get("nn_module_stack") or {}).values())  # (qualified name, class), outermost first
            group = stack[-1][0] if stack and isinstance(stack[-1], tuple) and isinstance(stack[-1][0], str) else ""
        line = f"{ident} [label={_q(label)}, fillcolor=\"{fill}\"];"
        (clusters.setdefault(group, []) if group else loose).append(line)
        seen = set()
        for src in node.all_input_nodes:
            if src in ids and src not in seen:
                seen.add(src)
                edges.append(f"  {ids[src]} -> {ident};")
    lines += ["  " + line for line in loose]
    for i, (group, members) in enumerate(clusters.items()):
        lines.append(f"  subgraph cluster_{i} {{")
        lines.append(f'    label={_q(group)}; style="rounded,dashed"; color="#999999"; fontsize=10;')
        lines += ["    " + line for line in members]
        lines.append("  }")
    lines += edges
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
