"""The `cnnlab` command line.

Each subcommand lives in its own module under cnnlab/commands/ and registers itself
through one `register(subparsers)` function (the accelerate pattern). Command modules
import torch & co. only inside their run function, so `cnnlab --help` stays fast.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys

from cnnlab import __version__
from cnnlab.errors import CnnlabError

# Order here is the order in `cnnlab --help`.
COMMANDS = ["train", "study", "report", "eval", "predict", "export", "summary", "data", "env"]


class _Parser(argparse.ArgumentParser):
    """argparse exits with 2 on a bad flag already; keep its message to one line + usage hint."""

    def error(self, message):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cnnlab",
        description="Train small CNN variants over seeds and report whether their differences are real.",
    )
    parser.add_argument("--version", action="version", version=f"cnnlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"cnnlab.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CnnlabError as e:
        print(f"cnnlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cnnlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        # Disk full, permission denied, missing directory...: environment faults, not bugs.
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"cnnlab {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2


def console() -> None:
    """The `cnnlab` console script (and `python -m cnnlab.cli`): main(), then exit.

    Before exiting, gc.freeze(): everything main() wrote is closed and on disk, and the
    interpreter's exit would otherwise run a last garbage collection over every object
    torch created at import, about 0.25 s per process here (8% of a one-epoch `cnnlab
    train`). atexit handlers still run and the memory still goes back to the system. Only
    here, not in main(), which tests and notebooks call in a process that goes on."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    console()
