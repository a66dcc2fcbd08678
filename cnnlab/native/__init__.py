"""cnnlab's native kernels (kernels.c beside this file): compiled on first use, loaded with ctypes.

The kernels are plain C with no torch headers, so building them takes about a second with
the system's C compiler (`cc`, or $CC). The library is cached per source, compiler, flags
and CPU under $CNNLAB_NATIVE_DIR (default ~/.cache/cnnlab/native), so each machine builds it
once; a concurrent build by another process is harmless (each writes its own temporary file
and renames it into place), and a damaged library in the cache is built again.

Without a C compiler, or with CNNLAB_NATIVE=0, `library()` returns None and cnnlab runs the
same network with torch's kernels (cnnlab.fastops): the same math, slower, and rounded in a
different order. `describe()` says which, and every run records it in result.json.

Threads: the library is built with OpenMP (-fopenmp) where the compiler can, and then the
C training step (fastops.TrainStep) shares the batch's images out between `threads()`
threads: torch.get_num_threads() when the plan is built, unless set_threads() says
otherwise. torch is imported before the library is loaded, so the kernels use torch's own
OpenMP runtime (its libgomp.so.1), and BLAS runs one thread inside each worker
(mkl_set_num_threads_local, when torch's BLAS has it). Where -fopenmp fails, or with
CNNLAB_NATIVE_OPENMP=0 (a separate library in the cache), the library is built without it
and the step runs one thread; describe() says so. A thread count gives the same numbers run
after run; N threads against one: docs/performance.md (issue 18) and
tests/test_native_threads.py.

Products: the fc blocks' and the output layer's go to torch's BLAS (sgemm()); a conv block's
forward and input-column products to the library's own FMA kernel where the compiler
targets FMA (the same bits as MKL's); its weight gradient to BLAS too, unless
CNNLAB_NATIVE_DOT_WGRAD=1 (dot_wgrad(): faster, rounded differently, named in describe()).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-std=c99", "-O3", "-march=native", "-fPIC", "-shared", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math"]
OPENMP_FLAG = "-fopenmp"
BUILD_TIMEOUT = 120  # seconds

_P, _I, _D, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_double, ctypes.c_float
SIGNATURES = {  # name: argument types (restype None), or (argument types, restype)
    "cl_random_bytes": [_P, ctypes.c_long, ctypes.c_uint64],
    "cl_im2col": [_P, _P] + [_I] * 9,
    "cl_col2im": [_P, _P] + [_I] * 9,
    "cl_block_forward": [_P, _I, _I, _I, _I, _P, _P, _P, _P, _P, _I, _D, _D, _P, _P, _I, _I, _F, _I, _P, _P, _P],
    "cl_block_backward": [_P, _P, _P, _P, _I, _I, _I, _I, _P, _I, _I, _F, _I, _P, _P, _P, _P, _P],
    "cl_sgemm_check": ([_P], _I),
    "cl_train_step": ([_I, _P, _P, _P, _P, _P, _I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _I], _I),
    "cl_forward": ([_I, _P, _P, _P, _P, _I, _I, _I, _P, _P, _P, _P, _P, _I], _I),
    "cl_train_steps": ([_I, _P, _P, _P, _I, _I, _P, _P, ctypes.c_long, ctypes.c_long, _P, _I, _I, _I] + [_P] * 12
                       + [_I], _I),
    "cl_openmp": ([], _I),
    "cl_set_blas_threads": [_P],
    "cl_adam": [_I, _P, _P, _P, _P, _P, _P, _D, _D, _D, _D, _I],
    "cl_layout": ([_I, _P, _I], _I),
    "cl_small_k": ([], _I),
    "cl_gemm_small_k": ([_I, _I, _I, _I, _P, _I, _P, _I, _P, _I], _I),
    "cl_gemm_dot": ([_I, _I, _I, _P, _I, _P, _I, _P, _I], _I),
    "cl_set_dot_wgrad": [_I],
}

# kernels.c's structs, mirrored with ctypes. The field names in kernels.c's order, which is also
# the order cl_layout reports their offsets in; library() checks every mirror's size and each
# named field's offset against it before any kernel runs.
BLOCK_INTS = ("fc", "C", "H", "W", "k", "s", "p", "Ho", "Wo", "O", "pool", "flatten", "flat_hw", "mask_bits",
              "threshold", "direct")
BLOCK_BUFS = ("cols", "z", "out", "invstd", "gz", "gout", "dcols", "feats", "arg", "mask_raw", "mask")
BLOCK_FIELDS = BLOCK_INTS + ("scale", "batch_stats", "momentum", "eps") + BLOCK_BUFS
ADAM_FIELDS = ("nt", "params", "grads", "exp_avgs", "exp_avg_sqs", "steps", "sizes", "lr", "beta1", "beta2", "eps",
               "vec")


class CBlock(ctypes.Structure):
    """kernels.c's cl_block."""
    _fields_ = ([(n, _I) for n in BLOCK_INTS] + [("scale", _F), ("batch_stats", _I), ("momentum", _D), ("eps", _D)]
                + [(n, _P) for n in BLOCK_BUFS])


