"""Export a trained run for deployment: ONNX fp32, static int8 (QDQ), a C header, the figures.

export_run(RUN_DIR) rebuilds the run's model the way `cnnlab eval` does
(inference.load_run_model), as the plain torch module (no native kernels, nn.Dropout),
in eval mode, and:

1. exports it with torch.onnx.export(dynamo=True): one file, input `x` with a dynamic
   batch dimension, output `logits`; the exporter's optimiser (onnxscript) folds each
   BatchNorm into the Conv/Gemm before it, then onnxruntime's pre-processing for
   quantisation runs (ONNX shape inference, its basic graph optimiser); a
   BatchNormalization left after that fails the export (onnxruntime's optimiser alone
   would fold Conv+BatchNormalization but leave Gemm+BatchNormalization);
2. checks it: onnx.checker; fp32 logits within CHECK_ATOL of torch's on the whole test
   set (at least MIN_CHECK_IMAGES images), the same argmax on every image;
3. with int8: onnxruntime's static quantisation, QDQ format, int8 activations and
   weights, per-channel weights, MinMax ranges calibrated on N class-balanced images of
   the run's own training split (split.npz), preprocessed as training does; checks that
   every Conv and Gemm reads int8 weights;
4. with c_header (implies int8): model_int8.h, the int8 graph's tensors as static const
   arrays for a microcontroller runtime;
5. measures, with onnxruntime's CPU provider on one thread: test accuracy fp32/int8,
   argmax agreement, sizes, parameters, MACs, and latency at batch 1 (torch, ORT fp32,
   ORT int8), and writes everything, with the run's protocol, to export.json.

Everything is written into a temporary directory next to the target and renamed into
place at the end: a failed check leaves no file behind, and a previous export untouched.
onnx, onnxruntime and onnxscript (the `deploy` extra) are imported only here, lazily.
The method and the export.json fields: docs/deploy.md.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cnnlab
from cnnlab.errors import ConfigError, RunError
from cnnlab.fsutil import _umask
from cnnlab import rundir

EXTRA = "pip install -e '.[deploy]'"
EXPORT_FORMAT = 1  # export.json's format version
CALIBRATION = 500  # default calibration images
CHECK_ATOL = 1e-4  # fp32 ONNX logits against torch
MIN_CHECK_IMAGES = 256
WARMUP, TIMED = 100, 1000  # latency: runs at batch 1
BATCH = 1000  # images per onnxruntime call when measuring accuracy
FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx", "c_header": "model_int8.h"}
# onnxruntime.quantization.quantize_static options (QuantType / CalibrationMethod by name)
QUANTIZE = {"quant_format": "QDQ", "per_channel": True, "activation_type": "QInt8", "weight_type": "QInt8",
            "calibrate_method": "MinMax", "op_types_to_quantize": None}
WEIGHTED_OPS = ("Conv", "Gemm")  # the ops whose weights must be int8 in the int8 graph


# ---------------------------------------------------------------------------- the extra

def require_extra():
    """(onnx, onnxruntime) or ConfigError saying which extra to install."""
    missing = []
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(f"cnnlab export needs the deploy extra ({', '.join(missing)} missing): {EXTRA}")
    import onnx
    import onnxruntime

    return onnx, onnxruntime


def _versions() -> dict:
    from importlib import metadata

    from cnnlab import versions

    out = versions()
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = sys.modules[name].__version__
    return out


# ---------------------------------------------------------------------------- the model

def plain_model(run_dir, which: str = "last", trust_code: bool = False):
    """(model, cfg, meta): the run's checkpoint, loaded and checked as `cnnlab eval` does,
    in the plain torch module (fast=False, nn.Dropout), in eval mode: what gets exported.
    A factory's module is already plain torch (and is built only with trust_code)."""
    from cnnlab import model as model_module
    from cnnlab.inference import load_run_model

    loaded, cfg, meta = load_run_model(run_dir, which, trust_code=trust_code)
    net = loaded.net if isinstance(loaded, model_module.Normalized) else loaded
    if isinstance(net, model_module.Net):
        plain = model_module.build_model(net.spec, net.in_shape, net.num_classes, fast_dropout=False, fast=False)
        plain.load_state_dict(net.state_dict())
        net = plain
    if isinstance(loaded, model_module.Normalized):  # the exported model takes [0, 1] pixels too
        net = model_module.Normalized(net, loaded.mean.flatten().tolist(), loaded.std.flatten().tolist())
    return net.eval(), cfg, meta


