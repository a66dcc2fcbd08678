"""cnnlab study: run every (variant, seed) of a study file, then write the report."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("study", help="run a study file's variants over seeds and write its report",
                       description="Run each (variant, seed) of a study file as a run directory under "
                                   "--out/runs/, in parallel; finished runs are skipped; then write "
                                   "report.html and report.md.")
    p.add_argument("study_file", metavar="FILE", help="a study TOML file, e.g. studies/lab2.toml")
    p.add_argument("--out", metavar="DIR", help="study directory (default: studies-out/<study name>)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="parallel runs (default: one per CPU core, each with one thread)")
    p.add_argument("--threads", type=int, default=1, metavar="N", help="intra-op threads per worker (default: 1)")
    p.add_argument("--seeds", type=int, metavar="N", help="use seeds 0..N-1 instead of the file's")
    p.add_argument("--until-resolved", action="store_true", default=None,
                   help="add seeds in rounds until every comparison is resolved (one side better, or equivalent "
                        "within the margin) or --max-seeds is reached; intervals become anytime-valid "
                        "(also [stopping] until_resolved = true in the study file)")
    p.add_argument("--max-seeds", type=int, metavar="N",
                   help="with --until-resolved: at most seeds 0..N-1 per variant (default: the study file's "
                        "[stopping] max_seeds, else 20); raise it later to continue a study")
    p.add_argument("--export", action="store_true", default=None,
                   help="export every finished run to ONNX fp32 and int8 with its checks and figures (as `cnnlab "
                        "export RUN --int8`; needs the deploy extra); the report gains a Deployment section "
                        "(also [export] in the study file)")
    p.add_argument("--epochs", type=int, metavar="N", help="override every variant's epochs")
    p.add_argument("--limit", type=int, metavar="N", help="train on the first N training images (quick runs)")
    p.add_argument("--data", metavar="NAME", help="override every variant's dataset")
    p.add_argument("--device", metavar="D", help="override every variant's device (auto, cpu, cuda, ...)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local worker processes (default) or a Ray cluster")
    p.add_argument("--address", metavar="ADDR", help="Ray cluster address (default: start a local Ray instance)")
    p.add_argument("--gpus-per-run", type=float, default=1.0, metavar="F",
                   help="with --executor ray and a cuda device: GPUs each run asks for; a fraction packs "
                        "several runs on one GPU (default: 1)")
    p.add_argument("--batch-seeds", type=int, default=1, metavar="K",
                   help="train up to K seeds of a variant as one batched network (for a GPU; each run keeps "
                        "its own results; default: 1, each run alone)")
    p.add_argument("--retries", type=int, default=3, metavar="N",
                   help="times a run whose worker died is resumed (default: 3)")
    p.add_argument("--no-report", action="store_true", help="skip writing the report at the end")
    p.set_defaults(func=run)


def run(args) -> int:
    """A thin layer over cnnlab.api.study, which prints the lines and runs the study."""
    import sys

    from cnnlab import api

    result = api.study(args.study_file, out=args.out, seeds=args.seeds, epochs=args.epochs, limit=args.limit,
                       workers=args.workers, threads=args.threads, data=args.data, device=args.device,
                       until_resolved=args.until_resolved, max_seeds=args.max_seeds, executor=args.executor,
                       address=args.address, gpus_per_run=args.gpus_per_run, batch_seeds=args.batch_seeds,
                       retries=args.retries, export=args.export, report=not args.no_report,
                       command="cnnlab " + " ".join(sys.argv[1:]))
    return 1 if result.counts["failed"] else 0
