"""Argument helpers shared by the commands that build a run configuration."""

from __future__ import annotations

import argparse
import dataclasses


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--preset", metavar="NAME", help="a built-in model: lab2-3c3f-bn, lab2-3c3f, lab2-2c3f, lab2-2c2f")
    g.add_argument("--config", metavar="FILE", help="a TOML run configuration or model spec (see README)")


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="NAME", help="mnist | fashion-mnist | cifar10 | idx:DIR | npz:FILE | folder:DIR (default: mnist, or the config's)")
    p.add_argument("--epochs", type=int, metavar="N", help="epochs (default: 10)")
    p.add_argument("--batch-size", type=int, metavar="N", help="batch size (default: 50)")
    p.add_argument("--lr", type=float, metavar="X", help="Adam learning rate (default: 0.001)")
    p.add_argument("--seed", type=int, metavar="N", help="seed for split, init, order and dropout (default: 0)")
    p.add_argument("--device", metavar="D", help="auto | cpu | cuda | cuda:N | mps (default: auto = CUDA, then MPS, then CPU)")
    p.add_argument("--limit", type=int, metavar="N",
                   help="train on the first N images of the training split; validation and test stay whole (default: all)")
    p.add_argument("--val-size", type=int, metavar="N", help="validation images held out of the training file (default: 5000)")
    p.add_argument("--eval-mode", choices=["eval", "train"],
                   help="headline evaluation: eval = model.eval() (default); train = the lab's way, dropout/BN left "
                        "in training mode. Both are always recorded in result.json")
    p.add_argument("--threads", type=int, metavar="N",
                   help="threads for the run, cnnlab's C step included (default: torch's count, every physical "
                        "core; use 1 when other jobs share the cores)")
    p.add_argument("--log", metavar="NAMES",
                   help="experiment trackers that also record the run, comma-separated: tensorboard, mlflow "
                        "(each an extra: pip install -e '.[tensorboard]'); '' = none (default: the config's, else "
                        "none; docs/trackers.md)")


def add_trust_code(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--trust-code", action="store_true",
                   help=f"a run whose model comes from a factory (model.factory in its config.toml): import and "
                        f"run that code to {what}. Without it such a run is refused, naming the module")


def load_config_file(path):
    """A run configuration file, or a bare model spec (top-level conv/fc lists) with default settings."""
    import tomllib
    from pathlib import Path

    from cnnlab.config import RunConfig, load_config
    from cnnlab.spec import load_spec_toml

    path = Path(path)
    try:
        keys = set(tomllib.loads(path.read_text(encoding="utf-8")))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        keys = set()  # let load_config produce the precise error
    if keys and keys <= {"conv", "fc"}:
        return RunConfig(model=load_spec_toml(path), preset=None)
    return load_config(path)


def config_from_args(args):
    """--preset/--config plus flag overrides -> a validated RunConfig."""
    from cnnlab.config import RunConfig, config_from_dict, log_names, validate
    from cnnlab.errors import SpecError
    from cnnlab.spec import PRESETS

    if getattr(args, "preset", None):
        if args.preset not in PRESETS:
            raise SpecError(f"unknown preset {args.preset!r}; available: {', '.join(PRESETS)}")
        cfg = config_from_dict({"model": {"preset": args.preset}})
    else:  # a file, or (from cnnlab.api.train) a RunConfig already built
        cfg = args.config if isinstance(args.config, RunConfig) else load_config_file(args.config)
    data = {k: v for k, v in (("name", args.data), ("limit", args.limit), ("val_size", args.val_size)) if v is not None}
    train = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr),
                               ("seed", args.seed), ("device", args.device), ("eval_mode", args.eval_mode),
                               ("threads", args.threads)) if v is not None}
    if args.log is not None:  # "tensorboard,mlflow" (the CLI's) or a list of names (cnnlab.train's)
        log = [n.strip() for n in args.log.split(",") if n.strip()] if isinstance(args.log, str) else args.log
        train["log"] = log_names(log, "--log")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **data),
                              train=dataclasses.replace(cfg.train, **train))
    validate(cfg, "command line")
    return cfg
