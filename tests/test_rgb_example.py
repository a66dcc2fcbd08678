"""The README's "Bring your own model and data" example end to end, on small data it makes:
examples/rgb_study.toml (examples/tiny_resnet.py against the lab's network) on RGB shapes
(examples/make_shapes.py) from npz: and from folder:, with per-channel normalisation; the
report's summary, graph, curves and verdicts; predict on a PNG; kill -9 and an exact resume.
The same study through Ray is in tests/test_ray.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_reliability import assert_identical_runs, cli

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
import make_shapes  # noqa: E402


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """1,100 training images (600 after the example's 500 held out) and 200 test images."""
    return make_shapes.write(tmp_path_factory.mktemp("shapes"), n_train=1100, n_test=200, seed=1)


def example_study(tmp_path: Path) -> Path:
    """examples/rgb_study.toml with absolute paths to the repository's example model."""
    text = (REPO / "examples" / "rgb_study.toml").read_text()
    path = tmp_path / "rgb_study.toml"
    path.write_text(text.replace('"examples/tiny_resnet.py', f'"{REPO}/examples/tiny_resnet.py'))
    return path


@pytest.mark.parametrize("source", ["npz", "folder"])
def test_the_rgb_example_study_end_to_end(shapes, tmp_path, source):
    data = f"npz:{shapes / 'shapes.npz'}" if source == "npz" else f"folder:{shapes / 'folder'}"
    out = tmp_path / "out"
    r = cli("study", str(example_study(tmp_path)), "--out", str(out), "--data", data, "--epochs", "2",
            "--seeds", "2", "--limit", "300")
    assert r.returncode == 0, r.stderr
    assert "6 runs trained, 0 already finished, 0 failed" in r.stdout

    res = json.loads((out / "runs" / "resnet" / "seed-0" / "result.json").read_text())
    assert res["data"]["input_shape"] == [3, 32, 32] and res["data"]["num_classes"] == 4
    ds = __import__("cnnlab.data", fromlist=["load_dataset"]).load_dataset(data)
    split = np.load(out / "runs" / "resnet" / "seed-0" / "split.npz")
    pixels = ds.train_images[np.sort(split["train_idx"])].astype(np.float64) / 255  # the training split only
    assert res["data"]["normalize"]["mean"] == pytest.approx(pixels.mean(axis=(0, 2, 3)).tolist(), abs=1e-9)
    assert res["data"]["normalize"]["std"] == pytest.approx(pixels.std(axis=(0, 2, 3)).tolist(), abs=1e-9)

    import torch

    from cnnlab.model import build_model
    from cnnlab.spec import preset

    net = __import__("tiny_resnet").tiny_resnet((3, 32, 32), 4, width=16, blocks=2)
    resnet_params = sum(p.numel() for p in net.parameters())
    lab_params = sum(p.numel() for p in build_model(preset("lab2-3c3f-bn"), (3, 32, 32), 4).parameters())
    assert res["params"] == resnet_params
    html = (out / "report.html").read_text()
    assert f"Total params: {resnet_params:,}" in html and f"Total params: {lab_params:,}" in html
    graph = (out / "runs" / "resnet" / "seed-0" / "graph.dot").read_text()
    add = [ln for ln in graph.splitlines() if "-> " in ln and "add" in ln.split("->")[1]]
    assert len(add) >= 2  # the residual add has two inputs: the block's output and the skip
    for section in ("Model graph of resnet, traced from the module", "Accuracy plot: resnet", "Verdicts",
                    "resnet-vs-lab", "Loss plot: lab2-3c3f-bn"):
        assert section in html, section

    # predict on a PNG file with the trained (normalising) model
    png = next((shapes / "folder" / "test" / "circle").glob("*.png"))
    run = out / "runs" / "resnet" / "seed-1"
    r = cli("predict", str(run), str(png), "--trust-code")
    assert r.returncode == 0, r.stderr
    from cnnlab.api import load_run

    pred = load_run(run).predict(images=[png], trust_code=True)[0]
    assert f"predicted: {pred.predicted}" in r.stdout and pred.image.shape == (32, 32, 3)
    from cnnlab.images import load_rgb_image

    x = torch.from_numpy(load_rgb_image(png, (32, 32))[0])[None]
    model = load_run(run).model(trust_code=True)
    norm = res["data"]["normalize"]
    direct = model.net((x - torch.tensor(norm["mean"]).view(1, 3, 1, 1)) / torch.tensor(norm["std"]).view(1, 3, 1, 1))
    assert pred.predicted == int(direct.argmax())  # the stored statistics were applied again


def test_an_rgb_factory_run_resumes_exactly_after_kill(shapes, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[data]\nname = "npz:{shapes / "shapes.npz"}"\nval_size = 500\nlimit = 200\nnormalize = true\n'
                   f'[model]\nfactory = "{REPO}/examples/tiny_resnet.py:tiny_resnet"\nargs = {{ width = 8 }}\n'
                   "[train]\nepochs = 3\nthreads = 1\n")
    reference, killed = tmp_path / "ref", tmp_path / "killed"
    assert cli("train", "--config", str(cfg), "--out", str(reference)).returncode == 0
    assert cli("train", "--config", str(cfg), "--out", str(killed), env={"CNNLAB_FAULT": "kill:1:1"}).returncode == -9
    r = cli("train", "--resume", str(killed), "--trust-code")
    assert r.returncode == 0, r.stderr
    assert_identical_runs(reference, killed)


def test_a_gray_model_takes_colour_files_and_an_rgb_model_takes_gray_ones(shapes, tmp_path):
    from PIL import Image

    from cnnlab.images import load_image, load_rgb_image

    colour = next((shapes / "folder" / "train" / "square").glob("*.png"))
    gray = tmp_path / "gray.png"
    Image.open(colour).convert("L").resize((20, 24)).save(gray)
    arr, notes = load_rgb_image(gray, (32, 32))
    assert arr.shape == (3, 32, 32) and np.array_equal(arr[0], arr[1]) and np.array_equal(arr[1], arr[2])
    assert any("three equal channels" in n for n in notes) and any("resized 20x24 to 32x32" in n for n in notes)
    arr, notes = load_image(colour, (28, 28))
    assert arr.shape == (28, 28) and any("grayscale" in n for n in notes)


def test_a_normalised_factory_run_exports_to_onnx_with_its_normalisation(tmp_path):
    pytest.importorskip("onnxruntime")
    from cnnlab.api import load_run
    from cnnlab.deploy import export_run
    from cnnlab.errors import ConfigError

    data = make_shapes.write(tmp_path / "shapes", n_train=700, n_test=300, seed=3, folder=False)  # 256+ to check
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[data]\nname = "npz:{data / "shapes.npz"}"\nval_size = 500\nnormalize = true\n'
                   f'[model]\nfactory = "{REPO}/examples/tiny_resnet.py:tiny_resnet"\nargs = {{ width = 4, blocks = 1 }}\n'
                   "[train]\nepochs = 1\n")
    run = tmp_path / "run"
    assert cli("train", "--config", str(cfg), "--out", str(run)).returncode == 0
    with pytest.raises(ConfigError, match="--trust-code"):
        export_run(run)
    info = export_run(run, trust_code=True)  # its own check: ONNX logits == torch's on the test images
    assert info["test_accuracy_fp32"] == pytest.approx(load_run(run).test_accuracy_eval, abs=0.11)
    with pytest.raises(ConfigError, match="normalises its inputs"):
        export_run(run, out=tmp_path / "h", c_header=True, trust_code=True)
