"""Reading IDX files (the MNIST file format), raw or gzip-compressed.

Format: 2 zero bytes, one dtype code byte, one byte with the number of dimensions,
then one big-endian uint32 per dimension, then the data (big-endian, row-major).

Every fault raises `cnnlab.errors.IdxError` (a missing or unreadable file raises
`cnnlab.errors.DataError`) with one message naming the file, what was wrong, and the
expected vs actual values. No `assert` is used for checks, so they hold under `python -O`.
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from pathlib import Path

import numpy as np

from cnnlab.errors import DataError, IdxError

GZIP_MAGIC = b"\x1f\x8b"

# IDX dtype code -> (big-endian numpy dtype, human name).
IDX_DTYPES: dict[int, tuple[str, str]] = {
    0x08: (">u1", "uint8"),
    0x09: (">i1", "int8"),
    0x0B: (">i2", "int16"),
    0x0C: (">i4", "int32"),
    0x0D: (">f4", "float32"),
    0x0E: (">f8", "float64"),
}

# Sanity cap on the (uncompressed) content of one IDX file. MNIST's biggest file is 47 MB.
MAX_IDX_BYTES = 1 << 30

# More dimensions than this is certainly not a dataset file.
MAX_NDIM = 8


def read_idx_bytes(path: str | os.PathLike) -> bytes | bytearray:
    """The uncompressed content of an IDX file: gunzipped when it starts with 1f 8b.

    The whole file is read into memory (IDX datasets are small), up to MAX_IDX_BYTES.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_IDX_BYTES:
                raise IdxError(
                    f"{path}: file is too large for an IDX dataset file: "
                    f"{size} bytes, the limit is {MAX_IDX_BYTES} bytes"
                )
            raw = bytearray(size)
            n = f.readinto(raw)
            if n != size:  # the file changed under us
                del raw[n:]
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected an IDX file") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied") from None
    if len(raw) == 0:
        raise IdxError(f"{path}: file is empty (0 bytes), expected an IDX file")
    if raw[:2] != GZIP_MAGIC:
        return raw
    return gunzip(bytes(raw), path)


