"""cnnlab predict: classify test images by index, or image files (PNG, JPEG, ...)."""

from __future__ import annotations

from cnnlab.commands._common import add_trust_code


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
    add_trust_code(p, "predict with it")
    p.set_defaults(func=run)


def run(args) -> int:
    """A thin layer over cnnlab.api.predict_run and save_predictions (Run.predict)."""
    from cnnlab import api

    preds = api.predict_run(args.run_dir, args.index, args.images, top_k=args.top_k, invert=args.invert,
                            checkpoint=args.checkpoint, note=lambda path, text: print(f"{path}: {text}"),
                            trust_code=args.trust_code)
    for p in preds:
        if len(preds) > 1:
            print(p.source)
        print(f"predicted: {p.predicted}")
        print("top-k: " + ", ".join(f"{c}: {q:.4f}" for c, q in p.top_k))
    if args.save_image:
        api.save_predictions(preds, args.save_image, saved=lambda path: print(f"saved {path}"))
    return 0