def _failed_op(e: BaseException) -> str:
    """What an exporter or quantiser failure is about: "the op aten.cummax" when it names
    an op (the usual case), else the first line of its summary."""
    text, seen, chain = "", e, set()
    while seen is not None and id(seen) not in chain:
        chain.add(id(seen))
        text += f"\n{seen}"
        seen = seen.__cause__ or seen.__context__
    for pattern in (r"OpOverload\(op='([^']+)'", r"target=(?:torch\.ops\.)?([\w.]+)"):
        m = re.search(pattern, text)
        if m:
            return f"the op {m.group(1).removesuffix('.default')}"
    summary = re.search(r"<class '[\w.]+'>: (.+)", text)
    return (summary.group(1) if summary else str(e).splitlines()[0] if str(e) else type(e).__name__).strip()


def _export_onnx(model, in_shape, run_dir):
    """torch -> ONNX ModelProto (in memory, so one file), dynamic batch, `x` -> `logits`."""
    import logging
    import warnings

    import torch

    x = torch.zeros(2, *in_shape)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping ..."
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (x,), dynamo=True, verbose=False,
                                        input_names=["x"], output_names=["logits"],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},))
    except torch.onnx.OnnxExporterError as e:
        op = _failed_op(e)
        raise RunError(f"{run_dir}: cannot export the model to ONNX (torch.onnx.export, dynamo): {op}"
                       + (" has no ONNX conversion" if op.startswith("the op ") else "")) from e
    finally:
        quiet.setLevel(level)
    return program.model_proto


def _preprocess(onnx, proto, folder: Path):
    """onnxruntime's pre-processing for quantisation (quant_pre_process): ONNX shape inference
    and its basic graph optimiser. Returns the new ModelProto."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = folder / "exported.onnx", folder / "preprocessed.onnx"
    onnx.save_model(proto, str(src), save_as_external_data=False)
    # symbolic shape inference is for dynamic shapes inside the graph; ours has only the batch
    quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    out = onnx.load_model(str(dst))
    src.unlink()
    dst.unlink()
    return out


def _ort_errors() -> tuple:
    """What onnxruntime raises for a model it cannot load, run or quantise: its own error
    classes (which derive from Exception directly) and Python's usual ones."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    own = tuple(v for v in vars(state).values()
                if isinstance(v, type) and issubclass(v, Exception) and v.__module__ == state.__name__)
    return (*own, ValueError, RuntimeError, KeyError, NotImplementedError)


def _session(onnxruntime, model_bytes: bytes, run_dir, what: str):
    """An onnxruntime CPU session on one thread (intra and inter op)."""
    so = onnxruntime.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    try:
        return onnxruntime.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    except _ort_errors() as e:  # "Could not find an implementation for Op(13) node with name ..."
        raise RunError(f"{run_dir}: onnxruntime cannot run the {what} model: "
                       f"{str(e).strip().splitlines()[0]}") from e


def _ort_logits(session, x):
    import numpy as np

    return np.concatenate([session.run(["logits"], {"x": x[s : s + BATCH]})[0] for s in range(0, len(x), BATCH)])


def _torch_logits(model, x):
    import numpy as np
    import torch

    from cnnlab.engine.run import EVAL_CHUNK

    with torch.inference_mode():
        return np.concatenate([model(torch.from_numpy(x[s : s + EVAL_CHUNK])).numpy()
                               for s in range(0, len(x), EVAL_CHUNK)])


# ---------------------------------------------------------------------------- int8

