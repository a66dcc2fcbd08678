"""cnnlab summary: the lab's model summary table, from the spec alone (no training).

The table is the report's (cnnlab.summary.format_layers) plus a "Total mult-adds" line after the
parameter counts: multiply-accumulates for one input, as torchinfo counts them."""

from __future__ import annotations


def register(sub) -> None:
    from cnnlab.commands._common import add_model_args

    p = sub.add_parser("summary", help="print a model's layers, output shapes, parameter counts and mult-adds")
    add_model_args(p)
    p.add_argument("--input", metavar="CxHxW", default="1x28x28", help="input shape (default: 1x28x28)")
    p.add_argument("--classes", type=int, default=10, metavar="N", help="number of classes (default: 10)")
    p.set_defaults(func=run)


def run(args) -> int:
    """Parses --input, then a thin layer over cnnlab.api.summary."""
    from cnnlab import api
    from cnnlab.errors import SpecError

    try:
        shape = tuple(int(v) for v in args.input.lower().split("x"))
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError
    except ValueError:
        raise SpecError(f"--input {args.input!r}: expected CxHxW with positive sizes, e.g. 1x28x28") from None
    print(api.summary(args.preset or None, config=None if args.preset else args.config, input_shape=shape,
                      num_classes=args.classes))
    return 0
