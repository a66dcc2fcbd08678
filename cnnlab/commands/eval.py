"""cnnlab eval: re-evaluate a finished run on its test set, in eval mode and the lab's train mode."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("eval", help="re-evaluate a run's checkpoint on the test set")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--checkpoint", choices=["last", "best"], default="last",
                   help="which checkpoint (default: last, the model result.json describes)")
    p.add_argument("--device", default="cpu", help="device (default: cpu)")
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np

    from cnnlab.data import load_dataset
    from cnnlab.inference import load_run_model
    from cnnlab.train import evaluate, resolve_device, to_tensors

    device = resolve_device(args.device)
    model, cfg, meta = load_run_model(args.run_dir, args.checkpoint, device)
    ds = load_dataset(cfg.data.name)
    if list(ds.input_shape) != list(meta["in_shape"]) or ds.num_classes != meta["num_classes"]:
        from cnnlab.errors import CheckpointError

        raise CheckpointError(f"{args.run_dir}: the model expects {meta['in_shape']} with {meta['num_classes']} "
                              f"classes but {cfg.data.name} has {list(ds.input_shape)} with {ds.num_classes}")
    empty = np.zeros(0, dtype=np.int64)
    data = to_tensors(ds, empty, empty, device)
    bs = cfg.train.batch_size
    for mode, label in (("eval", "eval mode"), ("train", "train mode (the lab's way)")):
        loss, acc, _, _ = evaluate(model, data.x_test, data.y_test, bs, mode, cfg.train.seed + 2)
        print(f"{label:<28} test loss: {loss:.4f} test accuracy: {acc:.4f}")
    return 0
