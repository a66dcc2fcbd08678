"""Shared fixtures: small synthetic IDX datasets that a test makes itself."""

from __future__ import annotations

import gzip
import http.server
import os
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

IDX_DTYPES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """Write `array` as an IDX file (big-endian, as the format requires)."""
    code = IDX_DTYPES[array.dtype.type]
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path = Path(path)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data, mtime=0))
    else:
        path.write_bytes(data)
    return path


def synthetic_images(n: int, size=(16, 16), classes: int = 4, seed: int = 0):
    """Learnable images: class k lights up its own square patch, plus noise."""
    rng = np.random.default_rng(seed)
    h, w = size
    labels = rng.integers(0, classes, size=n).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, h, w)).astype(np.uint8)
    cols = int(np.ceil(np.sqrt(classes)))
    ph, pw = max(1, h // cols), max(1, w // cols)
    for k in range(classes):
        r, c = divmod(k, cols)
        sel = labels == k
        images[sel, r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] = 220
    return images, labels


def make_idx_dir(root: Path, n_train=600, n_test=200, size=(16, 16), classes=4, gz=False, seed=0) -> Path:
    """A folder with the four standard IDX files, as `idx:DIR` expects."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    xtr, ytr = synthetic_images(n_train, size, classes, seed)
    xte, yte = synthetic_images(n_test, size, classes, seed + 1)
    write_idx(root / "train-images-idx3-ubyte", xtr, gz)
    write_idx(root / "train-labels-idx1-ubyte", ytr, gz)
    write_idx(root / "t10k-images-idx3-ubyte", xte, gz)
    write_idx(root / "t10k-labels-idx1-ubyte", yte, gz)
    return root


@pytest.fixture
def idx_dir(tmp_path) -> Path:
    """600 train / 200 test synthetic 16x16 images, 4 classes, raw IDX."""
    return make_idx_dir(tmp_path / "synth")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Tests never write to the user's cache; real MNIST is read from the real cache when present."""
    real = os.environ.get("CNNLAB_DATA", str(Path.home() / ".cache" / "cnnlab"))
    monkeypatch.setenv("CNNLAB_REAL_DATA", real)
    monkeypatch.setenv("CNNLAB_DATA", str(tmp_path / "cache"))


# A tiny study on synthetic data: 2 variants x 2 seeds, 1 epoch each, one comparison.
# `extra` adds lines to [variants]; `tail` adds tables after [comparisons].
TINY_STUDY = """
name = "tiny"
seeds = 2
[base]
data = {{ name = "idx:{data}", val_size = 100 }}
model = {{ preset = "lab2-2c2f" }}
train = {{ epochs = 1, threads = 1 }}
[variants]
a = {{}}
b = {{ model = {{ preset = "lab2-2c3f" }} }}
{extra}
[comparisons]
fc = ["b", "a"]
"""


def write_tiny_study(path: Path, data, extra: str = "", tail: str = "") -> Path:
    path.write_text(TINY_STUDY.format(data=data, extra=extra) + tail)
    return path


class LoopbackServer:
    """http.server on 127.0.0.1 in a thread, serving `routes` (URL path -> body); any other path
    is a 404. A path under /short/ declares a longer Content-Length than it sends, then closes
    the connection (a truncated download). `requests` lists the paths asked for."""

    def __init__(self, routes: dict[str, bytes]):
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                server.requests.append(self.path)
                body = routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if self.path.startswith("/short/"):
                    self.send_header("Content-Length", str(len(body) + 1000))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def url(self, route: str) -> str:
        return f"{self.base}/{route}/"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