def calibration_indices(train_idx, labels, n: int, seed: int):
    """n indices of train_idx, class-balanced: a seeded shuffle, then the classes in turn
    (the counts differ by at most one, unless a class runs out)."""
    import numpy as np

    idx = np.random.default_rng(seed).permutation(np.asarray(train_idx, dtype=np.int64))
    y = labels[idx]
    rank = np.zeros(len(idx), dtype=np.int64)  # position of each image within its class
    for c in np.unique(y):
        sel = y == c
        rank[sel] = np.arange(sel.sum())
    order = np.lexsort((y, rank))  # rank 0 of every class, then rank 1, ...
    return np.sort(idx[order[:n]])


def _quantize(onnx, proto, calib_x, folder: Path, run_dir):
    """Static QDQ quantisation of proto (onnxruntime.quantization.quantize_static): ModelProto."""
    from onnxruntime import quantization as q

    src, dst = folder / "fp32.onnx", folder / "int8.onnx"
    onnx.save_model(proto, str(src), save_as_external_data=False)
    opts = dict(QUANTIZE)
    opts["quant_format"] = getattr(q.QuantFormat, opts["quant_format"])
    opts["activation_type"] = getattr(q.QuantType, opts["activation_type"])
    opts["weight_type"] = getattr(q.QuantType, opts["weight_type"])
    opts["calibrate_method"] = getattr(q.CalibrationMethod, opts["calibrate_method"])

    class Reader(q.CalibrationDataReader):  # the calibration images, 100 at a time
        def __init__(self, x, batch: int = 100):
            self.batches = iter([{"x": x[s : s + batch]} for s in range(0, len(x), batch)])

        def get_next(self):
            return next(self.batches, None)

    reader = Reader(calib_x)
    try:
        q.quantize_static(str(src), str(dst), reader, **opts)
    except _ort_errors() as e:
        raise RunError(f"{run_dir}: cannot quantise the model to int8: {_failed_op(e)}") from e
    out = onnx.load_model(str(dst))
    src.unlink()
    dst.unlink()
    return out


def _quant_key(option: str) -> str:
    """export.json's name for a QUANTIZE option: quant_format, quant_per_channel, ..."""
    return "quant_" + option.removeprefix("quant_")


def _initializers(proto) -> dict:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def _producers(proto) -> dict:
    return {o: n for n in proto.graph.node for o in n.output}


def check_int8_weights(proto, run_dir) -> list[str]:
    """Every Conv and Gemm reads its weight through a DequantizeLinear of an int8 initializer.
    Returns the checked node names; a node that does not is a RunError naming it."""
    import numpy as np

    inits, producers = _initializers(proto), _producers(proto)
    checked = []
    for n in proto.graph.node:
        if n.op_type not in WEIGHTED_OPS:
            continue
        dq = producers.get(n.input[1])
        ok = (dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits
              and inits[dq.input[0]].dtype == np.int8)
        if not ok:
            raise RunError(f"{run_dir}: the int8 model's {n.op_type} node {n.name or n.output[0]!r} has no int8 "
                           f"weights (onnxruntime did not quantise it)")
        checked.append(n.name or n.output[0])
    return checked


# ---------------------------------------------------------------------------- the C header

HEADER_OPS = ("Conv", "Gemm", "MaxPool", "Relu", "Reshape", "Flatten")


def _c_float(v: float) -> str:
    s = "%.9g" % float(v)  # 9 significant digits: a float32 reads back exactly
    if not re.search(r"[.e]", s):
        s += ".0"
    return s + "f"


def _c_int(v: int) -> str:
    return "(-2147483647 - 1)" if int(v) == -2147483648 else str(int(v))


def _c_array(ctype: str, name: str, values, comment: str) -> str:
    import numpy as np

    flat = np.asarray(values).reshape(-1)
    fmt = _c_float if ctype == "float" else _c_int
    items = [fmt(v) for v in flat.tolist()]
    lines = [", ".join(items[i : i + 12]) for i in range(0, len(items), 12)]
    body = ",\n    ".join(lines)
    return f"// {comment}\nstatic const {ctype} {name}[{len(items)}] = {{\n    {body}\n}};\n"


