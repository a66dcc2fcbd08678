"""cnnlab export (cnnlab/deploy.py): ONNX fp32, static int8, the C header, the checks and figures.

Every test but the missing-extra one needs the deploy extra (onnx, onnxruntime, onnxscript)
and skips without it. The models are trained by cnnlab itself, 1 epoch on synthetic IDX data
(300 test images: the fp32 check needs 256); the slow test trains on real MNIST when cached.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnnlab.cli import main
from conftest import make_idx_dir

ROOT = Path(__file__).resolve().parents[1]
EXTRA = "pip install -e '.[deploy]'"


def _needs_extra():
    for name in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(name)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """lab2-3c3f-bn (BatchNorm2d and BatchNorm1d, both folded at export), 1 epoch, synthetic data."""
    root = tmp_path_factory.mktemp("deploy")
    data = make_idx_dir(root / "synth", n_test=300)
    out = root / "run"
    assert main(["train", "--preset", "lab2-3c3f-bn", "--data", f"idx:{data}", "--epochs", "1", "--val-size", "100",
                 "--threads", "1", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def exported(run_dir) -> Path:
    _needs_extra()
    assert main(["export", str(run_dir), "--c-header", "--calibration", "200"]) == 0  # --c-header implies --int8
    return run_dir / "export"


def _one_line_error(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cnnlab export: error: ") and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------- always

def test_without_the_extra_export_says_which_to_install(run_dir, tmp_path, monkeypatch, capsys):
    for name in ("onnx", "onnxruntime", "onnxscript"):
        monkeypatch.setitem(sys.modules, name, None)  # `import onnx` raises ImportError
    err = _one_line_error(capsys, "export", str(run_dir), "--out", str(tmp_path / "x"))
    assert EXTRA in err and "deploy extra" in err
    assert not (tmp_path / "x").exists()


def test_importing_deploy_imports_neither_torch_nor_onnx():
    code = ("import sys, cnnlab.deploy, cnnlab.commands.export; "
            "bad = [m for m in ('torch', 'onnx', 'onnxruntime', 'numpy') if m in sys.modules]; "
            "sys.exit(f'imported at module level: {bad}' if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr


def test_calibration_images_are_class_balanced_from_the_training_split():
    from cnnlab.deploy import calibration_indices

    labels = np.repeat(np.arange(4), [50, 300, 300, 300])  # class 0 is rare
    train_idx = np.arange(0, 950)  # the training split: the last 50 images (class 3) are not in it
    idx = calibration_indices(train_idx, labels, 200, seed=3)
    assert len(idx) == 200 and len(set(idx)) == 200 and set(idx) <= set(train_idx)
    assert np.bincount(labels[idx]).tolist() == [50, 50, 50, 50]
    idx = calibration_indices(train_idx, labels, 350, seed=3)  # class 0 runs out: the others fill up
    assert np.bincount(labels[idx]).tolist() == [50, 100, 100, 100]
    assert np.array_equal(idx, calibration_indices(train_idx, labels, 350, seed=3))  # seeded
    assert not np.array_equal(idx, calibration_indices(train_idx, labels, 350, seed=4))


# ---------------------------------------------------------------------------- the export

def test_export_writes_checked_models_and_export_json(exported, run_dir):
    import onnx
    import onnxruntime as ort

    from cnnlab.deploy import plain_model
    from cnnlab.engine.run import to_tensors

    assert sorted(p.name for p in exported.iterdir()) == ["export.json", "model.int8.onnx", "model.onnx",
                                                         "model_int8.h"]
    assert not list(run_dir.glob(".tmp-*"))
    info = json.loads((exported / "export.json").read_text())
    assert info == json.loads(json.dumps(info))
    # the checks
    assert info["check_onnx_checker"] and info["check_argmax_agree"] and info["check_int8_weights"]
    assert info["check_images"] == 300 >= 256 and info["check_max_abs_diff"] <= info["check_atol"] == 1e-4
    # fp32: one file, x -> logits, dynamic batch, BN folded, same numbers as torch
    fp32 = onnx.load(exported / "model.onnx")
    onnx.checker.check_model(fp32, full_check=True)
    assert [i.name for i in fp32.graph.input] == ["x"] and [o.name for o in fp32.graph.output] == ["logits"]
    assert fp32.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    ops = [n.op_type for n in fp32.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 3 and ops.count("Gemm") == 3
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in fp32.graph.initializer)  # no external data
    model, cfg, _ = plain_model(run_dir)
    from cnnlab.data import load_dataset

    ds = load_dataset(cfg.data.name)
    x = to_tensors(ds, np.zeros(0, np.int64), np.zeros(0, np.int64), "cpu").x_test.numpy()
    sess = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    import torch

    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    for batch in (1, 7, 300):
        got = np.concatenate([sess.run(None, {"x": x[s : s + batch]})[0] for s in range(0, 300, batch)])
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    # int8: every Conv and Gemm reads int8 weights, per channel
    q8 = onnx.load(exported / "model.int8.onnx")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in q8.graph.initializer}
    producer = {o: n for n in q8.graph.node for o in n.output}
    weighted = [n for n in q8.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(weighted) == 6
    for n in weighted:
        dq = producer[n.input[1]]
        assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].dtype == np.int8
        assert inits[dq.input[1]].shape == (inits[dq.input[0]].shape[0],)  # a scale per output channel
    assert info["int8_weight_nodes"] == [n.name for n in weighted]
    # the figures and their protocol
    result = json.loads((run_dir / "result.json").read_text())
    assert info["params"] == result["params"] == 13360
    # 16x16 input: conv 6*16*16*9 + 12*6*6*6*9 + 24*12*9; fc 24*128 + 128*48 + 48*4
    assert (info["macs_conv"], info["macs_linear"]) == (13824 + 23328 + 2592, 3072 + 6144 + 192)
    assert info["macs"] == info["macs_conv"] + info["macs_linear"]
    assert info["size_fp32_bytes"] == (exported / "model.onnx").stat().st_size
    assert info["size_int8_bytes"] == (exported / "model.int8.onnx").stat().st_size
    assert info["size_c_header_bytes"] == (exported / "model_int8.h").stat().st_size
    assert info["test_accuracy_fp32"] == info["test_accuracy_torch"] == pytest.approx(result["test_accuracy_eval"])
    assert 0 <= info["test_accuracy_int8"] <= 100 and 0 <= info["argmax_agreement_int8"] <= 100
    assert info["calibration_images"] == 200 and info["calibration_per_class"] == [50, 50, 50, 50]
    for who in ("torch", "fp32", "int8"):
        assert 0 < info[f"latency_{who}_p50_us"] <= info[f"latency_{who}_p99_us"]
    assert (info["latency_batch"], info["latency_warmup"], info["latency_runs"], info["threads"]) == (1, 100, 1000, 1)
    assert info["dataset"] == result["data"]["name"] and info["dataset_sha256"] == result["data"]["sha256"]
    assert (info["seed"], info["epochs"], info["preset"], info["n_train"], info["n_test"]) == (0, 1, "lab2-3c3f-bn",
                                                                                               500, 300)
    assert info["config"]["model"]["preset"] == "lab2-3c3f-bn" and info["cpu_model"]
    assert info["opset"] == next(o.version for o in fp32.opset_import if o.domain == "")
    assert {k: info["versions"][k] for k in ("onnx", "onnxruntime", "onnxscript")} == {
        "onnx": onnx.__version__, "onnxruntime": ort.__version__, "onnxscript": __import__("onnxscript").__version__}
    assert {"torch", "cnnlab"} <= set(info["versions"])


def test_an_fp32_only_export_has_the_same_fields(exported, run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir), "--out", str(tmp_path / "fp32")]) == 0
    out = capsys.readouterr().out
    assert "ORT fp32" in out and f"exported to {tmp_path / 'fp32'}" in out
    assert sorted(p.name for p in (tmp_path / "fp32").iterdir()) == ["export.json", "model.onnx"]
    info = json.loads((tmp_path / "fp32" / "export.json").read_text())
    full = json.loads((exported / "export.json").read_text())
    assert set(info) == set(full)  # one schema: what was not made is null
    assert info["file_int8"] is info["test_accuracy_int8"] is info["latency_int8_p50_us"] is None
    assert info["check_int8_weights"] is info["size_c_header_bytes"] is info["quant_format"] is None
    assert info["test_accuracy_fp32"] == full["test_accuracy_fp32"]
    assert (tmp_path / "fp32" / "model.onnx").read_bytes() == (exported / "model.onnx").read_bytes()  # deterministic


def _c_values(ctype: str, body: str) -> list:
    values = [v.strip() for v in body.split(",") if v.strip()]
    if ctype == "float":
        return [float(v.removesuffix("f")) for v in values]
    return [-2147483648 if v == "(-2147483647 - 1)" else int(v) for v in values]


def test_c_header_compiles_and_holds_the_int8_tensors(exported, tmp_path):
    import onnx

    header = exported / "model_int8.h"
    text = header.read_text()
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    for args in (["-fsyntax-only", "-Wall", "-Werror", str(header)],):
        r = subprocess.run(["gcc", *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    main_c = tmp_path / "main.c"  # and included from a C file, as a firmware would
    main_c.write_text('#include "model_int8.h"\nint main(void) { return conv1_weight[0] + fc3_bias[0]; }\n')
    r = subprocess.run(["gcc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", f"-I{exported}",
                        str(main_c)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

    arrays = re.findall(r"^// (.*)\nstatic const (\w+) (\w+)\[(\d+)\] = \{([^}]*)\};", text, re.M)
    assert len(arrays) == len(re.findall(r"^static const ", text, re.M))  # one comment line per tensor
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(exported / "model.int8.onnx").graph.initializer}
    ctypes = {"int8_t": np.int8, "int32_t": np.int32, "float": np.float32}
    covered, by_name = set(), {}
    for comment, ctype, name, n, body in arrays:
        values = _c_values(ctype, body)
        assert len(values) == int(n)
        by_name[name] = values
        m = re.search(r"\(onnx (\S+)\)", comment)
        if m:
            want = inits[m.group(1)]
            assert want.dtype == ctypes[ctype], name
            np.testing.assert_array_equal(np.array(values, dtype=want.dtype), want.reshape(-1), err_msg=name)
            covered.add(m.group(1))
    # every int8 weight, int32 bias, weight scale and zero point, activation scale and zero point
    needed = {k for k, v in inits.items() if v.dtype in (np.int8, np.int32, np.float32)
              and "bias_quantized_scale" not in k and "bias_quantized_zero_point" not in k}
    assert needed and needed <= covered
    for layer in ("conv1", "conv2", "conv3", "fc1", "fc2", "fc3"):
        w = by_name[f"{layer}_weight"]
        assert all(-128 <= v <= 127 for v in w)
        real = (np.float64(by_name[f"{layer}_input_scale"][0]) * np.array(by_name[f"{layer}_weight_scale"], np.float64)
                / by_name[f"{layer}_output_scale"][0])
        fixed = np.array(by_name[f"{layer}_output_multiplier"]) * 2.0 ** (np.array(by_name[f"{layer}_output_shift"]) - 31)
        np.testing.assert_allclose(fixed, real, rtol=1e-8)
    assert by_name["conv1_shape"] == [1, 16, 16, 6, 16, 16] and by_name["fc1_shape"] == [24, 128]
    assert by_name["conv1_geometry"] == [3, 3, 1, 1, 1, 1, 1, 1] and by_name["pool1_geometry"][:4] == [2, 2, 2, 2]
    # ReLU layers clamp at their output zero point; the output layer does not
    assert by_name["fc1_activation_range"] == [by_name["fc1_output_zero_point"][0], 127]
    assert by_name["fc3_activation_range"] == [-128, 127]


def _header_arrays(text: str) -> dict:
    return {name: np.array(_c_values(ctype, body)) for ctype, name, body
            in re.findall(r"^static const (\w+) (\w+)\[\d+\] = \{([^}]*)\};", text, re.M)}


def _int8_forward(a: dict, layers: list[str], image) -> np.ndarray:
    """The header's formula in integers (numpy), layer by layer, from its arrays alone."""
    def requant(acc, p):
        scale = a[f"{p}_output_multiplier"] * 2.0 ** (a[f"{p}_output_shift"] - 31)
        y = np.round(acc * scale.reshape(-1, *[1] * (acc.ndim - 1))) + a[f"{p}_output_zero_point"][0]
        return np.clip(y, *a[f"{p}_activation_range"]).astype(np.int64)

    x = image.astype(np.float32) / np.float32(a["input_scale"][0])  # in float32, as onnxruntime (ties!)
    q = np.clip(np.round(x) + a["input_zero_point"][0], -128, 127).astype(np.int64)
    for p in layers:
        if p.startswith("conv"):
            ic, _, _, oc, oh, ow = a[f"{p}_shape"]
            kh, kw, sh, sw, pt, pl, pb, pr = a[f"{p}_geometry"]
            w = a[f"{p}_weight"].reshape(oc, ic, kh, kw) - a[f"{p}_weight_zero_point"].reshape(-1, 1, 1, 1)
            x = np.pad(q - a[f"{p}_input_zero_point"][0], ((0, 0), (pt, pb), (pl, pr)))
            acc = a[f"{p}_bias"].reshape(-1, 1, 1) + sum(
                np.einsum("oc,chw->ohw", w[:, :, i, j], x[:, i : i + oh * sh : sh, j : j + ow * sw : sw])
                for i in range(kh) for j in range(kw))
            q = requant(acc, p)
        elif p.startswith("pool"):
            c, _, _, _, oh, ow = a[f"{p}_shape"]
            k = a[f"{p}_geometry"][0]
            q = q[:, : oh * k, : ow * k].reshape(c, oh, k, ow, k).max((2, 4))
        else:
            n_in, n_out = a[f"{p}_shape"]
            w = a[f"{p}_weight"].reshape(n_out, n_in) - a[f"{p}_weight_zero_point"].reshape(-1, 1)
            q = requant(w @ (q.reshape(-1) - a[f"{p}_input_zero_point"][0]) + a[f"{p}_bias"], p)
    return q


