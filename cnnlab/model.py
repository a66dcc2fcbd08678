"""Build a torch network from a ModelSpec.

The layers are exactly spec.layer_table's rows, in order, so the summary, the graph and
the network cannot disagree. Dropout uses FastDropout, which draws its mask from random
bytes instead of bernoulli_ (about 9x cheaper on the CPU) while keeping the distribution
exact; see FastDropout. On the CPU, Net.forward routes max-pool and the first conv through
cnnlab.fastops (same values and gradients, cheaper kernels; docs/performance.md).
"""

from __future__ import annotations

import torch
from torch import nn

from cnnlab import fastops, native
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
        """The float mask: 1/(1 - p) for a kept unit, 0 for a dropped one."""
        return fastops.dropout_mask(shape, device, dtype, self.bits, self.threshold, self.scale,
                                    native_rng="native" in FAST_PATHS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.bits is None:
            return nn.functional.dropout(x, self.p, True)
        return x * self.mask(x.shape, x.device, x.dtype)


# The fast paths Net(fast=True) takes; bench/ablate.py switches them off one by one.
FAST_PATHS = {"pool", "conv1", "native", "cstep"}
FORWARD_SLICE = 256  # samples per C forward call: bounds the plan's buffers (~17 MB for the lab's nets)


class Net(nn.Sequential):
    """conv blocks -> flatten -> fc blocks -> output Linear. Input (B, C, H, W).

    With fast=True (the default) forward runs the same layers through cnnlab.fastops on the
    CPU: the same values and gradients (float rounding aside), cheaper kernels:
    - a 2x2 max-pool runs as pairwise maxima (fastops.max_pool2x2), and ReLU followed by it
      as pool-then-ReLU, which is exact: max and ReLU commute, the gradient reaches the same
      element, and the ReLU touches a quarter of the values;
    - the first conv while training (its input needs no gradient) runs as im2col + matmul,
      whose weight gradient is much cheaper than torch's CPU conv backward at these sizes.
    The modules, their parameters and state_dict keys are the plain nn.Sequential's either way.
    """

    def __init__(self, spec: ModelSpec, in_shape: tuple[int, int, int], num_classes: int,
                 fast_dropout: bool = True, fast: bool = True):
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
        self.fast = fast
        # the hidden blocks' modules, for the native path; a plain list, so nothing is
        # registered twice. _native_end: index of the first layer after them (the output Linear).
        self._blocks: list[fastops.BlockParts] = []
        self._native_end = 0
        self._step_plans: dict[tuple, fastops.TrainStep] = {}  # the C plans, per batch size and mode
        mods = [(j, m) for j, m in enumerate(self) if not isinstance(m, nn.Flatten)]
        relus: list[int] = []
        for row, (j, m) in zip(rows, mods):
            if row.block == "out":
                self._native_end = j
                break
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                self._blocks.append(fastops.BlockParts(m, out_hw=tuple(row.out_shape[1:]) or (1, 1)))
                relus.append(0)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                self._blocks[-1].bn = m
            elif isinstance(m, (FastDropout, nn.Dropout)):
                self._blocks[-1].drop = m
            elif isinstance(m, nn.MaxPool2d):
                self._blocks[-1].pool = m
            elif isinstance(m, nn.ReLU):
                relus[-1] += 1
            else:  # a layer kind the kernels do not know: never skip it, run torch's modules
                relus = [-1]
                break
        if any(n != 1 for n in relus):  # the kernels apply exactly one ReLU per block
            self._blocks = []
        # a C plan (fastops.TrainStep) covers the blocks and then the output Linear, nothing else
        self._can_plan = bool(self._blocks) and self._native_end == len(self) - 1 and isinstance(self[-1], nn.Linear)

    def __getstate__(self):
        """Copies and pickles leave the step plans behind: they hold raw pointers into this
        net's tensors (a copy builds its own on its first step)."""
        state = dict(super().__getstate__())
        state["_step_plans"] = {}
        return state

    def native_train_step(self, x: torch.Tensor, y: torch.Tensor):
        """Forward and backward of one training step on the native kernels without autograd
        (fastops.train_step): (loss, logits), gradients accumulated into .grad. None where
        that path does not apply (then use forward + loss.backward())."""
        lib = self._native_training_lib(x)
        if lib is None:
            return None
        plan = self._plan(x.shape[0], lib, backward=True)
        if plan is None:
            return fastops.train_step(self._blocks, self[-1], x, y, lib)
        try:
            return plan(x, y)
        except fastops.PlanMismatch:  # e.g. float64 parameters: torch's modules, and its errors
            return None

    def native_train_steps(self, opt, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, batch: int,
                           losses: torch.Tensor, preds: torch.Tensor) -> bool:
        """len(idx) // batch training steps of batch size `batch`, each followed by opt.step(),
        in one C call (fastops.TrainStep.run): step s trains on x[idx[s*batch:(s+1)*batch]]
        and writes losses[s] and that batch's predicted classes into preds. The same numbers
        as native_train_step, opt.step() and argmax step by step. False, having done
        nothing, where that path does not apply (then take the steps one by one)."""
        if not (isinstance(opt, fastops.LeanAdam) and batch > 0 and idx.numel() % batch == 0):
            return False
        lib = self._native_training_lib(x)
        plan = None if lib is None else self._plan(batch, lib, backward=True)
        return plan is not None and plan.run(opt, x, y, idx, losses, preds)

    def _native_training_lib(self, x: torch.Tensor):
        """The native library when a training step on images like x can run on it, else None."""
        if not (self.fast and self.training and torch.is_grad_enabled() and x.device.type == "cpu"
                and x.dtype == torch.float32 and "native" in FAST_PATHS and self._can_plan
                and x.dim() == 4 and tuple(x.shape[1:]) == self.in_shape):
            return None
        lib = native.library()
        if lib is None or not all(parts.native_ok(x) for parts in self._blocks):
            return None
        return lib

    def _plan(self, batch: int, lib, backward: bool):
        """The C plan (fastops.TrainStep) for this batch size and the modules' current modes,
        built on first use; None without torch's BLAS sgemm_ or with the "cstep" path off."""
        sgemm = native.sgemm()
        if sgemm is None or "cstep" not in FAST_PATHS:
            return None
        key = fastops.TrainStep.key_of(self._blocks, batch, backward)
        plan = self._step_plans.get(key)
        if plan is None:
            plan = self._step_plans[key] = fastops.TrainStep(self._blocks, self[-1], self.in_shape, batch, lib, sgemm,
                                                             backward)
        return plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fast or x.device.type != "cpu":
            return super().forward(x)
        layers = list(self)
        i, n = 0, len(layers)
        lib = native.library() if "native" in FAST_PATHS and x.dtype == torch.float32 else None
        if (lib is not None and self._blocks and x.dim() == 4 and tuple(x.shape[1:]) == self.in_shape
                and all(parts.native_ok(x) for parts in self._blocks)):
            if not torch.is_grad_enabled() and self._can_plan and x.shape[0] > 0:
                # no autograd wanted: the whole forward in one C call, per slice of the batch
                # when no block uses batch statistics or dropout (which see the whole batch)
                step = x.shape[0] if any(p.train_mode() for p in self._blocks) else FORWARD_SLICE
                chunks = []
                for s in range(0, x.shape[0], step):
                    xs = x[s : s + step]
                    plan = self._plan(xs.shape[0], lib, backward=False)
                    if plan is None:
                        break
                    try:
                        chunks.append(plan.forward(xs))
                    except fastops.PlanMismatch:
                        break
                else:
                    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)
            # channel-major all the way: conv activations [C][B][H][W], fc ones [F][B]
            h = x.transpose(0, 1)  # a view, already contiguous for one input channel
            for parts in self._blocks:
                if parts.fc and h.dim() == 4:  # flatten in NCHW feature order: [C*H*W][B]
                    h = fastops.flatten_cm(h)
                h = fastops.block(h, parts, lib)
            x = h.transpose(0, 1)  # (B, C, H, W) or (B, F), a view
            i = self._native_end if h.dim() == 2 else next(j for j, m in enumerate(layers) if isinstance(m, nn.Flatten))
        while i < n:
            m = layers[i]
            nxt = layers[i + 1] if i + 1 < n else None
            if isinstance(m, nn.Conv2d) and "conv1" in FAST_PATHS and _gemm_conv(m, x):
                x = fastops.conv2d_gemm(x, m.weight, m.bias, m.stride[0], m.padding[0])
            elif isinstance(m, nn.ReLU) and "pool" in FAST_PATHS and isinstance(nxt, nn.MaxPool2d) and fastops.is_pool2x2(nxt):
                x = torch.relu(fastops.max_pool2x2(x))  # = pool(relu(x)), values and gradients
                i += 1
            elif isinstance(m, nn.MaxPool2d) and "pool" in FAST_PATHS and fastops.is_pool2x2(m):
                x = fastops.max_pool2x2(x)
            else:
                x = m(x)
            i += 1
        return x


