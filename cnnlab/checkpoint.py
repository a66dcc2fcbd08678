"""Checkpoints: safetensors for tensors, JSON for metadata, a checksum over both.

No pickle is ever loaded. The file is one safetensors file whose header metadata holds
`meta` (JSON) and `sha256`, a digest over the metadata and every tensor's bytes, so a
truncated or bit-flipped file is detected before any of it is used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from cnnlab.errors import CheckpointError
from cnnlab.fsutil import atomic_write

FORMAT = "cnnlab-checkpoint-1"


def _digest(meta_json: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(meta_json.encode())
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save(path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import save as st_save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta_json = json.dumps({"format": FORMAT, **meta}, sort_keys=True)
    blob = st_save(tensors, metadata={"meta": meta_json, "sha256": _digest(meta_json, tensors)})
    atomic_write(path, blob)


def load(path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    p = Path(path)
    try:
        blob = p.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{p}: no such checkpoint") from None
    if blob[:2] in (b"\x80\x02", b"\x80\x04", b"\x80\x05") or blob[:2] == b"PK":
        raise CheckpointError(
            f"{p}: this is a pickle/torch.save file; cnnlab only loads its own safetensors "
            "checkpoints and never unpickles (unpickling can run code)"
        )
    try:
        tensors = st_load(blob)
        n = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + n]).get("__metadata__") or {}
    except (SafetensorError, ValueError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{p}: not a readable checkpoint (truncated or corrupt?): {e}") from None
    meta_json, digest = header.get("meta"), header.get("sha256")
    if not meta_json or not digest:
        raise CheckpointError(f"{p}: not a cnnlab checkpoint (no metadata or checksum)")
    if _digest(meta_json, tensors) != digest:
        raise CheckpointError(f"{p}: checksum mismatch, the file is corrupt; delete it to retrain or resume from another")
    meta = json.loads(meta_json)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{p}: unknown checkpoint format {meta.get('format')!r}")
    return tensors, meta
