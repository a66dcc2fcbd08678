"""Which figures the report has, their file names and captions: glue between the numbers
(analyze.py) and the drawing (plots.py, graph.py). Every figure is PNG bytes in memory;
build_report writes them to report_files/ and embeds them in report.html.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cnnlab.report import graph, plots
from cnnlab.report.analyze import Analysis, protocol_line
from cnnlab.report.collect import Study, load_test_images


@dataclass
class Fig:
    name: str  # file name in report_files/
    png: bytes
    alt: str
    caption: str


@dataclass
class GraphInfo:
    fig: Fig | None
    reason: str  # why there is no picture (dot missing, spec unusable)
    rows: list | None  # spec.layer_table rows, for the fallback list


@dataclass
class Figures:
    all: dict[str, Fig] = field(default_factory=dict)  # file name -> figure
    graph: dict[str, GraphInfo] = field(default_factory=dict)
    loss: dict[str, Fig] = field(default_factory=dict)
    accuracy: dict[str, Fig] = field(default_factory=dict)
    example: dict[str, Fig] = field(default_factory=dict)
    example_note: dict[str, str] = field(default_factory=dict)  # why an example has no image
    interaction: dict[tuple[str, str, str], Fig] = field(default_factory=dict)  # (mode, a, b) -> plot
    deploy: Fig | None = None  # size against accuracy of every exported variant, fp32 and int8
    compare: dict[str, Fig] = field(default_factory=dict)
    confusion: Fig | None = None
    misclassified: Fig | None = None
    misclassified_note: str = ""
    class_names: list[str] = field(default_factory=list)  # of the best variant's dataset
    variant_class_names: dict[str, list[str]] = field(default_factory=dict)

    def add(self, fig: Fig) -> Fig:
        self.all[fig.name] = fig
        return fig


def slugs(names, prefix: str) -> dict[str, str]:
    """Unique, file-name-safe stems: 'no BN' -> 'prefix-no-BN' (suffixed -2, -3 on a clash)."""
    out, used = {}, set()
    for name in names:
        base = f"{prefix}-" + (re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "x")
        stem, k = base, 2
        while stem.lower() in used:
            stem, k = f"{base}-{k}", k + 1
        used.add(stem.lower())
        out[name] = stem
    return out


def class_label(names: list[str], i: int) -> str:
    """Class i's name where known, else its number."""
    return names[i] if 0 <= i < len(names) else str(i)


def _class_names(classes: list[str] | None, k: int) -> list[str]:
    names = list(classes or [])
    return [names[i] if i < len(names) else str(i) for i in range(k)]