def test_the_header_alone_reproduces_onnxruntime_int8(exported, run_dir):
    """The documented formula on the header's arrays (integer arithmetic, the fixed-point
    requantisation) gives onnxruntime's int8 logits, quantised, on the test images: what a
    microcontroller runtime computes from the header is what export.json measured."""
    import onnxruntime as ort

    from cnnlab.data import load_dataset
    from cnnlab.inference import load_run_model

    text = (exported / "model_int8.h").read_text()
    a, layers = _header_arrays(text), re.findall(r"^ \*   ((?:conv|pool|fc)\d+) ", text, re.M)
    assert layers == ["conv1", "pool1", "conv2", "pool2", "conv3", "fc1", "fc2", "fc3"]
    _, cfg, _ = load_run_model(run_dir)
    x = load_dataset(cfg.data.name).test_images[:100, 0].astype(np.float32) / 255  # training's preprocessing
    ours = np.array([_int8_forward(a, layers, image[None]) for image in x])
    sess = ort.InferenceSession(str(exported / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    theirs = np.round(sess.run(None, {"x": x[:, None]})[0] / a["fc3_output_scale"][0]) + a["fc3_output_zero_point"][0]
    # onnxruntime runs DequantizeLinear -> float Conv/Gemm -> QuantizeLinear on x86: its float sums
    # can round the other way than exact integers where a value sits on a tie (exact here, on this CPU)
    assert np.abs(ours - theirs).max() <= 2 and (ours != theirs).mean() < 0.01


# ---------------------------------------------------------------------------- failures

def test_a_failed_check_writes_nothing_and_keeps_the_previous_export(exported, run_dir, monkeypatch, capsys):
    """An fp32 model that is not torch's (a bias nudged by 0.01 after export) fails the check;
    the earlier export stays as it was and no temporary directory is left."""
    import onnx

    from cnnlab import deploy

    before = {p.name: p.read_bytes() for p in exported.iterdir()}
    real = deploy._export_onnx

    def nudged(*args):
        proto = real(*args)
        out = next(n for n in proto.graph.node if n.output[0] == "logits")
        t = next(t for t in proto.graph.initializer if t.name == out.input[2])
        t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t) + np.float32(0.01), t.name))
        return proto

    monkeypatch.setattr(deploy, "_export_onnx", nudged)
    err = _one_line_error(capsys, "export", str(run_dir), "--c-header")
    assert "fp32 ONNX logits differ from torch's by 0.01" in err and "(> 0.0001)" in err
    assert {p.name: p.read_bytes() for p in exported.iterdir()} == before
    assert not list(run_dir.glob(".tmp-*"))