def gunzip(data: bytes, path: str | os.PathLike) -> bytes:
    """Decompress gzip `data` (read from `path`, used in messages), up to MAX_IDX_BYTES."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb") as g:
            out = g.read(MAX_IDX_BYTES + 1)
    except (gzip.BadGzipFile, EOFError, zlib.error, OSError) as e:
        what = str(e) or type(e).__name__
        if isinstance(e, EOFError):
            what = "compressed stream ends early (truncated download?)"
        raise IdxError(
            f"{path}: corrupt gzip file ({len(data)} bytes compressed): {what}"
        ) from None
    if len(out) > MAX_IDX_BYTES:
        raise IdxError(
            f"{path}: decompresses to more than {MAX_IDX_BYTES} bytes, "
            f"too large for an IDX dataset file"
        )
    return out


def parse_idx(data: bytes | bytearray, path: str | os.PathLike, ndim: int | None = None) -> np.ndarray:
    """Parse the uncompressed IDX content `data` (from `path`, used in messages).

    Returns an array in native byte order that does not share memory with a read-only
    buffer. When `ndim` is given, the file must have exactly that many dimensions.
    """
    path = str(path)
    size = len(data)
    if size == 0:
        raise IdxError(f"{path}: file is empty (0 bytes), expected an IDX file")
    if size < 4:
        raise IdxError(f"{path}: truncated IDX header: expected at least 4 bytes, found {size}")
    if data[0] != 0 or data[1] != 0:
        raise IdxError(
            f"{path}: not an IDX file: bad magic number: expected the first two bytes "
            f"to be 00 00, found {data[0]:02x} {data[1]:02x}"
            + (" (name ends in .gz but the content is not gzip)" if path.endswith(".gz") else "")
        )
    code, nd = data[2], data[3]
    if code not in IDX_DTYPES:
        valid = ", ".join(f"0x{c:02X} ({name})" for c, (_, name) in IDX_DTYPES.items())
        raise IdxError(f"{path}: unknown IDX dtype code 0x{code:02X}; expected one of {valid}")
    dtype_str, dtype_name = IDX_DTYPES[code]
    if nd == 0 or nd > MAX_NDIM:
        raise IdxError(f"{path}: bad number of dimensions in the IDX header: {nd} (expected 1 to {MAX_NDIM})")
    if ndim is not None and nd != ndim:
        raise IdxError(f"{path}: expected a {ndim}-dimensional IDX file, found {nd} dimensions")
    header = 4 + 4 * nd
    if size < header:
        raise IdxError(
            f"{path}: truncated IDX header: {nd} dimensions need {header} header bytes, found {size} bytes"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=nd, offset=4))
    itemsize = np.dtype(dtype_str).itemsize
    count = 1
    for d in dims:
        count *= d
    expected = header + count * itemsize
    shape = "x".join(str(d) for d in dims)
    if size < expected:
        raise IdxError(
            f"{path}: truncated IDX file: the header says {shape} {dtype_name}, so expected "
            f"{expected} bytes ({header} header + {count * itemsize} data), found {size} bytes"
        )
    if size > expected:
        raise IdxError(
            f"{path}: trailing bytes after the IDX data: the header says {shape} {dtype_name}, so expected "
            f"{expected} bytes, found {size} bytes ({size - expected} extra)"
        )
    arr = np.frombuffer(data, dtype=dtype_str, count=count, offset=header).reshape(dims)
    if itemsize > 1:
        return arr.astype(arr.dtype.newbyteorder("="))  # a native-order copy
    if not arr.flags.writeable:  # frombuffer over `bytes` is read-only
        arr = arr.copy()
    return arr


def read_idx(path: str | os.PathLike, ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (raw or gzip, detected by its magic bytes) into a numpy array."""
    return parse_idx(read_idx_bytes(path), path, ndim)


def check_pair(images: np.ndarray, labels: np.ndarray, images_path, labels_path) -> tuple[np.ndarray, np.ndarray]:
    """Check an (images, labels) pair parsed from two IDX files; return (uint8 images, int64 labels)."""
    if images.ndim != 3:
        raise IdxError(
            f"{images_path}: images must be 3-dimensional (N, H, W), found {images.ndim} dimensions "
            f"(shape {'x'.join(map(str, images.shape))})"
        )
    if labels.ndim != 1:
        raise IdxError(
            f"{labels_path}: labels must be 1-dimensional (N,), found {labels.ndim} dimensions "
            f"(shape {'x'.join(map(str, labels.shape))})"
        )
    if images.dtype != np.uint8:
        raise IdxError(f"{images_path}: images must be uint8 (IDX dtype code 0x08), found {images.dtype}")
    if labels.dtype.kind not in "iu":
        raise IdxError(f"{labels_path}: labels must be integers, found {labels.dtype}")
    n_img, n_lab = images.shape[0], labels.shape[0]
    if n_img != n_lab:
        raise IdxError(
            f"image and label counts differ: {images_path} has {n_img} images, "
            f"{labels_path} has {n_lab} labels"
        )
    if n_img == 0:
        raise IdxError(f"{images_path}: contains no images (N = 0)")
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise IdxError(f"{images_path}: images have an empty size {images.shape[1]}x{images.shape[2]}")
    if labels.dtype.kind == "i":
        neg = np.flatnonzero(labels < 0)
        if neg.size:
            i = int(neg[0])
            raise IdxError(
                f"{labels_path}: labels must be non-negative, found {int(labels[i])} at index {i} "
                f"({neg.size} negative labels in all)"
            )
    return images, labels.astype(np.int64)


def read_idx_pair(images_path: str | os.PathLike, labels_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read images (uint8, N x H x W) and labels (int64, N) from two IDX files and check they agree."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    return check_pair(images, labels, images_path, labels_path)
