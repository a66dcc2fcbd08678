"""Load a trained run's model back (safely) for eval and predict."""

from __future__ import annotations

from pathlib import Path

import torch

from cnnlab.errors import CheckpointError, RunError


def load_run_model(run_dir, which: str = "last", device: str = "cpu"):
    """(model in eval mode, RunConfig, checkpoint meta) from RUN_DIR/checkpoints/{which}.safetensors.

    The checkpoint must match the architecture in RUN_DIR/config.toml; a mismatch is refused
    with a message naming the difference.
    """
    from cnnlab import checkpoint
    from cnnlab.config import load_config
    from cnnlab.model import build_model
    from cnnlab.spec import spec_from_dict

    run = Path(run_dir)
    if not (run / "config.toml").is_file():
        raise RunError(f"{run}: not a run directory (no config.toml); pass the --out directory of `cnnlab train`")
    cfg = load_config(run / "config.toml")
    path = run / "checkpoints" / f"{which}.safetensors"
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint; has the run finished an epoch?")
    tensors, meta = checkpoint.load(path)
    saved = meta.get("spec")
    if saved != cfg.model.to_dict():
        raise CheckpointError(
            f"{path}: checkpoint architecture differs from {run / 'config.toml'}: "
            f"{_first_difference(saved, cfg.model.to_dict())}"
        )
    try:
        spec = spec_from_dict(saved, "checkpoint spec")
        model = build_model(spec, tuple(meta["in_shape"]), meta["num_classes"])
        state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        model.load_state_dict(state)
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"{path}: weights do not fit the architecture: {str(e).splitlines()[0]}") from None
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
def predict_arrays(model, images_hw, top_k: int = 3):
    """images (N, H, W) float in [0, 1] -> list of (predicted, [(class, prob), ...])."""
    x = torch.as_tensor(images_hw, dtype=torch.float32).unsqueeze(1)
    expected = tuple(model.in_shape[1:])
    if tuple(x.shape[2:]) != expected:
        raise RunError(f"image size {tuple(x.shape[2:])} does not match the model's input {expected}")
    probs = model(x).softmax(1)
    out = []
    for p in probs:
        top = torch.topk(p, min(top_k, p.numel()))
        out.append((int(top.indices[0]), [(int(c), float(v)) for v, c in zip(top.values, top.indices)]))
    return out
