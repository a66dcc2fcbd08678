"""cnnlab export: a run's model as ONNX fp32 (and static int8, and a C header), checked and measured."""

from __future__ import annotations

from cnnlab.commands._common import add_trust_code


def register(sub) -> None:
    p = sub.add_parser("export", help="export a run to ONNX (fp32, int8) and a C header, with checks and figures",
                       description="Export RUN_DIR's last checkpoint to ONNX: model.onnx (fp32), model.int8.onnx "
                                   "(--int8: static QDQ, per-channel), model_int8.h (--c-header) and export.json "
                                   "(checks, accuracy, sizes, MACs, latency on one CPU thread). Needs the deploy "
                                   "extra: pip install -e '.[deploy]'. See docs/deploy.md.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", metavar="DIR", help="output directory (default: RUN_DIR/export); an earlier export "
                                                "there is replaced when the new one has passed its checks")
    p.add_argument("--int8", action="store_true", help="also write model.int8.onnx, statically quantised")
    p.add_argument("--calibration", type=int, default=500, metavar="N",
                   help="int8 calibration images, class-balanced, from the run's training split (default: 500)")
    p.add_argument("--c-header", action="store_true",
                   help="also write model_int8.h, the int8 tensors as C arrays (implies --int8)")
    add_trust_code(p, "export it")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from cnnlab.deploy import export_run

    out = Path(args.out) if args.out else Path(args.run_dir) / "export"
    info = export_run(args.run_dir, out=out, int8=args.int8, calibration=args.calibration, c_header=args.c_header,
                      trust_code=args.trust_code)

    def fmt(v, unit=""):
        return "-" if v is None else f"{v:.2f}{unit}" if isinstance(v, float) else f"{v}{unit}"

    print(f"checks passed: onnx.checker; fp32 logits within {info['check_atol']:g} of torch "
          f"(max {info['check_max_abs_diff']:.2g}) and the same argmax on {info['check_images']} test images"
          + ("; int8 weights in every Conv and Gemm" if info["check_int8_weights"] else ""))
    print(f"{'':<8}{'accuracy %':>12}{'size KB':>10}{'p50 us':>9}{'p99 us':>9}")
    print(f"{'torch':<8}{fmt(info['test_accuracy_torch']):>12}{'':>10}"
          f"{fmt(info['latency_torch_p50_us']):>9}{fmt(info['latency_torch_p99_us']):>9}")
    for kind in ("fp32", "int8"):
        size = info[f"size_{kind}_bytes"]
        print(f"{'ORT ' + kind:<8}{fmt(info[f'test_accuracy_{kind}']):>12}"
              f"{'-' if size is None else f'{size / 1000:.1f}':>10}"
              f"{fmt(info[f'latency_{kind}_p50_us']):>9}{fmt(info[f'latency_{kind}_p99_us']):>9}")
    if info["argmax_agreement_int8"] is not None:
        print(f"int8 agrees with fp32 on {info['argmax_agreement_int8']:.2f}% of {info['n_test']} test images "
              f"(calibrated on {info['calibration_images']} training images)")
    print(f"{info['params']:,} parameters, {info['macs']:,} MACs per image; batch 1, one thread, "
          f"{info['cpu_model']}")
    print(f"exported to {out}")
    return 0
