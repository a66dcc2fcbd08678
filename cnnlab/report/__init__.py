"""The study report: STUDY/report.md, STUDY/report.html and STUDY/report_files/*.png.

    from cnnlab.report import build_report
    md, html = build_report(Path("studies-out/lab2"))

Built from stored results only (docs/layout.md), never by training. The pipeline keeps
computation and display apart:

    collect.py   study dir -> plain data (runs, metrics, results; failed/missing runs kept)
    analyze.py   plain data -> numbers (cnnlab.stats: summaries, intervals, verdicts; factorial)
    figures.py   numbers -> PNG figures (plots.py: matplotlib Agg; graph.py: Graphviz dot)
    render.py    numbers + figures -> Markdown and self-contained HTML

Rebuilding from unchanged results gives byte-identical files.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["build_report"]


def build_report(study_dir: Path, *, dot: str | None = None) -> tuple[Path, Path]:
    """Write report.md, report.html and report_files/*.png into study_dir; return (md, html).

    `dot`: the Graphviz executable to use (default: $CNNLAB_DOT, else `dot` on PATH).
    Raises cnnlab.report.collect.StudyError (a CnnlabError) when study_dir is not a study.
    """
    from cnnlab.fsutil import atomic_write, atomic_write_text
    from cnnlab.report import analyze, collect, figures, render

    study_dir = Path(study_dir)
    study = collect.load_study(study_dir)
    an = analyze.analyze(study)
    figs = figures.make_figures(study, an, dot=dot)
    blocks = render.document(study, an, figs, model_summaries(study, an))

    files = study_dir / render.FILES_DIR
    files.mkdir(exist_ok=True)
    for name, fig in sorted(figs.all.items()):
        atomic_write(files / name, fig.png)
    for old in sorted(files.glob("*.png")):  # figures of an earlier build that this one lacks
        if old.name not in figs.all:
            old.unlink()
    md, html = study_dir / "report.md", study_dir / "report.html"
    atomic_write_text(md, render.to_markdown(blocks))
    atomic_write_text(html, render.to_html(blocks, {n: f.png for n, f in figs.all.items()},
                                           f"{study.name}: study report"))
    return md, html


def model_summaries(study, an) -> dict[str, str]:
    """The lab's model summary table per variant (cnnlab.summary; a factory's from its runs'
    summary.txt), or why there is none."""
    from cnnlab.spec import ModelSpec
    from cnnlab.summary import format_summary

    out = {}
    for name, vs in an.variants.items():
        spec = study.variants[name].spec
        if spec is None:
            out[name] = f"(no summary: {study.variants[name].spec_error})"
        elif not isinstance(spec, ModelSpec):  # a factory's module: its stored summary, never its code
            text = study.variants[name].stored("summary")
            out[name] = text.rstrip("\n") if text else "(no summary: no finished run stored summary.txt)"
        elif vs.in_shape is None or vs.num_classes is None:
            out[name] = "(no summary: no finished run records the input shape and number of classes)"
        else:
            try:
                out[name] = format_summary(spec, vs.in_shape, vs.num_classes)
            except Exception as e:  # noqa: BLE001 - a SpecError only costs this section
                out[name] = f"(no summary: {e})"
    return out
