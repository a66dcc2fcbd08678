"""Build a torch network from a ModelSpec.

The layers are exactly spec.layer_table's rows, in order, so the summary, the graph and
the network cannot disagree. Dropout uses FastDropout, which draws its mask from random
bytes instead of bernoulli_ (about 9x cheaper on the CPU) while keeping the distribution
exact; see FastDropout.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnlab.spec import ModelSpec, layer_table


def _mask_bits(p: float) -> int | None:
    """Bits per uniform draw that make P(keep) = 1 - p exact, or None when no 8/16-bit draw can."""
    for bits in (8, 16):
        if ((1.0 - p) * 2**bits).is_integer():
            return bits
    return None


class FastDropout(nn.Module):
    """Inverted dropout whose mask comes from random bytes.

    Each unit is kept independently with probability exactly 1 - p and scaled by 1/(1 - p),
    the same distribution as nn.Dropout, drawn from a different random stream: a uniform
    integer u in [0, 2**bits) keeps the unit when u < (1 - p) * 2**bits. That is exact when
    (1 - p) * 2**bits is an integer (p = 0.75, 0.5, 0.25, 0.1875, ...); for any other p we
    fall back to torch's own dropout rather than approximate.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)
        self.bits = _mask_bits(self.p)
        self.threshold = int((1.0 - self.p) * 2**self.bits) if self.bits else 0
        self.scale = 1.0 / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, mask={'%d-bit' % self.bits if self.bits else 'bernoulli'}"

    def mask(self, shape, device, dtype) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        nbytes = n * self.bits // 8
        # int64 random_ over the full 64-bit range gives 8 uniform bytes per draw.
        words = torch.empty((nbytes + 7) // 8, dtype=torch.int64, device=device).random_(-(2**63), None)
        raw = words.view(torch.uint8)[:nbytes]
        u = raw if self.bits == 8 else raw.view(torch.int16).to(torch.int32) & 0xFFFF
        keep = u < self.threshold
        return keep.view(shape).to(dtype).mul_(self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.bits is None:
            return nn.functional.dropout(x, self.p, True)
        return x * self.mask(x.shape, x.device, x.dtype)


class Net(nn.Sequential):
    """conv blocks -> flatten -> fc blocks -> output Linear. Input (B, C, H, W)."""

    def __init__(self, spec: ModelSpec, in_shape: tuple[int, int, int], num_classes: int, fast_dropout: bool = True):
        rows = layer_table(spec, in_shape, num_classes)
        layers: list[nn.Module] = []
        flattened = False
        for r in rows:
            if r.kind == "Linear" and not flattened:
                layers.append(nn.Flatten())  # (B, C, H, W) -> (B, C*H*W)
                flattened = True
            layers.append(_make(r.kind, r.args, fast_dropout))
        super().__init__(*layers)
        self.spec, self.in_shape, self.num_classes = spec, tuple(in_shape), num_classes


def _make(kind: str, args: dict, fast_dropout: bool) -> nn.Module:
    if kind == "Dropout":
        return FastDropout(args["p"]) if fast_dropout else nn.Dropout(args["p"])
    if kind == "ReLU":
        return nn.ReLU()
    return getattr(nn, kind)(**args)


def build_model(spec: ModelSpec, in_shape, num_classes: int, fast_dropout: bool = True) -> Net:
    return Net(spec, tuple(in_shape), num_classes, fast_dropout)
