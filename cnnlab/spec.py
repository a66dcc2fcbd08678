"""ModelSpec: the single, typed source of a network.

A spec is a list of conv blocks and a list of hidden fc blocks; the output Linear layer
(to the number of classes) is implied. Layer order follows the lab:

    conv block:  Conv2d -> [BatchNorm2d] -> [Dropout] -> ReLU -> [MaxPool2d]
    fc block:    Linear -> [BatchNorm1d] -> [Dropout] -> ReLU
    output:      Linear(num_classes)          (softmax lives in the loss)

The flatten size is inferred from the input shape, never typed by hand. `layer_table`
walks the spec once, checks every shape, and is what both the model builder and the
summary use, so they cannot disagree.

This module imports no torch: specs are checked before any training starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cnnlab.errors import SpecError


@dataclass(frozen=True)
class ConvBlock:
    out_channels: int
    kernel: int = 3
    stride: int = 1
    padding: int = 0
    bn: bool = False
    dropout: float = 0.0  # drop probability (PyTorch's meaning), not keep probability
    pool: int = 0  # MaxPool2d window = stride; 0 means no pooling


@dataclass(frozen=True)
class FcBlock:
    width: int
    bn: bool = False
    dropout: float = 0.0


@dataclass(frozen=True)
class ModelSpec:
    conv: tuple[ConvBlock, ...] = ()
    fc: tuple[FcBlock, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "conv": [dataclasses.asdict(b) for b in self.conv],
            "fc": [dataclasses.asdict(b) for b in self.fc],
        }


@dataclass(frozen=True)
class Layer:
    """One row of the summary: `Conv2d-1  [-1, 6, 28, 28]  60`."""

    index: int  # 1-based, as torchsummary numbers rows
    kind: str  # Conv2d, BatchNorm2d, Dropout, ReLU, MaxPool2d, Linear, BatchNorm1d
    block: str  # conv1, fc2, out
    out_shape: tuple[int, ...]  # without the batch dimension
    params: int
    args: dict[str, Any] = field(default_factory=dict)  # constructor arguments

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.index}"


# ---------------------------------------------------------------------------- parsing

TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def _check_type(where: str, key: str, value: Any, typ: type, error: type) -> Any:
    # bool is a subclass of int: refuse `kernel = true` and `bn = 1` alike; an int is a fine float.
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise error(f"{where}: `{key}` must be {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


def dataclass_from_table(cls, data: Any, where: str, error: type = SpecError):
    """Build dataclass `cls` from a TOML table: unknown keys, wrong types and missing keys are errors."""
    if not isinstance(data, dict):
        raise error(f"{where}: expected a table, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise error(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _check_type(where, name, data[name], TYPES[f.type], error)
        elif f.default is dataclasses.MISSING:
            raise error(f"{where}: missing required key `{name}`")
    return cls(**kwargs)


def _block_from_dict(cls, data: Any, where: str):
    block = dataclass_from_table(cls, data, where)
    _check_values(block, where)
    return block


def _check_values(block, where: str) -> None:
    def positive(name):
        if getattr(block, name) < 1:
            raise SpecError(f"{where}: `{name}` must be >= 1, got {getattr(block, name)}")

    if isinstance(block, ConvBlock):
        for name in ("out_channels", "kernel", "stride"):
            positive(name)
        if block.padding < 0 or block.pool < 0:
            raise SpecError(f"{where}: `padding` and `pool` must be >= 0")
    else:
        positive("width")
    if not 0.0 <= block.dropout < 1.0:
        raise SpecError(
            f"{where}: `dropout` is the drop probability and must be in [0, 1), got {block.dropout}"
        )


def spec_from_dict(data: Any, where: str = "model") -> ModelSpec:
    """Build a spec from a parsed TOML table; unknown keys and wrong types are errors."""
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a table with `conv` and `fc` lists")
    unknown = sorted(set(data) - {"conv", "fc"})
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: conv, fc")
    out = {}
    for key, cls in (("conv", ConvBlock), ("fc", FcBlock)):
        items = data.get(key, [])
        if not isinstance(items, list):
            raise SpecError(f"{where}: `{key}` must be a list of tables ([[{where}.{key}]])")
        out[key] = tuple(_block_from_dict(cls, b, f"{where}.{key}[{i}]") for i, b in enumerate(items))
    return ModelSpec(**out)


def load_spec_toml(path) -> ModelSpec:
    """Read a model spec from a TOML file: either top-level conv/fc lists or a [model] table."""
    from cnnlab.fsutil import read_toml

    data = read_toml(path, SpecError, "model spec TOML file")
    if "model" in data and set(data) <= {"model"}:
        data = data["model"]
    return spec_from_dict(data, where=str(path))


def layer_table(spec: ModelSpec, in_shape: tuple[int, int, int], num_classes: int) -> list[Layer]:
    """Walk the spec, checking that every layer fits the feature map it gets.

    in_shape is (C, H, W). Raises SpecError naming the block and the shapes when a
    feature map shrinks below a kernel or pool window.
    """
    c, h, w = in_shape
    rows: list[Layer] = []

    def add(kind, block, shape, params=0, **args):
        rows.append(Layer(len(rows) + 1, kind, block, tuple(shape), params, args))

    for i, b in enumerate(spec.conv, 1):
        name = f"conv{i}"
        hp, wp = h + 2 * b.padding, w + 2 * b.padding
        if hp < b.kernel or wp < b.kernel:
            raise SpecError(
                f"{name}: input feature map {c}x{h}x{w} (padded to {hp}x{wp}) is smaller than the "
                f"{b.kernel}x{b.kernel} kernel; remove a conv block, add padding or drop a pool earlier"
            )
        h, w = (hp - b.kernel) // b.stride + 1, (wp - b.kernel) // b.stride + 1
        add("Conv2d", name, (b.out_channels, h, w), b.out_channels * (c * b.kernel * b.kernel + 1),
            in_channels=c, out_channels=b.out_channels, kernel_size=b.kernel, stride=b.stride,
            padding=b.padding)
        c = b.out_channels
        if b.bn:
            add("BatchNorm2d", name, (c, h, w), 2 * c, num_features=c)
        if b.dropout > 0:
            add("Dropout", name, (c, h, w), p=b.dropout)
        add("ReLU", name, (c, h, w))
        if b.pool:
            if h < b.pool or w < b.pool:
                raise SpecError(
                    f"{name}: feature map {c}x{h}x{w} after the conv is smaller than the "
                    f"{b.pool}x{b.pool} max-pool window; remove the pool or a conv block"
                )
            h, w = h // b.pool, w // b.pool
            add("MaxPool2d", name, (c, h, w), kernel_size=b.pool, stride=b.pool)

    features = c * h * w  # the inferred flatten size
    for i, b in enumerate(spec.fc, 1):
        name = f"fc{i}"
        add("Linear", name, (b.width,), b.width * (features + 1), in_features=features, out_features=b.width)
        features = b.width
        if b.bn:
            add("BatchNorm1d", name, (b.width,), 2 * b.width, num_features=b.width)
        if b.dropout > 0:
            add("Dropout", name, (b.width,), p=b.dropout)
        add("ReLU", name, (b.width,))
    if num_classes < 2:
        raise SpecError(f"the output layer needs at least 2 classes, the data has {num_classes}")
    add("Linear", "out", (num_classes,), num_classes * (features + 1), in_features=features,
        out_features=num_classes)
    return rows


def count_params(spec: ModelSpec, in_shape, num_classes) -> int:
    return sum(layer.params for layer in layer_table(spec, in_shape, num_classes))


# ---------------------------------------------------------------------------- presets
# The lab's networks, exactly as its code builds them (../shared/seed/lab2-report.txt).
# Its dropout p = 0.75 is kept: PyTorch reads it as the *drop* probability.

def _lab_conv(bn: bool, depth: int) -> tuple[ConvBlock, ...]:
    blocks = (
        ConvBlock(6, kernel=3, padding=1, bn=bn, dropout=0.75, pool=2),
        ConvBlock(12, kernel=3, padding=0, bn=bn, dropout=0.75, pool=2),
        ConvBlock(24, kernel=3, padding=0, bn=bn, dropout=0.75, pool=0),
    )
    return blocks[:depth]


PRESETS: dict[str, ModelSpec] = {
    "lab2-3c3f-bn": ModelSpec(_lab_conv(True, 3), (FcBlock(128, bn=True), FcBlock(48, bn=True))),
    "lab2-3c3f": ModelSpec(_lab_conv(False, 3), (FcBlock(128), FcBlock(48))),
    "lab2-2c3f": ModelSpec(_lab_conv(False, 2), (FcBlock(128), FcBlock(48, bn=True))),
    "lab2-2c2f": ModelSpec(_lab_conv(False, 2), (FcBlock(128, bn=True),)),
}


def preset(name: str) -> ModelSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise SpecError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}") from None
