"""cnnlab train: one run into a run directory."""

from __future__ import annotations

import argparse

from cnnlab.commands._common import add_model_args, add_train_args, add_trust_code


def register(sub) -> None:
    p = sub.add_parser("train", help="train one model into a run directory",
                       description="Train one model and write its run directory (config, metrics, log, "
                                   "split, predictions, checkpoints, result.json).")
    add_model_args(p, required=False)
    add_train_args(p)
    p.add_argument("--out", metavar="DIR", help="run directory (default: runs/<model>-seed<N>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run from its last checkpoint (its config.toml is used)")
    add_trust_code(p, "resume it (with --resume; training from your own --config needs no flag)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """A thin layer over cnnlab.api.train / cnnlab.api.resume."""
    import sys

    from cnnlab import api
    from cnnlab.errors import ConfigError

    command = "cnnlab " + " ".join(sys.argv[1:])
    if args.resume:
        if args.preset or args.config:
            api.check_resumable(args.resume)  # a directory that is not a run is named first, as always
            raise ConfigError("--resume uses the run's own config.toml; drop --preset/--config")
        run = api.resume(args.resume, command=command, trust_code=args.trust_code)
    else:
        run = api.train(args.preset, config=args.config, data=args.data, epochs=args.epochs,
                        batch_size=args.batch_size, lr=args.lr, seed=args.seed, limit=args.limit,
                        val_size=args.val_size, eval_mode=args.eval_mode, device=args.device,
                        threads=args.threads, log=args.log, out=args.out, command=command)
    print(f"run directory: {run.path}")
    return 0