def test_an_unquantised_layer_fails_the_int8_check_naming_it(exported, run_dir, tmp_path, monkeypatch, capsys):
    from cnnlab import deploy

    monkeypatch.setitem(deploy.QUANTIZE, "op_types_to_quantize", ["Conv"])  # the Gemms stay fp32
    err = _one_line_error(capsys, "export", str(run_dir), "--int8", "--out", str(tmp_path / "x"))
    gemm = json.loads((exported / "export.json").read_text())["int8_weight_nodes"][3]
    assert f"Gemm node '{gemm}' has no int8 weights" in err
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".tmp-*"))


def test_an_op_without_onnx_export_is_named(run_dir, tmp_path, monkeypatch, capsys):
    """A model whose forward ends with torch.cummax, which the exporter cannot convert, through
    the real path (load_run_model -> build_model -> export)."""
    _needs_extra()
    import torch

    from cnnlab import model as model_module
    from cnnlab.deploy import export_run
    from cnnlab.errors import RunError

    class Cummax(model_module.Net):
        def forward(self, x):
            return torch.cummax(super().forward(x), 1).values

    monkeypatch.setattr(model_module, "build_model",
                        lambda spec, in_shape, n, fast_dropout=True, fast=True: Cummax(spec, tuple(in_shape), n,
                                                                                        fast_dropout, fast))
    err = _one_line_error(capsys, "export", str(run_dir), "--out", str(tmp_path / "x"))
    assert f"{run_dir}: cannot export the model to ONNX" in err and "the op aten.cummax" in err
    with pytest.raises(RunError) as e:
        export_run(run_dir, out=tmp_path / "x")
    assert isinstance(e.value.__cause__, torch.onnx.OnnxExporterError)  # the exporter's error is kept
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".tmp-*"))


