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
    import os
    import sys
    from pathlib import Path

    from cnnlab.errors import ConfigError
    from cnnlab.runner import run_study
    from cnnlab.study import load_study, override

    study = override(load_study(args.study_file), seeds=args.seeds, epochs=args.epochs, limit=args.limit,
                     device=args.device, data=args.data, until_resolved=args.until_resolved,
                     max_seeds=args.max_seeds)
    for flag in ("workers", "threads", "retries", "batch_seeds"):
        v = getattr(args, flag)
        if v is not None and v < (0 if flag == "retries" else 1):
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= {0 if flag == 'retries' else 1}, got {v}")
    out = Path(args.out or f"studies-out/{study.name}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = args.workers or max(1, cores // max(1, args.threads))
    if args.executor == "ray":
        from cnnlab.ray_executor import RayExecutor

        executor = RayExecutor(address=args.address, threads=args.threads, retries=args.retries,
                               study_dir=out, gpus_per_run=args.gpus_per_run, batch_seeds=args.batch_seeds)
    else:
        if args.address:
            raise ConfigError("--address is for --executor ray")
        from cnnlab.executors import LocalExecutor

        executor = LocalExecutor(workers, args.threads, args.retries, batch_seeds=args.batch_seeds)
    n_runs = len(study.variants) * len(study.seeds)
    rounds = (f", then seeds until resolved, at most {study.stopping.max_seeds} per variant"
              if study.stopping.until_resolved else "")
    print(f"study {study.name}: {len(study.variants)} variants x {len(study.seeds)} seeds = {n_runs} runs{rounds} "
          f"-> {out} ({args.executor}" + (f", {workers} workers x {args.threads} thread(s))" if args.executor == "local" else ")"),
          flush=True)
    if args.batch_seeds > 1 and all(c.train.device == "cpu" for c in study.variants.values()):
        print(f"note: --batch-seeds {args.batch_seeds} on the CPU trains on torch's kernels, about 0.3x the speed of "
              "separate runs on cnnlab's native ones; it is meant for a GPU (docs/performance.md, GPU)", flush=True)
    counts = run_study(study, out, executor, Path(args.study_file), command="cnnlab " + " ".join(sys.argv[1:]),
                       report=not args.no_report)
    print(f"{counts['done']} runs trained, {counts['skipped']} already finished, {counts['failed']} failed "
          f"in {counts['wall_seconds']:.1f} s")
    if "report" in counts:
        print(f"report: {counts['report']}")
    return 1 if counts["failed"] else 0