def _gemm_conv(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """im2col + matmul pays for a conv whose input needs no gradient (the first one) while
    training; its weight gradient is the costly part of torch's CPU conv at these sizes."""
    return (torch.is_grad_enabled() and conv.weight.requires_grad and not x.requires_grad
            and conv.groups == 1 and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple) and conv.padding[0] == conv.padding[1]
            and conv.stride[0] == conv.stride[1] and conv.kernel_size[0] == conv.kernel_size[1])


def _make(kind: str, args: dict, fast_dropout: bool) -> nn.Module:
    if kind == "Dropout":
        return FastDropout(args["p"]) if fast_dropout else nn.Dropout(args["p"])
    if kind == "ReLU":
        return nn.ReLU()
    return getattr(nn, kind)(**args)


class Normalized(nn.Module):
    """A trained network behind its run's input normalisation ([data] normalize): takes images
    in [0, 1] like every other run's model, subtracts the training split's per-channel mean
    and divides by its std, as training did to its tensors (the same float32 operations)."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def build_model(spec, in_shape, num_classes: int, fast_dropout: bool = True, fast: bool = True) -> nn.Module:
    """The network a [model] describes: the lab's Net for a ModelSpec, the user's module for a
    cnnlab.factory.FactorySpec (this imports and runs the factory's code)."""
    if isinstance(spec, ModelSpec):
        return Net(spec, tuple(in_shape), num_classes, fast_dropout, fast)
    from cnnlab import factory

    return factory.build(spec, in_shape, num_classes)
