"""Readers for the dataset formats other than IDX: `npz:FILE`, `folder:DIR` and the
CIFAR-10 binary tarball. Each turns files into numpy arrays in the canonical layout
(images (N, C, H, W), uint8 or float32; labels int64) and raises `cnnlab.errors.DataError`
with one line naming the file and what is wrong. Where the files come from (the cache, the
fetch, the pinned hashes) and the checks common to every source (label range, classes
without images, train and test sizes) live in `cnnlab.data`; the rules are in its docstring.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnlab.errors import DataError, ImageError

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
NPZ_CLASSES = "classes"  # optional: class names, a 1-D array of strings
MAX_NPZ_MEMBER_BYTES = 8 << 30  # the uncompressed size the zip directory may declare for one array

FOLDER_SPLITS = ("train", "test")

CIFAR10_DIR = "cifar-10-batches-bin"
CIFAR10_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST = "test_batch.bin"
CIFAR10_RECORD = 1 + 3 * 32 * 32  # one label byte, then the R, G and B planes of 32 x 32
MAX_CIFAR10_MEMBER_BYTES = 64 << 20  # the official batches are 30,730,000 bytes each


@dataclass
class Arrays:
    """One source's content before the common checks of cnnlab.data."""

    x_train: np.ndarray  # (N, C, H, W) uint8 or float32
    y_train: np.ndarray  # int64 (N,)
    x_test: np.ndarray
    y_test: np.ndarray
    where: dict[str, str]  # "x_train"... -> how to name that array in a message
    classes: list[str] | None = None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- conversions

def _shape(a: np.ndarray) -> str:
    return "x".join(str(d) for d in a.shape)


def image_dtype(x: np.ndarray, where: str) -> np.ndarray:
    """uint8 as is; other integers when all lie in 0..255; floats as float32 (finite)."""
    kind = x.dtype.kind
    if x.dtype == np.uint8:
        return x
    if kind in "iu":
        lo, hi = (int(x.min()), int(x.max())) if x.size else (0, 0)
        if lo < 0 or hi > 255:
            raise DataError(f"{where}: integer images must hold pixels 0..255, found {x.dtype} values {lo}..{hi} "
                            "(give uint8 0..255, or float32 already scaled)")
        return x.astype(np.uint8)
    if kind == "f":
        x = x.astype(np.float32, copy=False)
        bad = ~np.isfinite(x)
        if bad.any():
            i = int(np.flatnonzero(bad.reshape(-1))[0])
            raise DataError(f"{where}: images hold NaN or infinite values ({int(bad.sum())} in all, "
                            f"the first at flat index {i})")
        return x
    raise DataError(f"{where}: images must be uint8 (0..255) or float (already scaled), found dtype {x.dtype}")