def test_bad_arguments_fail_before_any_work(run_dir, tmp_path, capsys):
    _needs_extra()
    err = _one_line_error(capsys, "export", str(run_dir), "--int8", "--calibration", "0")
    assert "--calibration must be a whole number >= 1" in err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    err = _one_line_error(capsys, "export", str(run_dir), "--out", str(tmp_path / "mine"))
    assert "not a cnnlab export" in err and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    err = _one_line_error(capsys, "export", str(tmp_path / "nothing"))
    assert "not a run directory" in err


# ---------------------------------------------------------------------------- real MNIST (slow)

@pytest.mark.slow
def test_int8_is_within_one_point_of_fp32_on_real_mnist(tmp_path, monkeypatch):
    _needs_extra()
    real = Path(os.environ["CNNLAB_REAL_DATA"]).expanduser()
    if not (real / "mnist" / "train-images-idx3-ubyte").exists():
        pytest.skip(f"real MNIST is not in {real}/mnist (run `cnnlab data fetch mnist`)")
    monkeypatch.setenv("CNNLAB_DATA", str(real))
    run = tmp_path / "mnist"
    assert main(["train", "--preset", "lab2-2c3f", "--data", "mnist", "--epochs", "1", "--limit", "30000",
                 "--threads", "1", "--out", str(run)]) == 0
    assert main(["export", str(run), "--int8"]) == 0
    info = json.loads((run / "export" / "export.json").read_text())
    assert info["n_test"] == info["check_images"] == 10000 and info["n_train"] == 30000
    assert info["test_accuracy_fp32"] > 60  # 30k images, 1 epoch (about 83% in eval mode): learned
    assert abs(info["test_accuracy_int8"] - info["test_accuracy_fp32"]) <= 1.0
    assert info["argmax_agreement_int8"] > 97
    assert info["calibration_per_class"] == [50] * 10