def make_figures(study: Study, an: Analysis, dot: str | None = None) -> Figures:
    from cnnlab.spec import ModelSpec, layer_table

    figs = Figures()
    foot = protocol_line(study, an)
    vslug = slugs(study.variants, "")
    band = "line: mean over seeds; band: min-max over seeds"

    # Test images, once per dataset name (never downloaded, never fatal).
    images: dict[str, tuple] = {}
    for v in study.variants.values():
        name = str(v.config.get("data", {}).get("name", ""))
        if name and name not in images:
            images[name] = load_test_images(name, v.data_info.get("sha256"))

    def data_of(variant: str):
        name = str(study.variants[variant].config.get("data", {}).get("name", ""))
        return images.get(name, (None, None, "the variant's configuration names no dataset"))

    for name, vs in an.variants.items():
        s = vslug[name]
        v = study.variants[name]
        n = f"n = {len(vs.finished_seeds)} finished seed" + ("s" if len(vs.finished_seeds) != 1 else "")
        # model graph
        if v.spec is None:
            figs.graph[name] = GraphInfo(None, f"the configuration does not give a usable model: {v.spec_error}", None)
        elif not isinstance(v.spec, ModelSpec):  # a factory's module: the graph its runs stored
            source = v.stored("graph_dot")
            notes = [ln[len("// note: "):] for ln in (source or "").splitlines() if ln.startswith("// note: ")]
            png, why = graph.render_png(source, dot) if source and "digraph" in source else (
                None, notes[0] if notes else "no finished run stored graph.dot")
            fig = figs.add(Fig(f"graph{s}.png", png, f"model graph of {name}",
                               f"Model graph of {name}, traced from the module (torch.fx): one node per layer or "
                               "operation with its output shape; a skip connection is an edge that jumps ahead"
                               + (f". Note: {notes[0]}" if notes else "") + ".")) if png else None
            figs.graph[name] = GraphInfo(fig, why, None)
        elif vs.in_shape is None or vs.num_classes is None:
            figs.graph[name] = GraphInfo(None, "no finished run records the input shape and number of classes", None)
        else:
            try:
                rows = layer_table(v.spec, vs.in_shape, vs.num_classes)
            except Exception as e:  # noqa: BLE001 - a SpecError here only costs the graph
                figs.graph[name] = GraphInfo(None, f"the model does not fit the data: {e}", None)
            else:
                png, why = graph.render_png(graph.dot_source(rows, vs.in_shape, name), dot)
                fig = figs.add(Fig(f"graph{s}.png", png, f"model graph of {name}",
                                   f"Model graph of {name}: one node per layer with its output shape "
                                   f"(without the batch dimension) and parameter count.")) if png else None
                figs.graph[name] = GraphInfo(fig, why, rows)
        # loss and accuracy curves
        c = vs.curves
        if "train_loss" in c or "val_loss" in c:
            panels = [{"title": t, "ylabel": "loss (sum of per-batch mean losses)", "lines": [(t, c[k])]}
                      for k, t in (("train_loss", "train loss"), ("val_loss", "validation loss")) if k in c]
            figs.loss[name] = figs.add(Fig(
                f"loss{s}.png", plots.curves(panels, foot, f"{name}: loss ({n})"), f"loss plot of {name}",
                f"Loss of {name} per epoch ({n}; {band}). Train and validation losses are sums of "
                f"per-batch mean losses, as in the lab, so their scales differ with the number of "
                f"batches; they are drawn in separate panels. {foot}"))
        lines = [(t, c[k]) for k, t in (("train_acc", "train"), ("val_acc", "validation")) if k in c]
        if lines:
            figs.accuracy[name] = figs.add(Fig(
                f"accuracy{s}.png",
                plots.curves([{"title": "accuracy", "ylabel": "accuracy (%)", "lines": lines}], foot,
                             f"{name}: accuracy ({n})"),
                f"accuracy plot of {name}",
                f"Train and validation accuracy of {name} per epoch ({n}; {band}). {foot}"))
        # example prediction
        ex = vs.example
        if ex is not None:
            imgs, classes, why = data_of(name)
            cname = _class_names(classes, vs.num_classes or 0)
            figs.variant_class_names[name] = cname
            try:
                idx, label, pred = int(ex["index"]), int(ex["label"]), int(ex["predicted"])
                top = [(class_label(cname, int(c)), float(p)) for c, p in ex.get("top_k", [])]
            except (KeyError, TypeError, ValueError) as e:
                figs.example_note[name] = f"result.json `example` is incomplete: {e}"
                continue
            image = None
            if imgs is not None and 0 <= idx < len(imgs):
                image = imgs[idx]
            elif imgs is not None:
                why = f"test index {idx} is outside the dataset's {len(imgs)} test images"
            if image is None:
                figs.example_note[name] = f"The image itself is not shown: {why}."
            caption = f"test image #{idx}: true {class_label(cname, label)}, predicted {class_label(cname, pred)}"
            figs.example[name] = figs.add(Fig(
                f"example{s}.png", plots.example(image, caption, top, foot, f"{name}, seed {vs.example_seed}"),
                f"test image {idx} with its prediction by {name}",
                f"{caption[0].upper() + caption[1:]} by {name} (seed {vs.example_seed}, headline eval mode), "
                f"with the top-{len(top)} class probabilities. {foot}"))

    # overlaid validation accuracy per comparison
    cslug = slugs([c.name for c in an.comparisons], "compare")
    for comp in an.comparisons:
        variants = comp.comparison.variants if len(comp.comparison.a) == 1 else ()  # not for a contrast
        lines = [(f"{x} (n = {len(an.variants[x].finished_seeds)})", an.variants[x].curves["val_acc"])
                 for x in variants if "val_acc" in an.variants[x].curves]
        if lines:
            figs.compare[comp.name] = figs.add(Fig(
                f"{cslug[comp.name]}.png",
                plots.curves([{"title": "validation accuracy", "ylabel": "accuracy (%)", "lines": lines}],
                             foot, f"{comp.name}: {comp.a} vs {comp.b}"),
                f"validation accuracy of {comp.a} and {comp.b}",
                f"Validation accuracy per epoch, {comp.a} vs {comp.b} ({band}). {foot}"))

    # interaction plots of a [grid] study: one per pair of factors and eval mode
    for g in an.grid:
        if g.factorial is None:
            continue
        from itertools import combinations

        from cnnlab.report.interaction import interaction_figure

        for fa, fb in combinations(g.factorial.factors, 2):
            name = f"interaction-{g.mode}-{slugs([fa], 'f')[fa]}-{slugs([fb], 'f')[fb]}.png"
            fig = interaction_figure(g.factorial, g.values, study.cells, fa, fb,
                                     ylabel=f"test accuracy, {g.mode} mode (%)")
            figs.interaction[(g.mode, fa, fb)] = figs.add(Fig(
                name, plots.png(fig), f"interaction plot of {fa} and {fb}, {g.mode} mode",
                f"Mean test accuracy ({g.mode} mode) of each cell of the grid, one line per level of {fa}, "
                f"with 95% t-intervals over seeds. Parallel lines: {fa}'s effect does not depend on {fb}. {foot}"))

    # deployment: size against accuracy, fp32 and int8 of every exported variant
    if an.deploy:
        points = []
        for dv in an.deploy:
            for kind, summ in (("fp32", dv.fp32), ("int8", dv.int8)):
                kb = dv.figures.get(f"size_{kind}_bytes")
                if kb is not None and summ.n:
                    points.append((f"{dv.variant} {kind}", kb / 1000, summ.mean, summ.ci_low, summ.ci_high))
        if points:
            figs.deploy = figs.add(Fig(
                "deploy-size-accuracy.png", plots.size_accuracy(points, foot, "size and accuracy, ONNX fp32 and int8"),
                "model size against test accuracy, fp32 and int8",
                f"ONNX file size against test accuracy (onnxruntime, whole test set), circles fp32 and squares "
                f"int8, mean with 95% t-interval over the exported seeds. {foot}"))

    # diagnostics of the best variant
    d = an.diagnostics
    if d.best is not None:
        imgs, classes, why = data_of(d.best)
        figs.class_names = _class_names(classes, d.classes)
        if d.confusion is not None:
            seeds = ", ".join(str(s) for s in d.confusion_seeds)
            figs.confusion = figs.add(Fig(
                "confusion.png",
                plots.confusion(d.confusion, figs.class_names, foot, f"{d.best}: confusion matrix"),
                f"confusion matrix of {d.best}",
                f"Confusion matrix of {d.best} on the test set, counts summed over seeds {seeds} "
                f"(rows: true class, columns: predicted class). {foot}"))
        if d.misclassified:
            if imgs is None:
                figs.misclassified_note = f"The images are not shown: {why}."
            elif max(i for i, _, _ in d.misclassified) >= len(imgs):
                figs.misclassified_note = ("The images are not shown: the predictions index past the "
                                           f"dataset's {len(imgs)} test images.")
            else:
                figs.misclassified = figs.add(Fig(
                    "misclassified.png",
                    plots.image_grid([imgs[i] for i, _, _ in d.misclassified],
                                     [f"#{i}: true {class_label(figs.class_names, t)}, "
                                      f"pred {class_label(figs.class_names, p)}" for i, t, p in d.misclassified],
                                     foot, f"{d.best}, seed {d.misclassified_seed}: misclassified test images"),
                    f"misclassified test images of {d.best}",
                    f"The first {len(d.misclassified)} of {d.n_wrong} misclassified test images of {d.best} "
                    f"(seed {d.misclassified_seed}, headline eval mode), in test-set order. {foot}"))
    return figs

