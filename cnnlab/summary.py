"""The lab's model summary table (torchsummary's layout), computed from the spec alone.

Facts come from spec.layer_table; this module only formats them.
Sizes follow torchsummary: float32, forward/backward = 2 x all layer outputs, MB = 2**20 bytes.
"""

from __future__ import annotations

import math

from cnnlab.spec import Layer, ModelSpec, layer_table

RULE = "=" * 64


def summary_stats(rows: list[Layer], in_shape) -> dict:
    params = sum(r.params for r in rows)
    outputs = sum(math.prod(r.out_shape) for r in rows)
    mb = 4 / 2**20
    sizes = {
        "input_mb": math.prod(in_shape) * mb,
        "forward_backward_mb": 2 * outputs * mb,
        "params_mb": params * mb,
    }
    sizes["total_mb"] = sum(sizes.values())
    return {"total_params": params, "trainable_params": params, "non_trainable_params": 0, **sizes}


def format_summary(spec: ModelSpec, in_shape, num_classes: int) -> str:
    return format_layers(layer_table(spec, in_shape, num_classes), in_shape)


def format_layers(rows: list[Layer], in_shape) -> str:
    """The table for any list of layer rows (a spec's layer_table, or a module's, cnnlab.api.summary)."""
    stats = summary_stats(rows, in_shape)
    lines = [RULE, f"{'Layer (type)':<22}{'Output Shape':<26}{'Param #':>12}", RULE]
    for r in rows:
        shape = "[" + ", ".join(str(d) for d in (-1, *r.out_shape)) + "]"
        lines.append(f"{r.name:<22}{shape:<26}{r.params:>12,}")
    lines += [
        RULE,
        f"Total params: {stats['total_params']:,}",
        f"Trainable params: {stats['trainable_params']:,}",
        f"Non-trainable params: {stats['non_trainable_params']:,}",
        RULE,
        f"Input size (MB): {stats['input_mb']:.2f}",
        f"Forward/backward pass size (MB): {stats['forward_backward_mb']:.2f}",
        f"Params size (MB): {stats['params_mb']:.2f}",
        f"Estimated Total Size (MB): {stats['total_mb']:.2f}",
        RULE,
    ]
    return "\n".join(lines)