def _requant(in_scale: float, w_scales, out_scale: float):
    """CMSIS-NN / TFLite per-channel requantisation: scale = multiplier * 2**(shift - 31),
    multiplier a Q31 int32."""
    mults, shifts = [], []
    for ws in w_scales:
        m, e = math.frexp(float(in_scale) * float(ws) / float(out_scale))
        q = round(m * (1 << 31))
        if q == 1 << 31:
            q, e = q // 2, e + 1
        if e < -31:
            q, e = 0, 0
        mults.append(q)
        shifts.append(e)
    return mults, shifts


def header_source(int8_proto, fp32_proto, run_dir, note: str) -> str:
    """model_int8.h: the int8 graph's weights, biases, scales, zero points and shapes."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(int8_proto)
    shapes = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value for d in dims][1:]  # without the batch
    inits, producers = _initializers(int8_proto), _producers(int8_proto)
    consumers: dict[str, list] = {}
    for n in int8_proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    # which Conv/Gemm a ReLU follows, in the fp32 graph (the int8 graph folds it into the
    # output's quantisation: a zero point at -128 clamps at 0)
    fp32_consumers: dict[str, list] = {}
    for n in fp32_proto.graph.node:
        for i in n.input:
            fp32_consumers.setdefault(i, []).append(n.op_type)
    relus = [any(t == "Relu" for t in fp32_consumers.get(n.output[0], []))
             for n in fp32_proto.graph.node if n.op_type in WEIGHTED_OPS]

    def dq_source(name):  # the quantised tensor behind a DequantizeLinear output: (q, scale, zp)
        dq = producers[name]
        return dq.input[0], dq.input[1], dq.input[2]

    def out_q(name):  # the QuantizeLinear after a node's output (through a Relu): (scale, zp)
        for c in consumers.get(name, []):
            if c.op_type == "QuantizeLinear":
                return c.input[1], c.input[2]
            if c.op_type == "Relu":
                return out_q(c.output[0])
        raise RunError(f"{run_dir}: the int8 model's tensor {name!r} is not quantised; no C header for it")

    x_name = int8_proto.graph.input[0].name
    in_shape = shapes[x_name]
    body, layers, counts = [], [], {"Conv": 0, "Gemm": 0, "MaxPool": 0}
    n_weighted = 0
    for n in int8_proto.graph.node:
        op = n.op_type
        if op in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if op not in HEADER_OPS:
            raise RunError(f"{run_dir}: the C header supports {', '.join(HEADER_OPS)}; the model has {op} "
                           f"(node {n.name or n.output[0]!r})")
        src = n.input[0]
        if producers.get(src) is not None and producers[src].op_type == "DequantizeLinear":
            src = dq_source(src)[0]
        ishape, oshape = shapes.get(src, []), shapes.get(n.output[0], [])
        if op in ("Relu", "Reshape", "Flatten"):
            what = "ReLU (folded into the previous layer's output range)" if op == "Relu" else \
                "flatten: [C][H][W] -> [C*H*W], in CHW order"
            layers.append(f" *   {op:<8} {ishape} -> {oshape}: {what}")
            continue
        counts[op] += 1
        prefix = {"Conv": "conv", "Gemm": "fc", "MaxPool": "pool"}[op] + str(counts[op])
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if op == "MaxPool":
            k, s = attrs["kernel_shape"], attrs.get("strides", [1, 1])
            p = attrs.get("pads", [0, 0, 0, 0])
            layers.append(f" *   {prefix:<8} MaxPool {k[0]}x{k[1]} stride {s[0]}: {ishape} -> {oshape}"
                          " (on int8 values: same scale and zero point in and out)")
            body.append(_c_array("int32_t", f"{prefix}_shape", [*ishape, *oshape],
                                 f"{prefix} shape (derived): input C, H, W, output C, H, W"))
            body.append(_c_array("int32_t", f"{prefix}_geometry", [*k, *s, *p],
                                 f"{prefix} geometry (derived): kernel h, w, stride h, w, pads top, left, bottom, right"))
            continue
        relu = relus[n_weighted] if n_weighted < len(relus) else False
        n_weighted += 1
        x_q, x_scale, x_zp = dq_source(n.input[0])
        w_q, w_scale, w_zp = dq_source(n.input[1])
        if len(n.input) < 3 or producers.get(n.input[2]) is None:
            raise RunError(f"{run_dir}: the int8 model's {op} node {n.name!r} has no int32 bias; no C header for it")
        b_q = dq_source(n.input[2])[0]
        o_scale, o_zp = out_q(n.output[0])
        w = inits[w_q]
        if op == "Conv":
            k, s = attrs["kernel_shape"], attrs.get("strides", [1, 1])
            p = attrs.get("pads", [0, 0, 0, 0])
            if attrs.get("group", 1) != 1 or any(d != 1 for d in attrs.get("dilations", [1, 1])):
                raise RunError(f"{run_dir}: the C header supports plain convolutions (group 1, dilation 1); "
                               f"node {n.name!r} is not one")
            layout = "OIHW: [out][in][kh][kw]"
            desc = f"Conv {w.shape[1]}->{w.shape[0]} {k[0]}x{k[1]} stride {s[0]} pad {p[0]}"
        else:
            if attrs.get("transA", 0) or not attrs.get("transB", 0):
                raise RunError(f"{run_dir}: the C header supports Gemm with transB=1 only; node {n.name!r} is not")
            layout = "[out][in]"
            desc = f"Gemm {w.shape[1]}->{w.shape[0]}"
        o_zp_v = int(inits[o_zp])
        act = [o_zp_v if relu else -128, 127]
        layers.append(f" *   {prefix:<8} {desc}{', ReLU' if relu else ''}: {ishape} -> {oshape}")
        mults, shifts = _requant(inits[x_scale], inits[w_scale], inits[o_scale])
        rows = [
            ("int8_t", "weight", w, f"int8 weights {list(w.shape)} {layout} (onnx {w_q})"),
            ("int32_t", "bias", inits[b_q], f"int32 bias, scale input_scale * weight_scale[c], zero point 0 (onnx {b_q})"),
            ("float", "weight_scale", inits[w_scale], f"per-channel weight scales (onnx {w_scale})"),
            ("int8_t", "weight_zero_point", inits[w_zp], f"per-channel weight zero points (onnx {w_zp})"),
            ("float", "input_scale", inits[x_scale], f"input activation scale (onnx {x_scale})"),
            ("int8_t", "input_zero_point", inits[x_zp], f"input activation zero point (onnx {x_zp})"),
            ("float", "output_scale", inits[o_scale], f"output activation scale (onnx {o_scale})"),
            ("int8_t", "output_zero_point", inits[o_zp], f"output activation zero point (onnx {o_zp})"),
            ("int32_t", "output_multiplier", mults,
             "per-channel requantisation multiplier (derived, Q31): input_scale * weight_scale[c] / output_scale"
             " = multiplier * 2^(shift - 31)"),
            ("int32_t", "output_shift", shifts, "per-channel requantisation shift (derived), left shift when > 0"),
            ("int32_t", "activation_range", act, "output clamp (derived): min, max int8"
                                                 + (" (min = output zero point: the ReLU)" if relu else "")),
        ]
        if op == "Conv":
            rows.append(("int32_t", "shape", [*ishape, *oshape], "shape (derived): input C, H, W, output C, H, W"))
            rows.append(("int32_t", "geometry", [*k, *s, *p],
                         "geometry (derived): kernel h, w, stride h, w, pads top, left, bottom, right"))
        else:
            rows.append(("int32_t", "shape", [w.shape[1], w.shape[0]], "shape (derived): in features, out features"))
        for ctype, name, values, comment in rows:
            body.append(_c_array(ctype, f"{prefix}_{name}", values, f"{prefix} {comment}"))
    x_scale_name = next(n.input[1] for n in consumers[x_name] if n.op_type == "QuantizeLinear")
    x_zp_name = next(n.input[2] for n in consumers[x_name] if n.op_type == "QuantizeLinear")
    head = f"""\
