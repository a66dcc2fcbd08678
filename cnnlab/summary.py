"""Model summary tables (torchsummary's layout): the lab's from the spec alone, any module's from hooks.

- format_summary(spec, in_shape, num_classes): the lab's table from spec.layer_table (the report's
  and the golden file's text; unchanged).
- module_layers(module, in_shape): rows of any nn.Module, from forward hooks on one zero input.
- summarize(model, in_shape, num_classes): (text, rows, stats) for a ModelSpec, a cnnlab Net or
  any nn.Module; what `cnnlab summary`, cnnlab.api.summary and the trainer's summary.txt use.

Sizes follow torchsummary: float32, forward/backward = 2 x all layer outputs, MB = 2**20 bytes.
Parameters follow torchinfo: a row's params are its module's own (buffers such as BatchNorm's
running stats are not parameters); trainable ones have requires_grad; a module run twice counts
once. Mult-adds follow torchinfo's "Total mult-adds" for one sample (layer_mult_adds).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

from cnnlab.spec import Layer, ModelSpec, layer_table

RULE = "=" * 64


@dataclasses.dataclass(frozen=True)
class ModuleLayer(Layer):
    """A row of any module's summary (module_layers): a Layer (block = the module's qualified
    name, "model" for the root) plus what the hooks saw."""

    trainable: int = 0  # parameters of this row with requires_grad
    mult_adds: int = 0  # for one sample, torchinfo's definition (layer_mult_adds)
    repeat: bool = False  # a further call of a module already listed: its parameters count once


def layer_mult_adds(kind: str, params: int, out_shape) -> int:
    """Mult-adds of one leaf layer for one sample, as torchinfo 1.8 counts them: a layer whose
    class name contains "Conv" does (weight + bias) x output positions (kernel, groups, stride
    and padding enter through the weight's size and the output's); any other layer with a weight
    or bias (Linear, BatchNorm) its parameter count; layers without parameters none."""
    if not params:
        return 0
    return params * math.prod(out_shape[1:]) if "Conv" in kind else params


def _row_mult_adds(r: Layer) -> int:
    return r.mult_adds if isinstance(r, ModuleLayer) else layer_mult_adds(r.kind, r.params, r.out_shape)


def summary_stats(rows: list[Layer], in_shape) -> dict:
    """total_params, trainable_params, non_trainable_params, total_mult_adds (one sample) and
    torchsummary's sizes in MB: input_mb, forward_backward_mb, params_mb, total_mb."""
    counted = [r for r in rows if not getattr(r, "repeat", False)]
    params = sum(r.params for r in counted)
    trainable = sum(r.trainable if isinstance(r, ModuleLayer) else r.params for r in counted)
    outputs = sum(math.prod(r.out_shape) for r in rows)
    mb = 4 / 2**20
    sizes = {
        "input_mb": math.prod(in_shape) * mb,
        "forward_backward_mb": 2 * outputs * mb,
        "params_mb": params * mb,
    }
    sizes["total_mb"] = sum(sizes.values())
    return {"total_params": params, "trainable_params": trainable, "non_trainable_params": params - trainable,
            "total_mult_adds": sum(_row_mult_adds(r) for r in rows), **sizes}


def format_summary(spec: ModelSpec, in_shape, num_classes: int) -> str:
    return format_layers(layer_table(spec, in_shape, num_classes), in_shape)


