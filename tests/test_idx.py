"""The IDX reader: round trips, and one test per malformed-file fault (message content checked)."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import make_idx_dir, write_idx

from cnnlab.errors import DataError, IdxError
from cnnlab.idx import read_idx, read_idx_pair


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_round_trip(tmp_path, gz, dtype):
    rng = np.random.default_rng(1)
    arr = (rng.standard_normal((5, 3, 7)) * 100).astype(dtype)
    path = write_idx(tmp_path / "x-idx3", arr, gz=gz)
    out = read_idx(path)
    assert out.shape == (5, 3, 7)
    assert out.dtype == np.dtype(dtype)
    assert out.dtype.byteorder in ("=", "|")  # native order, usable by torch
    assert out.flags.writeable
    np.testing.assert_array_equal(out, arr)


def test_gzip_detected_by_magic_not_name(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    gz = write_idx(tmp_path / "a", arr, gz=True)
    renamed = gz.rename(tmp_path / "no-suffix")  # gzip content without .gz in the name
    np.testing.assert_array_equal(read_idx(renamed), arr)
    raw = write_idx(tmp_path / "b", arr)
    fake = raw.rename(tmp_path / "b.gz")  # raw content with a .gz name
    np.testing.assert_array_equal(read_idx(fake), arr)


@pytest.mark.parametrize("gz", [False, True])
def test_pair_round_trip(tmp_path, gz):
    d = make_idx_dir(tmp_path / "d", n_train=50, n_test=20, size=(9, 13), classes=3, gz=gz)
    suffix = ".gz" if gz else ""
    x, y = read_idx_pair(d / f"train-images-idx3-ubyte{suffix}", d / f"train-labels-idx1-ubyte{suffix}")
    assert x.shape == (50, 9, 13) and x.dtype == np.uint8
    assert y.shape == (50,) and y.dtype == np.int64
    assert y.min() >= 0 and y.max() <= 2


def test_truncated_file(tmp_path):
    path = write_idx(tmp_path / "imgs", np.zeros((10, 4, 4), np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[:-30])
    with pytest.raises(IdxError) as e:
        read_idx(path)
    msg = str(e.value)
    assert str(path) in msg and "truncated" in msg
    assert "10x4x4" in msg
    assert "expected 176 bytes" in msg and "found 146 bytes" in msg


def test_truncated_header(tmp_path):
    path = tmp_path / "hdr"
    path.write_bytes(b"\x00\x00\x08\x03\x00\x00")  # 3 dims announced, 6 bytes present
    with pytest.raises(IdxError, match=r"truncated IDX header.*16 header bytes, found 6"):
        read_idx(path)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with pytest.raises(IdxError) as e:
        read_idx(path)
    assert str(path) in str(e.value) and "empty (0 bytes)" in str(e.value)


def test_wrong_magic(tmp_path):
    path = write_idx(tmp_path / "m", np.zeros((2, 2), np.uint8))
    data = bytearray(path.read_bytes())
    data[0:2] = b"\x12\x34"
    path.write_bytes(bytes(data))
    with pytest.raises(IdxError) as e:
        read_idx(path)
    msg = str(e.value)
    assert str(path) in msg and "magic" in msg and "00 00" in msg and "12 34" in msg


def test_bad_dtype_code(tmp_path):
    path = write_idx(tmp_path / "t", np.zeros((2, 2), np.uint8))
    data = bytearray(path.read_bytes())
    data[2] = 0x0A
    path.write_bytes(bytes(data))
    with pytest.raises(IdxError) as e:
        read_idx(path)
    msg = str(e.value)
    assert str(path) in msg and "0x0A" in msg and "0x08 (uint8)" in msg and "0x0E (float64)" in msg


def test_count_mismatch(tmp_path):
    imgs = write_idx(tmp_path / "imgs", np.zeros((7, 3, 3), np.uint8))
    labs = write_idx(tmp_path / "labs", np.zeros((6,), np.uint8))
    with pytest.raises(IdxError) as e:
        read_idx_pair(imgs, labs)
    msg = str(e.value)
    assert str(imgs) in msg and str(labs) in msg
    assert "7 images" in msg and "6 labels" in msg


def test_trailing_bytes(tmp_path):
    path = write_idx(tmp_path / "tr", np.zeros((3,), np.uint8))
    path.write_bytes(path.read_bytes() + b"junk!")
    with pytest.raises(IdxError) as e:
        read_idx(path)
    msg = str(e.value)
    assert str(path) in msg and "trailing" in msg
    assert "expected 11 bytes" in msg and "found 16 bytes" in msg and "5 extra" in msg


def test_corrupt_gzip(tmp_path):
    good = gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x04abcd" * 50, mtime=0)
    path = tmp_path / "c.gz"
    path.write_bytes(good[: len(good) // 2])  # cut in the middle of the deflate stream
    with pytest.raises(IdxError) as e:
        read_idx(path)
    assert str(path) in str(e.value) and "corrupt gzip" in str(e.value)
    bad = bytearray(good)
    bad[12:20] = b"\xff" * 8  # garbage in the stream
    path.write_bytes(bytes(bad))
    with pytest.raises(IdxError, match="corrupt gzip"):
        read_idx(path)


def test_wrong_ndim(tmp_path):
    imgs = write_idx(tmp_path / "imgs", np.zeros((4, 16), np.uint8))  # flat images: 2-D
    labs = write_idx(tmp_path / "labs", np.zeros((4,), np.uint8))
    with pytest.raises(IdxError) as e:
        read_idx_pair(imgs, labs)
    assert str(imgs) in str(e.value) and "3-dimensional" in str(e.value) and "found 2" in str(e.value)
    imgs3 = write_idx(tmp_path / "imgs3", np.zeros((4, 2, 2), np.uint8))
    labs2 = write_idx(tmp_path / "labs2", np.zeros((4, 1), np.uint8))
    with pytest.raises(IdxError, match=r"labels must be 1-dimensional.*found 2"):
        read_idx_pair(imgs3, labs2)
    with pytest.raises(IdxError, match=r"expected a 1-dimensional IDX file, found 3"):
        read_idx(imgs3, ndim=1)


def test_negative_labels(tmp_path):
    imgs = write_idx(tmp_path / "imgs", np.zeros((3, 2, 2), np.uint8))
    labs = write_idx(tmp_path / "labs", np.array([0, -2, 1], np.int8))
    with pytest.raises(IdxError, match=r"non-negative, found -2 at index 1"):
        read_idx_pair(imgs, labs)


def test_non_uint8_images(tmp_path):
    imgs = write_idx(tmp_path / "imgs", np.zeros((3, 2, 2), np.float32))
    labs = write_idx(tmp_path / "labs", np.zeros((3,), np.uint8))
    with pytest.raises(IdxError, match=r"images must be uint8.*float32"):
        read_idx_pair(imgs, labs)


def test_missing_file_is_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file") as e:
        read_idx(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)


def test_checks_fire_under_python_O(tmp_path):
    path = write_idx(tmp_path / "imgs", np.zeros((10, 4, 4), np.uint8))
    path.write_bytes(path.read_bytes()[:-1])
    code = textwrap.dedent(f"""
        import sys
        try:
            assert False
        except AssertionError:
            sys.exit("asserts are on: -O was not applied")
        from cnnlab.errors import IdxError
        from cnnlab.idx import read_idx
        try:
            read_idx({str(path)!r})
        except IdxError as e:
            print("IDXERROR:", e)
            sys.exit(0)
        sys.exit("no error raised for a truncated file")
    """)
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "IDXERROR:" in r.stdout and "truncated" in r.stdout and "expected 176 bytes" in r.stdout
