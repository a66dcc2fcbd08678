"""cnnlab eval: re-evaluate a finished run on its test set, in eval mode and the lab's train mode."""

from __future__ import annotations

from cnnlab.commands._common import add_trust_code


def register(sub) -> None:
    p = sub.add_parser("eval", help="re-evaluate a run's checkpoint on the test set")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--checkpoint", choices=["last", "best"], default="last",
                   help="which checkpoint (default: last, the model result.json describes)")
    p.add_argument("--device", default="cpu", help="device (default: cpu)")
    add_trust_code(p, "evaluate it")
    p.set_defaults(func=run)


def run(args) -> int:
    """A thin layer over cnnlab.api.evaluate_run (Run.evaluate)."""
    from cnnlab import api

    result = api.evaluate_run(args.run_dir, args.checkpoint, args.device, args.trust_code, note=print)
    for mode, label in (("eval", "eval mode"), ("train", "train mode (the lab's way)")):
        print(f"{label:<28} test loss: {result[mode]['test_loss']:.4f} "
              f"test accuracy: {result[mode]['test_accuracy']:.4f}")
    return 0