def format_layers(rows: list[Layer], in_shape, *, mult_adds: bool = False) -> str:
    """The table for any list of layer rows (a spec's layer_table, or module_layers'). With
    mult_adds=True a line "Total mult-adds: N" follows "Non-trainable params" (the CLI's and
    cnnlab.api.summary's text; the report's and the golden file's have none)."""
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
    ]
    if mult_adds:
        lines.append(f"Total mult-adds: {stats['total_mult_adds']:,}")
    lines += [
        RULE,
        f"Input size (MB): {stats['input_mb']:.2f}",
        f"Forward/backward pass size (MB): {stats['forward_backward_mb']:.2f}",
        f"Params size (MB): {stats['params_mb']:.2f}",
        f"Estimated Total Size (MB): {stats['total_mb']:.2f}",
        RULE,
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- any nn.Module

def is_lab_net(model) -> bool:
    """A cnnlab.model.Net (its spec describes it), without importing cnnlab.model."""
    return all(hasattr(model, a) for a in ("spec", "in_shape", "num_classes", "forward"))


@contextlib.contextmanager
def quiet_forward(module):
    """Eval mode (BatchNorm uses, never updates, its running stats; no dropout) and no autograd
    for the block; every submodule's training flag is restored afterwards, each its own. A lab
    Net runs its plain torch modules (fast=False) so that hooks and tracing see its layers."""
    import torch

    modes = [(m, m.training) for m in module.modules()]
    fast = getattr(module, "fast", None) if is_lab_net(module) else None
    try:
        module.eval()
        if fast is not None:
            module.fast = False
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training
        if fast is not None:
            module.fast = fast


def zero_input(module, in_shape, batch: int = 1):
    """A zero batch (batch, *in_shape) with the dtype and on the device of the module's first
    parameter (or buffer); float32 on the CPU for a module with neither."""
    import itertools

    import torch

    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    return torch.zeros((batch, *in_shape), dtype=dtype, device=first.device if first is not None else "cpu")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def module_layers(module, in_shape) -> list[ModuleLayer]:
    """Rows of any nn.Module: one per leaf module (and per module holding parameters of its
    own) in the order they return on one zero input of batch 1, as torchsummary does; a module
    called twice gets two rows (the second with repeat=True). Runs in eval mode under no_grad
    (quiet_forward): parameters and buffers stay as they were. SpecError when the module does
    not run on that input."""
    import torch

    from cnnlab.errors import SpecError

    rows: list[ModuleLayer] = []
    seen: set[int] = set()

    def hook(mod, inputs, output, name):
        out = output[0] if isinstance(output, (tuple, list)) and output else output
        shape = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else ()
        own = list(mod.named_parameters(recurse=False))
        params = sum(p.numel() for _, p in own)
        trainable = sum(p.numel() for _, p in own if p.requires_grad)
        macs = 0
        if not any(True for _ in mod.children()):  # torchinfo counts leaf layers only
            for pname, p in own:
                if pname in ("weight", "bias"):
                    macs += layer_mult_adds(type(mod).__name__, p.numel(), shape)
                elif "weight" in pname or "bias" in pname:  # RNNs' weight_ih_l0, ...
                    macs += math.prod(shape[:1]) * p.numel()
        rows.append(ModuleLayer(len(rows) + 1, type(mod).__name__, name, shape, params,
                                trainable=trainable, mult_adds=macs, repeat=id(mod) in seen))
        seen.add(id(mod))

    hooks = [mod.register_forward_hook(functools.partial(hook, name=name or "model"))
             for name, mod in module.named_modules()
             if not any(True for _ in mod.children()) or any(True for _ in mod.parameters(recurse=False))]
    try:
        with quiet_forward(module):
            module(zero_input(module, in_shape))
    except Exception as e:  # noqa: BLE001 - any failure of the user's module is a shape or spec problem
        raise SpecError(f"summary: the module does not run on an input of shape (1, {', '.join(map(str, in_shape))}): "
                        f"{_first_line(e)}") from e
    finally:
        for h in hooks:
            h.remove()
    return rows


def summarize(model, in_shape=None, num_classes: int | None = None, *,
              mult_adds: bool = True) -> tuple[str, list[Layer], dict]:
    """(text, rows, stats) of a model.

    model: a ModelSpec (its layer_table for in_shape, num_classes; default 10 classes), a
    cnnlab Net (its own spec, input and classes: the lab's table, the same as the spec's), or
    any nn.Module (module_layers; in_shape required). text: the table, with a "Total mult-adds"
    line when mult_adds (format_layers); rows: spec.Layer rows (ModuleLayer for a module);
    stats: summary_stats (total_params, trainable_params, non_trainable_params,
    total_mult_adds for one sample, sizes in MB)."""
    from cnnlab.errors import SpecError

    if isinstance(model, ModelSpec):
        if in_shape is None:
            raise SpecError("summary: give the input shape (C, H, W)")
        rows = layer_table(model, tuple(in_shape), 10 if num_classes is None else num_classes)
    elif is_lab_net(model):
        shape = tuple(model.in_shape)
        if in_shape is not None and tuple(in_shape) != shape:
            raise SpecError(f"this network was built for input {shape}, not {tuple(in_shape)}")
        if num_classes is not None and num_classes != model.num_classes:
            raise SpecError(f"this network was built for {model.num_classes} classes, not {num_classes}")
        in_shape, rows = shape, layer_table(model.spec, shape, model.num_classes)
    elif callable(getattr(model, "named_modules", None)) and callable(getattr(model, "forward", None)):
        if in_shape is None:
            raise SpecError("summary: give the module's input shape (C, H, W)")
        rows = module_layers(model, tuple(in_shape))
    else:
        raise SpecError(f"summary: expected a ModelSpec or a torch nn.Module, got {type(model).__name__}")
    in_shape = tuple(in_shape)
    return format_layers(rows, in_shape, mult_adds=mult_adds), rows, summary_stats(rows, in_shape)
