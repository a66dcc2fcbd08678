"""Load a trained run's model back (safely) for eval and predict."""

from __future__ import annotations

from pathlib import Path

import torch

from cnnlab.errors import CheckpointError, RunError
from cnnlab import rundir


def load_run_model(run_dir, which: str = "last", device: str = "cpu", trust_code: bool = False, note=None):
    """(model in eval mode, RunConfig, checkpoint meta) from RUN_DIR/checkpoints/{which}.safetensors.

    The checkpoint must match the architecture in RUN_DIR/config.toml; a mismatch is refused
    with a message naming the difference. A model built by a factory (cnnlab.factory) is
    built only with trust_code=True, since that imports the code config.toml names; when
    that code changed since training, note(text) hears it.
    """
    from cnnlab import checkpoint, factory
    from cnnlab.config import load_config
    from cnnlab.model import build_model
    from cnnlab.spec import ModelSpec

    run = Path(run_dir)
    if not (run / rundir.CONFIG).is_file():
        raise RunError(f"{run}: not a run directory (no config.toml); pass the --out directory of `cnnlab train`")
    cfg = load_config(run / rundir.CONFIG)
    factory.require_trust(cfg.model, trust_code, run / rundir.CONFIG)
    path = run / rundir.CHECKPOINTS / f"{which}.safetensors"
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint; has the run finished an epoch?")
    tensors, meta = checkpoint.load(path)
    saved = meta.get("spec")
    if saved != cfg.model.to_dict():
        raise CheckpointError(
            f"{path}: checkpoint architecture differs from {run / 'config.toml'}: "
            f"{_first_difference(saved, cfg.model.to_dict())}"
        )
    why = None if isinstance(cfg.model, ModelSpec) else factory.changed(cfg.model, meta.get("factory"))
    if why and note is not None:
        note(f"warning: {run}: {why}; the weights may not fit it")
    try:
        model = build_model(cfg.model, tuple(meta["in_shape"]), meta["num_classes"])
        state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        model.load_state_dict(state)
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"{path}: weights do not fit the architecture: {str(e).splitlines()[0]}") from None
    norm = meta.get("normalize")
    if norm:  # the model takes [0, 1] images like any run's; it normalises them as training did
        from cnnlab.model import Normalized

        model = Normalized(model, norm["mean"], norm["std"])
    return model.to(device).eval(), cfg, meta


def _first_difference(a, b, where="model") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{where}.{k}")
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where} has {len(a)} blocks in the checkpoint, {len(b)} in the config"
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{where}[{i}]")
    return f"{where} is {a!r} in the checkpoint, {b!r} in the config"


@torch.inference_mode()
def predict_arrays(model, images, in_shape, top_k: int = 3):
    """images (N, C, H, W) float in [0, 1] (or (N, H, W) for one channel) -> list of
    (predicted, [(class, prob), ...]) of a model whose input is in_shape (C, H, W)."""
    x = torch.as_tensor(images, dtype=torch.float32)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if tuple(x.shape[1:]) != tuple(in_shape):
        raise RunError(f"image shape {tuple(x.shape[1:])} does not match the model's input {tuple(in_shape)}")
    probs = model(x).softmax(1)
    out = []
    for p in probs:
        top = torch.topk(p, min(top_k, p.numel()))
        out.append((int(top.indices[0]), [(int(c), float(v)) for v, c in zip(top.values, top.indices)]))
    return out