/* model_int8.h: generated by `cnnlab export --c-header` (cnnlab/deploy.py); do not edit.
 * {note}
 * Static int8 quantisation (onnxruntime QDQ): real = scale * (q - zero_point); weights are
 * symmetric per output channel, activations per tensor. A Conv/Gemm layer computes
 *   acc[c] = bias[c] + sum (x_q - input_zero_point) * (w_q - weight_zero_point[c])
 *   y_q[c] = clamp(round(acc[c] * input_scale * weight_scale[c] / output_scale) + output_zero_point,
 *                  activation_range[0], activation_range[1])
 * where output_multiplier/output_shift give the same scale in fixed point (CMSIS-NN, TFLite Micro).
 * Layouts are ONNX's (activations [C][H][W]); CMSIS-NN's s8 kernels want NHWC activations and
 * OHWI conv weights, and then the first fc layer's columns in HWC order: see docs/deploy.md.
 * Layers, in order (shapes without the batch):
 *   input    {in_shape}: q = round(pixel / 255 / input_scale) + input_zero_point
{chr(10).join(layers)}
 */
#ifndef CNNLAB_MODEL_INT8_H
#define CNNLAB_MODEL_INT8_H

#include <stdint.h>

#define CNNLAB_INPUT_CHANNELS {in_shape[0]}
#define CNNLAB_INPUT_HEIGHT {in_shape[1]}
#define CNNLAB_INPUT_WIDTH {in_shape[2]}
#define CNNLAB_NUM_CLASSES {shapes[int8_proto.graph.output[0].name][0]}

