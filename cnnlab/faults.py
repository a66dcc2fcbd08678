"""Fault injection for the crash-safety tests (tests/test_reliability.py, tests/test_ray.py),
all in one place. Each hook does nothing unless its environment variable is set:

- CNNLAB_FAULT="kill:EPOCH:STEP" or "kill-after-checkpoint:EPOCH:0": the training loop
  SIGKILLs its own process there (cnnlab.engine.loop.fit). With CNNLAB_FAULT_ONCE=PATH it fires
  only while PATH does not exist (it creates PATH just before dying), so a retried run gets
  through.
- CNNLAB_FAULT_WRITE="NAME:N": SIGKILL on the N-th atomic write of a file named NAME, after its
  temp file is written and before the rename (fsutil.atomic_write).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

_write_counts: dict[str, int] = {}


def point() -> tuple[str, int, int] | None:
    """The training fault CNNLAB_FAULT asks for, as (kind, epoch, step), or None."""
    spec = os.environ.get("CNNLAB_FAULT")
    if not spec:
        return None
    kind, epoch, step = spec.split(":")
    return kind, int(epoch), int(step)


def maybe_die(fault, kind: str, epoch: int, step: int) -> None:
    """SIGKILL this process when `fault` (from point()) is (kind, epoch, step)."""
    if fault is None or fault != (kind, epoch, step):
        return
    once = os.environ.get("CNNLAB_FAULT_ONCE")
    if once:
        try:
            fd = os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_die_before_rename(path: Path) -> None:
    """SIGKILL this process on the N-th write of a file named NAME (CNNLAB_FAULT_WRITE)."""
    spec = os.environ.get("CNNLAB_FAULT_WRITE")
    if not spec:
        return
    name, n = spec.rsplit(":", 1)
    if path.name == name:
        _write_counts[name] = _write_counts.get(name, 0) + 1
        if _write_counts[name] == int(n):
            os.kill(os.getpid(), signal.SIGKILL)
