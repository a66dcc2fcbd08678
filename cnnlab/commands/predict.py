"""cnnlab predict: classify test images by index, or image files (PNG, JPEG, ...)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("predict", help="predict test image N or image files with a trained run",
                       description="Predict with a run's model: `--index 4` takes test image 4 (as the lab "
                                   "does); image files are converted to grayscale, resized to the model's "
                                   "input and inverted when needed (see README).")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files to classify")
    p.add_argument("--index", type=int, metavar="N", help="classify test image N instead of files")
    p.add_argument("--top-k", type=int, default=3, metavar="K", help="probabilities to show (default: 3)")
    p.add_argument("--invert", choices=["auto", "yes", "no"], default="auto",
                   help="invert image files: auto detects dark strokes on a light background (default: auto)")
    p.add_argument("--save-image", metavar="PATH",
                   help="write the input with its predicted label as PNG (a directory when several images)")
    p.add_argument("--checkpoint", choices=["last", "best"], default="last", help="which checkpoint (default: last)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from cnnlab.errors import ConfigError
    from cnnlab.inference import load_run_model, predict_arrays

    if (args.index is None) == (not args.images):
        raise ConfigError("give either --index N or one or more IMAGE files")
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    model, cfg, meta = load_run_model(args.run_dir, args.checkpoint)
    h, w = meta["in_shape"][1:]
    names, arrays = [], []
    if args.index is not None:
        from cnnlab.data import load_dataset

        ds = load_dataset(cfg.data.name)
        n = len(ds.test_labels)
        if not 0 <= args.index < n:
            raise ConfigError(f"--index {args.index}: the test set has images 0..{n - 1}")
        arrays.append(ds.test_images[args.index].astype("float32") / 255.0)
        names.append(f"test[{args.index}] (label {int(ds.test_labels[args.index])})")
    else:
        from cnnlab.images import load_image

        for path in args.images:
            arr, notes = load_image(path, (h, w), args.invert)
            arrays.append(arr)
            names.append(path)
            for note in notes:
                print(f"{path}: {note}")
    import numpy as np

    results = predict_arrays(model, np.stack(arrays), args.top_k)
    for name, (pred, top) in zip(names, results):
        if len(names) > 1:
            print(name)
        print(f"predicted: {pred}")
        print("top-k: " + ", ".join(f"{c}: {p:.4f}" for c, p in top))
    if args.save_image:
        from cnnlab.images import save_labeled_image

        target = Path(args.save_image)
        for i, (arr, (pred, _)) in enumerate(zip(arrays, results)):
            if len(arrays) > 1:
                target.mkdir(parents=True, exist_ok=True)
                path = target / f"prediction-{i}.png"
            else:
                path = target
            save_labeled_image(arr, f"predicted: {pred}", path)
            print(f"saved {path}")
    return 0
