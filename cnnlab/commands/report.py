"""cnnlab report: rebuild a study's report from its stored results (no training)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "report", help="write STUDY/report.md and STUDY/report.html from a study's stored results",
        description="Read a study directory (made by `cnnlab study`) and write report.md, a self-contained "
                    "report.html and report_files/*.png into it. Nothing is trained; rebuilding from "
                    "unchanged results gives identical files.")
    p.add_argument("study_dir", metavar="STUDY_DIR", help="the study directory (holds study.json and runs/)")
    p.add_argument("--dot", metavar="PATH",
                   help="Graphviz dot executable for the model graphs (default: $CNNLAB_DOT, else `dot` on PATH; "
                        "without it the report lists the layers instead)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cnnlab.report import build_report

    md, html = build_report(Path(args.study_dir), dot=args.dot)
    print(md)
    print(html)
    return 0