"""
    inputs = [_c_array("float", "input_scale", inits[x_scale_name], f"input image scale (onnx {x_scale_name})"),
              _c_array("int8_t", "input_zero_point", inits[x_zp_name], f"input image zero point (onnx {x_zp_name})")]
    return head + "\n".join([*inputs, *body]) + "\n#endif /* CNNLAB_MODEL_INT8_H */\n"


# ---------------------------------------------------------------------------- figures

def macs(model, in_shape) -> dict:
    """Multiply-accumulates per image of the conv and linear layers."""
    import torch
    from torch import nn

    counts = {"conv": 0, "linear": 0}

    def hook(m, inputs, out):
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
            counts["conv"] += out[0].numel() * k
        else:
            counts["linear"] += m.in_features * m.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, *in_shape))
    finally:
        for h in handles:
            h.remove()
    return {"macs": counts["conv"] + counts["linear"], "macs_conv": counts["conv"], "macs_linear": counts["linear"]}


def latency(fn) -> dict:
    """fn() WARMUP times, then TIMED times: p50 and p99 in microseconds."""
    import numpy as np

    for _ in range(WARMUP):
        fn()
    times = np.empty(TIMED)
    for i in range(TIMED):
        t = time.perf_counter_ns()
        fn()
        times[i] = time.perf_counter_ns() - t
    return {"p50_us": round(float(np.percentile(times, 50)) / 1e3, 1),
            "p99_us": round(float(np.percentile(times, 99)) / 1e3, 1)}


def _torch_latency(model, x1) -> dict:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        xt = torch.from_numpy(x1)
        with torch.inference_mode():
            return latency(lambda: model(xt))
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- export_run

def _check_target(out: Path) -> None:
    """--out must be new, or an earlier export (which the new one replaces at the end)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "export.json").is_file():
        raise ConfigError(f"--out {out} is a non-empty directory that is not a cnnlab export; choose another")


