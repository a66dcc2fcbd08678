"""cnnlab train: one run into a run directory."""

from __future__ import annotations

import argparse

from cnnlab.commands._common import add_model_args, add_train_args


def register(sub) -> None:
    p = sub.add_parser("train", help="train one model into a run directory",
                       description="Train one model and write its run directory (config, metrics, log, "
                                   "split, predictions, checkpoints, result.json).")
    add_model_args(p, required=False)
    add_train_args(p)
    p.add_argument("--out", metavar="DIR", help="run directory (default: runs/<model>-seed<N>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run from its last checkpoint (its config.toml is used)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys
    import time
    from pathlib import Path

    from cnnlab.errors import ConfigError, RunError

    if args.resume:
        from cnnlab.config import load_config

        out = Path(args.resume)
        if not (out / "config.toml").exists():
            raise RunError(f"--resume {out}: not a run directory (no config.toml)")
        if args.preset or args.config:
            raise ConfigError("--resume uses the run's own config.toml; drop --preset/--config")
        cfg = load_config(out / "config.toml")
    else:
        if not (args.preset or args.config):
            raise ConfigError("give a model: --preset NAME or --config FILE (see `cnnlab train --help`)")
        from cnnlab.commands._common import config_from_args

        cfg = config_from_args(args)
        name = args.preset or Path(args.config).stem
        out = Path(args.out or f"runs/{name}-seed{cfg.train.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
        if (out / "result.json").exists() or (out / "checkpoints" / "last.safetensors").exists():
            raise RunError(f"{out} already holds a run; use another --out, or --resume {out} to continue it")

    from cnnlab.data import load_dataset

    ds = load_dataset(cfg.data.name)
    from cnnlab.spec import layer_table

    layer_table(cfg.model, ds.input_shape, ds.num_classes)  # shape errors before anything is written
    echo, progress, close = _console(cfg.train.epochs)
    from cnnlab.train import train_run

    try:
        train_run(cfg, out, dataset=ds, resume=bool(args.resume), echo=echo, progress=progress,
                  command="cnnlab " + " ".join(sys.argv[1:]))
    finally:
        close()
    print(f"run directory: {out}")
    return 0


def _console(epochs: int):
    """print + a tqdm bar for the current epoch when stderr is a terminal."""
    import sys

    if not sys.stderr.isatty():
        return print, None, lambda: None
    from tqdm import tqdm

    state = {"bar": None}

    def progress(epoch, step, steps):
        bar = state["bar"]
        if bar is None or bar.desc != f"epoch {epoch + 1}/{epochs}":
            if bar is not None:
                bar.close()
            bar = state["bar"] = tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False)
        bar.update(step - bar.n)

    def echo(line):
        tqdm.write(line)

    def close():
        if state["bar"] is not None:
            state["bar"].close()

    return echo, progress, close