class AdamArgs(ctypes.Structure):
    """kernels.c's cl_adam_args."""
    _fields_ = ([("nt", _I)] + [(n, _P) for n in ADAM_FIELDS[1:7]] + [(n, _D) for n in ADAM_FIELDS[7:11]]
                + [("vec", _I)])


STRUCTS = {0: ("cl_block", CBlock, BLOCK_FIELDS), 1: ("cl_adam_args", AdamArgs, ADAM_FIELDS)}  # cl_layout's `which`


_lib: ctypes.CDLL | None = None
_status: str | None = None
_openmp_status: str | None = None  # why the library has no OpenMP, or None when it has
_dot_wgrad = False  # whether the loaded library computes conv weight gradients in its own kernel
_threads: int | None = None  # set_threads(): None follows torch.get_num_threads()


def build_dir() -> Path:
    env = os.environ.get("CNNLAB_NATIVE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cnnlab" / "native"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    return shutil.which(cc) if cc else (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"))


def _cpu_id() -> str:
    """What -march=native depends on: the machine and its CPU's model and feature flags."""
    ident = [platform.machine()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part") and line not in ident:
                    ident.append(line)
                if line.strip() == "":
                    break  # the first processor is enough
    except OSError:
        pass
    return "".join(ident)


def _flags(openmp: bool) -> list[str]:
    return FLAGS + [OPENMP_FLAG] if openmp else list(FLAGS)


def _build(cc: str, force: bool = False, openmp: bool = False) -> Path:
    """The library's path, compiling it unless it is cached (or force). A new build replaces
    the file atomically: a process that has the old one loaded keeps its (unlinked) copy.
    With and without OpenMP the flags differ, and so do the cached files."""
    flags = _flags(openmp)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, " ".join(flags), _cpu_id()]).encode())
    out = build_dir() / f"libcnnlab-{key.hexdigest()[:16]}.so"
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                           timeout=BUILD_TIMEOUT)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed: {(r.stderr or r.stdout).strip()[-500:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them if needed; None when they cannot be had (see describe())."""
    global _lib, _status, _openmp_status, _dot_wgrad
    if _status is not None:
        return _lib
    if os.environ.get("CNNLAB_NATIVE", "1") == "0":
        _status = "torch (native kernels off: CNNLAB_NATIVE=0)"
        return None
    cc = _compiler()
    if cc is None:
        _status = "torch (native kernels unavailable: no C compiler; install gcc or set CC)"
        return None
    import torch  # noqa: F401  (first: its OpenMP runtime, libgomp.so.1, is then the one the kernels use)

    try:
        lib = None
        if os.environ.get("CNNLAB_NATIVE_OPENMP", "1") == "0":
            _openmp_status = "CNNLAB_NATIVE_OPENMP=0"
        else:
            try:
                lib = _load(cc, openmp=True)
                _openmp_status = None
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:  # no OpenMP here: build without
                _openmp_status = f"{OPENMP_FLAG} failed: {str(e).strip().splitlines()[-1][-200:] if str(e).strip() else e!r}"
        if lib is None:
            lib = _load(cc, openmp=False)
        for name, sig in SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = sig if isinstance(sig, tuple) else (sig, None)
        check_layouts(lib)
        lib.cl_set_blas_threads(_blas_threads_local())
        dot = dot_wgrad()
        lib.cl_set_dot_wgrad(1 if dot else 0)
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
        _status = f"torch (native kernels unavailable: {e})"
        return None
    _lib, _status, _dot_wgrad = lib, f"native ({Path(cc).name} {' '.join(FLAGS[1:3])})", dot
    return _lib


def dot_wgrad() -> bool:
    """Whether the user asked (CNNLAB_NATIVE_DOT_WGRAD=1) for the conv weight gradients in
    cnnlab's FMA kernel instead of BLAS: ~10% off a step of the lab's networks, but its sums
    round differently from BLAS's, so a run's numbers change (the same math). Off by default,
    so that the engine's numbers stay what they were; a value other than 0 or 1 leaves it off
    and says so once."""
    value = os.environ.get("CNNLAB_NATIVE_DOT_WGRAD", "0").strip()
    if value not in ("", "0", "1"):
        print(f"cnnlab: CNNLAB_NATIVE_DOT_WGRAD={value!r} is neither 0 nor 1: the weight-gradient kernel stays off",
              file=sys.stderr)
    return value == "1"


def _blas_threads_local() -> int | None:
    """The address of MKL's C MKL_Set_Num_Threads_Local in torch's library (the threads BLAS
    uses in the calling thread; an int by value: there the lower-case name is the Fortran
    interface, which takes a pointer), or None (another BLAS)."""
    import torch

    for path in sorted((Path(torch.__file__).parent / "lib").glob("libtorch_cpu.*")):
        try:
            fn = getattr(ctypes.CDLL(str(path)), "MKL_Set_Num_Threads_Local", None)
        except OSError:
            continue
        if fn is not None:
            return ctypes.cast(fn, ctypes.c_void_p).value
    return None


def _load(cc: str, openmp: bool) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(str(_build(cc, openmp=openmp)))
    except OSError:  # a damaged library in the cache: build it again, once
        return ctypes.CDLL(str(_build(cc, force=True, openmp=openmp)))


def openmp() -> bool:
    """Whether the loaded kernels were built with OpenMP (so the C step can run threads)."""
    lib = library()
    return lib is not None and bool(lib.cl_openmp())


def set_threads(n: int | None) -> None:
    """The threads of the C training step for plans built from now on: n > 0 threads; 0 all
    the cores this process may run on; None (the default) torch.get_num_threads() at the
    time the plan is built (so torch.set_num_threads(1), as a study's workers do, gives one)."""
    global _threads
    if n is not None and n < 0:
        raise ValueError(f"threads must be >= 0 or None, got {n}")
    _threads = None if n is None else (n or _cores())


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads() -> int:
    """The threads a C step plan built now uses: set_threads()'s, or torch's thread count;
    1 when the kernels have no OpenMP (or are not there)."""
    if not openmp():
        return 1
    if _threads is not None:
        return _threads
    import torch

    return max(1, torch.get_num_threads())


def check_layouts(lib) -> None:
    """RuntimeError unless every ctypes mirror in STRUCTS has the C struct's size and each named
    field at the C struct's offset: a mismatch would make the kernels read and write the wrong
    bytes, so then the kernels are not used at all."""
    for which, (cname, struct, names) in STRUCTS.items():
        c = (ctypes.c_int64 * 64)()
        n = lib.cl_layout(which, c, len(c))
        if n != len(names) + 1:
            raise RuntimeError(f"{cname} has {n - 1} fields in kernels.c and {len(names)} in cnnlab/native's list")
        if c[0] != ctypes.sizeof(struct):
            raise RuntimeError(f"{cname}'s layout differs between kernels.c and its ctypes mirror at its size "
                               f"({c[0]} bytes in C, {ctypes.sizeof(struct)} in Python)")
        for name, offset in zip(names, c[1:n]):
            got = getattr(getattr(struct, name, None), "offset", None)
            if got != offset:
                raise RuntimeError(f"{cname}'s layout differs between kernels.c and its ctypes mirror at field "
                                   f"{name!r} (offset {offset} in C, {got} in Python)")


_sgemm: int | None = None
_sgemm_status: str | None = None


def sgemm() -> int | None:
    """The address of the BLAS sgemm_ that torch itself calls (MKL in the x86 wheels), for
    cl_train_step; None when torch's library does not export one or it fails a small check
    (then the step runs as separate calls from Python, fastops.train_step)."""
    global _sgemm, _sgemm_status
    if _sgemm_status is not None:
        return _sgemm
    _sgemm_status = "no BLAS sgemm_ found in torch's library"
    lib = library()
    if lib is None:
        return None
    import torch

    libdir = Path(torch.__file__).parent / "lib"
    for path in sorted(libdir.glob("libtorch_cpu.*")):
        try:
            torch_cpu = ctypes.CDLL(str(path))
        except OSError:
            continue
        for name in ("sgemm_", "SGEMM"):
            fn = getattr(torch_cpu, name, None)
            if fn is None:
                continue
            addr = ctypes.cast(fn, ctypes.c_void_p).value
            if lib.cl_sgemm_check(addr) == 0:
                _sgemm, _sgemm_status = addr, f"torch's BLAS {name}"
                return _sgemm
            _sgemm_status = f"{name} in {path.name} failed its check"
    return None


def describe() -> str:
    """Which kernels CPU training uses: 'native (compiler and flags; how the step runs; its
    threads)' or 'torch (why not native)'. The step runs as one C call with torch's BLAS
    sgemm_, or, without one, as separate calls from Python; the two round differently. The
    threads are those of a plan built now (threads()): say after torch.set_num_threads."""
    if library() is None:
        return _status or "torch"
    if sgemm() is None:
        return f"{_status[:-1]}; step from Python: {_sgemm_status or ''})"
    n = threads()
    if _openmp_status is not None:
        par = f"1 thread (built without OpenMP: {_openmp_status})"
    else:
        par = f"{n} thread{'s' if n != 1 else ''} (OpenMP)"
    vec = library().cl_small_k()
    small = f"; conv products in C ({vec}-wide FMA)" if vec else ""
    if vec and _dot_wgrad:
        small += ", weight gradients too (CNNLAB_NATIVE_DOT_WGRAD=1: they round differently from BLAS)"
    return f"{_status[:-1]}; step in C with {_sgemm_status}{small}; {par})"
