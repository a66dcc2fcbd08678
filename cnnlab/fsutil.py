"""Small file-system helpers: atomic writes and a run-directory lock.

Every file cnnlab writes goes through atomic_write: a temp file in the same directory,
fsync, then os.replace over the target. A reader (or a crash at any moment) sees either
the old file or the new one, never half of one. A failed write (disk full) removes its
temp file and leaves the old file untouched.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from cnnlab import faults

TMP_PREFIX = ".tmp-"


def atomic_write(path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        faults.maybe_die_before_rename(path)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def exclusive(directory, lock_name: str, busy: str):
    """Hold a lock file in `directory` or raise RunError(busy) at once: one process per directory."""
    from filelock import FileLock, Timeout

    from cnnlab.errors import RunError

    lock = FileLock(str(Path(directory) / lock_name))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunError(busy) from None
    return lock  # a context manager: `with exclusive(...):` releases it


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, text.encode("utf-8"))


def atomic_write_json(path, obj, sort_keys: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def clean_temp_files(directory) -> int:
    """Remove leftovers of interrupted atomic writes. Returns how many were removed."""
    n = 0
    for p in Path(directory).glob(TMP_PREFIX + "*"):
        try:
            p.unlink()
            n += 1
        except OSError:
            pass
    return n


def atomic_savez(path, **arrays) -> None:
    """np.savez_compressed, atomically."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write(path, buf.getvalue())


def read_toml(path, error: type, what: str = "TOML file") -> dict:
    """Parse a TOML file; a missing, unreadable or invalid file raises `error` with one clear line.
    (tomllib also rejects duplicate keys, such as a variant defined twice, naming the line.)"""
    import tomllib

    p = Path(path)
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{p}: no such file") from None
    except IsADirectoryError:
        raise error(f"{p}: is a directory, expected a {what}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise error(f"{p}: not valid TOML: {e}") from None
    except OSError as e:
        raise error(f"{p}: cannot read: {e.strerror}") from None