def _replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished tmp directory at out, replacing an earlier export."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".tmp-old-{out.name}-", dir=out.parent))
    os.rename(out, old / out.name)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old / out.name, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export_run(run_dir, out=None, int8: bool = False, calibration: int = CALIBRATION,
               c_header: bool = False, trust_code: bool = False) -> dict:
    """Export RUN_DIR (see the module docstring); returns export.json's content.
    c_header implies int8. Raises ConfigError / RunError / CheckpointError with one line."""
    onnx, onnxruntime = require_extra()
    import numpy as np

    from cnnlab.data import load_dataset
    from cnnlab.engine.run import to_tensors

    run = Path(run_dir)
    out = Path(out) if out is not None else run / "export"
    int8 = int8 or c_header
    if int8 and (isinstance(calibration, bool) or not isinstance(calibration, int) or calibration < 1):
        raise ConfigError(f"--calibration must be a whole number >= 1, got {calibration!r}")
    _check_target(out)
    model, cfg, meta = plain_model(run, trust_code=trust_code)
    if c_header and meta.get("normalize"):
        raise ConfigError(f"{run}: --c-header: this run normalises its inputs ([data] normalize = true), which the "
                          "header's integer pipeline does not include; export ONNX (without --c-header), or train "
                          "without normalize for a microcontroller")
    in_shape, num_classes = tuple(meta["in_shape"]), meta["num_classes"]
    ds = load_dataset(cfg.data.name)
    if tuple(ds.input_shape) != in_shape or ds.num_classes != num_classes:
        raise RunError(f"{run}: the model expects {list(in_shape)} with {num_classes} classes but "
                       f"{cfg.data.name} has {list(ds.input_shape)} with {ds.num_classes}")
    result = {}
    if (run / rundir.RESULT).is_file():
        result = json.loads((run / rundir.RESULT).read_text(encoding="utf-8"))
        trained_on = result.get("data", {}).get("sha256")
        if trained_on and trained_on != ds.sha256:
            raise RunError(f"{run}: {cfg.data.name} is not the data this run was trained on (its files' "
                           f"sha256 differ from result.json's)")
    if len(ds.test_labels) < MIN_CHECK_IMAGES:
        raise RunError(f"{run}: {cfg.data.name} has {len(ds.test_labels)} test images; the fp32 check needs "
                       f"at least {MIN_CHECK_IMAGES}")
    split = None
    if (run / rundir.SPLIT).is_file():
        with np.load(run / rundir.SPLIT) as z:
            split = {k: z[k] for k in ("train_idx", "val_idx")}
    elif int8:
        raise RunError(f"{run}: no split.npz; int8 calibration needs the run's training split")
    calib_idx = np.zeros(0, dtype=np.int64)
    if int8:
        calib_idx = calibration_indices(split["train_idx"], ds.train_labels, calibration, cfg.train.seed)
    data = to_tensors(ds, calib_idx, np.zeros(0, dtype=np.int64), "cpu")  # training's preprocessing
    x_test, y_test = data.x_test.numpy(), data.y_test.numpy()
    x_calib = data.x_train.numpy()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-export-{out.name}-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would stay on the export directory
    try:
        info = _export(onnx, onnxruntime, model, cfg, meta, run, tmp, x_test, y_test, x_calib, calib_idx, ds,
                       split, result, int8, c_header)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _export(onnx, onnxruntime, model, cfg, meta, run, tmp, x_test, y_test, x_calib, calib_idx, ds, split,
            result, int8, c_header) -> dict:
    import numpy as np

    in_shape = tuple(meta["in_shape"])
    work = Path(tempfile.mkdtemp(prefix="work-", dir=tmp))
    fp32 = _preprocess(onnx, _export_onnx(model, in_shape, run), work)
    try:
        onnx.checker.check_model(fp32, full_check=True)
    except onnx.checker.ValidationError as e:
        raise RunError(f"{run}: the exported ONNX model fails onnx.checker: {str(e).strip().splitlines()[0]}") from e
    if any(n.op_type == "BatchNormalization" for n in fp32.graph.node):
        raise RunError(f"{run}: BatchNormalization is left in the ONNX model after folding")
    fp32_bytes = fp32.SerializeToString()
    (tmp / FILES["fp32"]).write_bytes(fp32_bytes)

    # the check: fp32 ONNX against torch on the test set
    sess32 = _session(onnxruntime, fp32_bytes, run, "fp32")
    ref, got = _torch_logits(model, x_test), _ort_logits(sess32, x_test)
    diff = float(np.abs(ref - got).max())
    if not diff <= CHECK_ATOL:
        i = int(np.abs(ref - got).max(1).argmax())
        raise RunError(f"{run}: the fp32 ONNX logits differ from torch's by {diff:.3g} (> {CHECK_ATOL:g}) "
                       f"on test image {i}")
    pred_torch, pred32 = ref.argmax(1), got.argmax(1)
    if not np.array_equal(pred_torch, pred32):
        i = int(np.flatnonzero(pred_torch != pred32)[0])
        raise RunError(f"{run}: the fp32 ONNX model predicts {pred32[i]} on test image {i}, torch {pred_torch[i]}")

    x1 = x_test[:1]
    info = {
        "format": EXPORT_FORMAT,
        "run_dir": str(run.resolve()),
        "checkpoint": "last",
        "checkpoint_epoch": meta.get("epoch"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv),
        "opset": next(o.version for o in fp32.opset_import if o.domain in ("", "ai.onnx")),
        "versions": _versions(),
        # protocol
        "dataset": ds.name,
        "dataset_sha256": ds.sha256,
        "n_train": int(len(split["train_idx"])) if split is not None else None,
        "n_val": int(len(split["val_idx"])) if split is not None else None,
        "n_test": int(len(y_test)),
        "seed": cfg.train.seed,
        "epochs": cfg.train.epochs,
        "preset": cfg.preset,
        "config": cfg.to_dict(),
        "train_kernels": result.get("kernels"),
        "test_accuracy_run": result.get("test_accuracy_eval"),
        "cpu_model": cnnlab.cpu_model(),
        "provider": "CPUExecutionProvider",
        "threads": 1,
        # files
        "file_fp32": FILES["fp32"],
        "file_int8": FILES["int8"] if int8 else None,
        "file_c_header": FILES["c_header"] if c_header else None,
        "size_fp32_bytes": len(fp32_bytes),
        "size_int8_bytes": None,
        "size_c_header_bytes": None,
        # checks
        "check_onnx_checker": True,
        "check_images": int(len(x_test)),
        "check_atol": CHECK_ATOL,
        "check_max_abs_diff": diff,
        "check_argmax_agree": True,
        "check_int8_weights": None,
        "int8_weight_nodes": None,
        # figures
        "params": sum(p.numel() for p in model.parameters()),
        **macs(model, in_shape),
        "test_accuracy_torch": float((pred_torch == y_test).mean() * 100),
        "test_accuracy_fp32": float((pred32 == y_test).mean() * 100),
        "test_accuracy_int8": None,
        "argmax_agreement_int8": None,
        "latency_batch": 1,
        "latency_warmup": WARMUP,
        "latency_runs": TIMED,
    }
    info.update({f"latency_torch_{k}": v for k, v in _torch_latency(model, x1).items()})
    info.update({f"latency_fp32_{k}": v for k, v in latency(lambda: sess32.run(["logits"], {"x": x1})).items()})
    info.update({"latency_int8_p50_us": None, "latency_int8_p99_us": None, "calibration_images": None,
                 "calibration_per_class": None, **{_quant_key(k): None for k in QUANTIZE}})
    if int8:
        q8 = _quantize(onnx, fp32, x_calib, work, run)
        info["int8_weight_nodes"] = check_int8_weights(q8, run)
        info["check_int8_weights"] = True
        q8_bytes = q8.SerializeToString()
        (tmp / FILES["int8"]).write_bytes(q8_bytes)
        sess8 = _session(onnxruntime, q8_bytes, run, "int8")
        pred8 = _ort_logits(sess8, x_test).argmax(1)
        labels = ds.train_labels[calib_idx]
        info.update({
            "size_int8_bytes": len(q8_bytes),
            "test_accuracy_int8": float((pred8 == y_test).mean() * 100),
            "argmax_agreement_int8": float((pred8 == pred32).mean() * 100),
            "calibration_images": int(len(calib_idx)),
            "calibration_per_class": [int((labels == c).sum()) for c in range(ds.num_classes)],
            **{_quant_key(k): v for k, v in QUANTIZE.items()},
        })
        info.update({f"latency_int8_{k}": v for k, v in latency(lambda: sess8.run(["logits"], {"x": x1})).items()})
        if c_header:
            note = (f"From {run.resolve()} (checkpoint last, {cfg.data.name}, seed {cfg.train.seed}); "
                    f"calibrated on {len(calib_idx)} training images.")
            text = header_source(q8, fp32, run, note).encode("utf-8")
            (tmp / FILES["c_header"]).write_bytes(text)
            info["size_c_header_bytes"] = len(text)
    shutil.rmtree(work)
    (tmp / "export.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return info