def label_dtype(y: np.ndarray, where: str) -> np.ndarray:
    """int64 (N,) from integers, or floats that are whole numbers; (N, 1) is accepted."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{where}: labels must be 1-dimensional (N,) or (N, 1), found shape {_shape(y)}")
    kind = y.dtype.kind
    if kind in "iu":
        if kind == "u" and y.size and int(y.max()) > np.iinfo(np.int64).max:
            raise DataError(f"{where}: label {int(y.max())} is too large")
        return y.astype(np.int64)
    if kind == "f":
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{where}: labels must be whole class numbers, found {y[i].item()!r} at index {i} "
                            f"({int(bad.sum())} such labels; dtype {y.dtype})")
        if y.size and (float(np.abs(y).max()) >= 2**53):
            raise DataError(f"{where}: label {float(np.abs(y).max()):g} is too large")
        return y.astype(np.int64)
    raise DataError(f"{where}: labels must be integers, found dtype {y.dtype}")


def to_nchw(arrays: dict[str, np.ndarray], where: dict[str, str], origin: str) -> dict[str, np.ndarray]:
    """Image arrays (N, H, W), (N, C, H, W) or (N, H, W, C) -> (N, C, H, W), C 1 or 3. The
    layout is decided for all the arrays together by which axis has 1 or 3 channels."""
    four = {k: a for k, a in arrays.items() if a.ndim == 4}
    for k, a in arrays.items():
        if a.ndim not in (3, 4):
            raise DataError(f"{where[k]}: images must be (N, H, W), (N, C, H, W) or (N, H, W, C), "
                            f"found shape {_shape(a)}")
    layout = None
    if four:
        first = all(a.shape[1] in (1, 3) for a in four.values())
        last = all(a.shape[3] in (1, 3) for a in four.values())
        shapes = ", ".join(f"{k} {_shape(a)}" for k, a in four.items())
        if first and last:
            raise DataError(f"{origin}: cannot tell whether the images are NCHW or NHWC ({shapes}: both the "
                            "second and the last axis could hold 1 or 3 channels); store them as (N, H, W) "
                            "for grayscale, or make the layout unambiguous")
        if not (first or last):
            raise DataError(f"{origin}: images must have 1 (grayscale) or 3 (RGB) channels on the second "
                            f"(NCHW) or last (NHWC) axis, found {shapes}")
        layout = "NCHW" if first else "NHWC"
    out = {}
    for k, a in arrays.items():
        if a.ndim == 3:
            a = a[:, None]
        elif layout == "NHWC":
            a = a.transpose(0, 3, 1, 2)
        out[k] = np.ascontiguousarray(a)
    return out


# --------------------------------------------------------------------------- npz:FILE

def read_npz(path: Path) -> Arrays:
    """x_train, y_train, x_test, y_test (and optionally classes) from an .npz, never unpickling."""
    try:
        with zipfile.ZipFile(path) as zf:
            sizes = {n[:-4]: zf.getinfo(n).file_size for n in zf.namelist() if n.endswith(".npy")}
    except zipfile.BadZipFile:
        raise DataError(f"{path}: not an .npz file (not a zip archive); save it with numpy.savez or "
                        "numpy.savez_compressed") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    missing = [k for k in NPZ_KEYS if k not in sizes]
    if missing:
        raise DataError(f"{path}: missing {', '.join(missing)}; an npz dataset holds "
                        f"{', '.join(NPZ_KEYS)} (found: {', '.join(sorted(sizes)) or 'no arrays'})")
    for k in NPZ_KEYS + ((NPZ_CLASSES,) if NPZ_CLASSES in sizes else ()):
        if sizes[k] > MAX_NPZ_MEMBER_BYTES:
            raise DataError(f"{path}: {k} declares {sizes[k]} bytes uncompressed, more than the "
                            f"{MAX_NPZ_MEMBER_BYTES}-byte limit")
    raw: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as z:
            for k in NPZ_KEYS + ((NPZ_CLASSES,) if NPZ_CLASSES in sizes else ()):
                try:
                    raw[k] = z[k]
                except ValueError as e:
                    if "allow_pickle" in str(e) or "Object arrays" in str(e):
                        raise DataError(f"{path}: {k} is an object array (pickled Python objects), which "
                                        "cnnlab never loads; save plain numeric arrays") from None
                    raise DataError(f"{path}: {k} cannot be read: {e}") from None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"{path}: cannot read the arrays: {e}") from None
    where = {k: f"{path}: {k}" for k in NPZ_KEYS}
    for k in NPZ_KEYS:
        if raw[k].dtype.kind in "OV":
            raise DataError(f"{where[k]}: dtype {raw[k].dtype} is not a plain numeric array")
    images = {k: image_dtype(raw[k], where[k]) for k in ("x_train", "x_test")}
    if (images["x_train"].dtype == np.uint8) != (images["x_test"].dtype == np.uint8):
        raise DataError(f"{path}: x_train is {images['x_train'].dtype} but x_test is {images['x_test'].dtype}; "
                        "give both as uint8 0..255 or both as float already scaled")
    images = to_nchw(images, where, str(path))
    classes = None
    if NPZ_CLASSES in raw:
        c = raw[NPZ_CLASSES]
        if c.ndim != 1 or c.dtype.kind not in "US":
            raise DataError(f"{path}: {NPZ_CLASSES} must be a 1-D array of strings, found {c.dtype} "
                            f"shape {_shape(c)}")
        classes = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in c.tolist()]
    return Arrays(images["x_train"], label_dtype(raw["y_train"], where["y_train"]),
                  images["x_test"], label_dtype(raw["y_test"], where["y_test"]), where, classes)


# --------------------------------------------------------------------------- folder:DIR

@dataclass
class FolderListing:
    root: Path
    classes: list[str]
    files: dict[str, list[tuple[int, Path]]]  # split -> [(class index, file)], sorted
    sha256: str  # over every file's relative path, size and bytes, in order


def list_folder(root: Path) -> FolderListing:
    """The image files of DIR/train/<class>/* and DIR/test/<class>/*, and their sha256."""
    found: dict[str, dict[str, list[Path]]] = {}
    for split in FOLDER_SPLITS:
        d = root / split
        if not d.is_dir():
            raise DataError(f"{root}: no {split}/ folder; a folder dataset holds train/<class>/<images> "
                            "and test/<class>/<images>")
        per_class: dict[str, list[Path]] = {}
        for entry in sorted(d.iterdir(), key=lambda p: p.name):
            if entry.name.startswith("."):
                continue
            if not entry.is_dir():
                raise DataError(f"{entry}: a file directly in {split}/; put each image in its class folder "
                                f"{split}/<class>/")
            files = []
            for f in sorted(entry.iterdir(), key=lambda p: p.name):
                if f.name.startswith("."):
                    continue
                if f.is_dir():
                    raise DataError(f"{f}: a folder inside the class folder {entry.name}/; put the images "
                                    "directly in it")
                files.append(f)
            per_class[entry.name] = files
        found[split] = per_class
    train, test = set(found["train"]), set(found["test"])
    if train != test:
        only = [f"only in train/: {', '.join(sorted(train - test))}" if train - test else "",
                f"only in test/: {', '.join(sorted(test - train))}" if test - train else ""]
        raise DataError(f"{root}: train/ and test/ must have the same class folders; "
                        + "; ".join(s for s in only if s))
    classes = sorted(train)
    if not classes:
        raise DataError(f"{root}: train/ has no class folders; a folder dataset holds train/<class>/<images> "
                        "and test/<class>/<images>")
    for split in FOLDER_SPLITS:
        empty = [c for c in classes if not found[split][c]]
        if split == "train" and empty:
            raise DataError(f"{root / split / empty[0]}: class {empty[0]!r} has no images in train/"
                            + (f" (nor {', '.join(empty[1:])})" if len(empty) > 1 else ""))
    h = hashlib.sha256()
    files: dict[str, list[tuple[int, Path]]] = {}
    for split in FOLDER_SPLITS:
        files[split] = []
        for ci, c in enumerate(classes):
            for f in found[split][c]:
                rel = f"{split}/{c}/{f.name}".encode("utf-8", "surrogateescape")
                try:
                    content = f.read_bytes()
                except OSError as e:
                    raise DataError(f"{f}: cannot read: {e.strerror or e}") from None
                h.update(len(rel).to_bytes(8, "big") + rel + len(content).to_bytes(8, "big"))
                h.update(content)
                files[split].append((ci, f))
    return FolderListing(root, classes, files, h.hexdigest())


def decode_folder(listing: FolderListing) -> Arrays:
    """Decode every image (cnnlab.images' guards). All must have one size. Channels: RGB when
    any image has colour (channels that differ somewhere), else grayscale."""
    from cnnlab.images import decode_pixels

    first: tuple[Path, tuple[int, int]] | None = None
    colour = False
    decoded: dict[str, list[np.ndarray]] = {}
    for split in FOLDER_SPLITS:
        decoded[split] = []
        for _, f in listing.files[split]:
            try:
                px = decode_pixels(f)
            except ImageError as e:
                raise DataError(str(e)) from None
            size = (px.shape[1], px.shape[0])
            if first is None:
                first = (f, size)
            elif size != first[1]:
                raise DataError(f"images differ in size: {first[0]} is {first[1][0]}x{first[1][1]}, {f} is "
                                f"{size[0]}x{size[1]} (width x height); a folder dataset needs one size")
            if px.ndim == 3 and not colour:
                colour = bool((px[..., 0] != px[..., 1]).any() or (px[..., 0] != px[..., 2]).any())
            decoded[split].append(px)
    out = {}
    for split in FOLDER_SPLITS:
        arrs = []
        for px in decoded[split]:
            if colour:
                px = np.repeat(px[:, :, None], 3, axis=2) if px.ndim == 2 else px
                arrs.append(px.transpose(2, 0, 1))
            else:
                arrs.append((px[:, :, 0] if px.ndim == 3 else px)[None])
        h, w = first[1][1], first[1][0]  # type: ignore[index]
        out[split] = np.ascontiguousarray(np.stack(arrs)) if arrs else \
            np.zeros((0, 3 if colour else 1, h, w), np.uint8)
    labels = {s: np.array([ci for ci, _ in listing.files[s]], dtype=np.int64) for s in FOLDER_SPLITS}
    return Arrays(out["train"], labels["train"], out["test"], labels["test"], folder_where(listing.root),
                  list(listing.classes))


def folder_where(root: Path) -> dict[str, str]:
    return {"x_train": f"{root}/train", "y_train": f"{root}/train", "x_test": f"{root}/test",
            "y_test": f"{root}/test"}


def save_arrays(a: Arrays) -> bytes:
    """An .npz (no pickle) of decoded arrays, for the folder cache."""
    buf = io.BytesIO()
    np.savez(buf, x_train=a.x_train, y_train=a.y_train, x_test=a.x_test, y_test=a.y_test,
             classes=np.array(a.classes or [], dtype=str))
    return buf.getvalue()


def load_arrays(path: Path, where: dict[str, str]) -> Arrays | None:
    """What save_arrays wrote, or None when the file is missing or unusable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            got = {k: z[k] for k in NPZ_KEYS + (NPZ_CLASSES,)}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None
    x_tr, x_te = got["x_train"], got["x_test"]
    if x_tr.ndim != 4 or x_te.ndim != 4 or x_tr.dtype != np.uint8 or x_te.dtype != np.uint8:
        return None
    return Arrays(x_tr, got["y_train"].astype(np.int64), x_te, got["y_test"].astype(np.int64), where,
                  [str(c) for c in got[NPZ_CLASSES].tolist()])


# --------------------------------------------------------------------------- CIFAR-10 binary

def read_cifar10(data: bytes, path: Path) -> Arrays:
    """The six batches of the official cifar-10-binary.tar.gz (`data`, read from `path`).
    Members are read by name, regular files only; nothing is extracted."""
    wanted = set(CIFAR10_TRAIN) | {CIFAR10_TEST}
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
            for member in tf:
                base = member.name.rsplit("/", 1)[-1]
                if base not in wanted:
                    continue
                where = f"{path}: {member.name}"
                if base in parts:
                    raise DataError(f"{where}: {base} appears twice in the archive")
                if not member.isreg():
                    raise DataError(f"{where}: not a regular file")
                if member.size == 0 or member.size % CIFAR10_RECORD or member.size > MAX_CIFAR10_MEMBER_BYTES:
                    raise DataError(f"{where}: {member.size} bytes is not a whole number of "
                                    f"{CIFAR10_RECORD}-byte records (1 label byte + 3x32x32 pixels)")
                fobj = tf.extractfile(member)
                raw = fobj.read() if fobj is not None else b""
                if len(raw) != member.size:
                    raise DataError(f"{where}: expected {member.size} bytes, read {len(raw)}")
                rec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR10_RECORD)
                parts[base] = (rec[:, 1:].reshape(-1, 3, 32, 32).copy(), rec[:, 0].astype(np.int64))
    except DataError:
        raise
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read the archive: {e}") from None
    missing = [n for n in CIFAR10_TRAIN + (CIFAR10_TEST,) if n not in parts]
    if missing:
        raise DataError(f"{path}: the archive lacks {', '.join(missing)} (expected {CIFAR10_DIR}/"
                        f"data_batch_1..5.bin and test_batch.bin)")
    x_train = np.concatenate([parts[n][0] for n in CIFAR10_TRAIN])
    y_train = np.concatenate([parts[n][1] for n in CIFAR10_TRAIN])
    where = {"x_train": f"{path}: data_batch_1..5.bin", "y_train": f"{path}: data_batch_1..5.bin",
             "x_test": f"{path}: {CIFAR10_TEST}", "y_test": f"{path}: {CIFAR10_TEST}"}
    return Arrays(x_train, y_train, parts[CIFAR10_TEST][0], parts[CIFAR10_TEST][1], where)


def tree_stamp(root: Path) -> tuple:
    """(relative path, size, mtime_ns) of every file under root, sorted: changes when one does."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for n in filenames:
            p = os.path.join(dirpath, n)
            st = os.stat(p)
            out.append((os.path.relpath(p, root), st.st_size, st.st_mtime_ns))
    return tuple(sorted(out))
