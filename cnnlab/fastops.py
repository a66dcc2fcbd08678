"""CPU-fast building blocks for model.Net: same math as torch's modules, cheaper kernels.

At the lab's sizes (batch 50, 6-24 channels) torch's CPU kernels for max-pool and for the
first conv's weight gradient are slow for the arithmetic they do. Each function here
computes the same values (float rounding aside) with a few large, vectorised tensor ops
instead (measurements, and what was tried and dropped: docs/performance.md):

- conv2d_gemm: convolution as one im2col copy + a batched matmul; the weight gradient is a
  batched matmul too (torch's CPU conv is slowest there). The input gradient, when needed,
  is torch's own.
- max_pool2x2: 2x2/stride-2 max-pool from pairwise maxima. The gradient goes to the first
  maximum of each window in row-major order, the element torch's max_pool2d picks.
- dropout_mask: the float mask (0 or 1/(1-p)) from random bytes, with no bool tensors
  (bool ops are unvectorised on the CPU).
- tune_allocator: keep freed memory in the process instead of returning it to the OS, so
  the per-step activations stop costing page faults.
- TrainStep: with the native kernels, a whole training step in one C call (cl_train_step);
  TrainStep.run: a run of steps, each with its batch gather, Adam step (LeanAdam's, in C)
  and predictions, in one C call (cl_train_steps), which the training loop uses.
- block / _Block and train_step: the same C kernels called one block at a time from Python
  (with autograd, or by hand): kept as the path for a torch whose BLAS exports no sgemm_,
  which the one-call plan (TrainStep) needs; they hold no block math of their own.

Nothing here changes what is computed; tests/test_speed_equivalence.py checks every
function against torch's reference (values and gradients).
"""

from __future__ import annotations

import ctypes
import math

import torch
import torch.nn.functional as F

from cnnlab import native

# ---------------------------------------------------------------------------- convolution


def _im2col(x: torch.Tensor, k: int, stride: int, padding: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C*k*k, Ho*Wo), the columns F.unfold gives, in one strided copy."""
    if padding:
        x = F.pad(x, (padding, padding, padding, padding))
    else:
        x = x.contiguous()
    b, c, h, w = x.shape
    ho, wo = (h - k) // stride + 1, (w - k) // stride + 1
    sb, sc, sh, sw = x.stride()
    view = x.as_strided((b, c, k, k, ho, wo), (sb, sc, sh, sw, sh * stride, sw * stride))
    return view.reshape(b, c * k * k, ho * wo)


class _ConvGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        o, c, k, _ = weight.shape
        cols = _im2col(x, k, stride, padding)  # (B, C*k*k, L)
        w = weight.view(1, o, -1).expand(cols.shape[0], -1, -1)
        if bias is None:
            out = torch.bmm(w, cols)  # (B, O, L)
        else:
            out = torch.baddbmm(bias.view(1, o, 1), w, cols)
        ho = (x.shape[2] + 2 * padding - k) // stride + 1
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        ctx.save_for_backward(x if ctx.needs_input_grad[0] else None, weight, cols)
        return out.view(x.shape[0], o, ho, -1)

    @staticmethod
    def backward(ctx, grad):
        x, weight, cols = ctx.saved_tensors
        b, o = grad.shape[:2]
        g = grad.reshape(b, o, -1)  # (B, O, L)
        gx = gw = gb = None
        if ctx.needs_input_grad[1]:
            gw = torch.bmm(g, cols.transpose(1, 2)).sum(0).view_as(weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum((0, 2))
        if ctx.needs_input_grad[0]:
            s, p = ctx.stride, ctx.padding
            gx = torch.ops.aten.convolution_backward(
                grad.contiguous(), x, weight, None, [s, s], [p, p], [1, 1], False, [0, 0], 1,
                [True, False, False])[0]
        return gx, gw, gb, None, None


def conv2d_gemm(x, weight, bias, stride: int = 1, padding: int = 0) -> torch.Tensor:
    """F.conv2d for square kernels, groups 1, dilation 1, via im2col + matmul."""
    return _ConvGemm.apply(x, weight, bias, stride, padding)


# ---------------------------------------------------------------------------- max-pool


def _corners(x):
    """The four (B, C, Ho, Wo) views of each 2x2 window, in row-major order."""
    ho, wo = x.shape[2] // 2, x.shape[3] // 2
    x = x[:, :, : 2 * ho, : 2 * wo]
    return x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]


class _MaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        a, b, c, d = _corners(x)
        r0, r1 = torch.maximum(a, b), torch.maximum(c, d)  # row maxima
        out = torch.maximum(r0, r1)
        ctx.save_for_backward(x, r0, r1, out)
        return out

    @staticmethod
    def backward(ctx, g):
        x, r0, r1, out = ctx.saved_tensors
        a, _, c, _ = _corners(x)
        # the first maximum in row-major order: row 0 if it holds the maximum, then the
        # first column of that row holding the row's maximum (torch's max_pool2d's choice)
        g0 = g * (r0 == out)
        g1 = g - g0
        ga = g0 * (a == r0)
        gc = g1 * (c == r1)
        gx = torch.zeros_like(x) if (x.shape[2] % 2 or x.shape[3] % 2) else torch.empty_like(x)
        va, vb, vc, vd = _corners(gx)
        va.copy_(ga)
        vb.copy_(g0 - ga)
        vc.copy_(gc)
        vd.copy_(g1 - gc)
        return gx


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """F.max_pool2d(x, 2) (stride 2, no padding, floor mode) for (B, C, H, W)."""
    return _MaxPool2x2.apply(x)


def is_pool2x2(pool: torch.nn.MaxPool2d) -> bool:
    def two(v):
        return v == 2 or v == (2, 2)

    def val(v, want):
        return v == want or v == (want, want)

    return (two(pool.kernel_size) and two(pool.stride) and val(pool.padding, 0) and val(pool.dilation, 1)
            and not pool.ceil_mode and not pool.return_indices)


# ---------------------------------------------------------------------------- dropout


def random_bytes(n: int, device, native_rng: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """n uniform random bytes (uint8) drawn under torch's generator (or `generator`).

    On the CPU with cnnlab's native kernels (and native_rng): xoshiro256++ in C, seeded by
    one 64-bit draw from torch's generator, ~5x cheaper than the alternative. Otherwise int64
    random_ over the full 64-bit range, 8 independent uniform bytes per draw, itself ~15x
    cheaper than bernoulli_. Either way torch.manual_seed makes the bytes reproducible."""
    if native_rng and torch.device(device).type == "cpu":
        lib = native.library()
        if lib is not None:
            seed = _draw_seed(generator)
            out = torch.empty(n, dtype=torch.uint8)
            lib.cl_random_bytes(out.data_ptr(), n, seed)
            return out
    words = torch.empty((n + 7) // 8, dtype=torch.int64, device=device).random_(-(2**63), None, generator=generator)
    return words.view(torch.uint8)[:n]


def _draw_seed(generator: torch.Generator | None = None) -> int:
    """One 64-bit seed for cl_random_bytes, drawn from torch's generator (or `generator`)."""
    return int(torch.empty((), dtype=torch.int64).random_(-(2**63), None, generator=generator)) % 2**64


def dropout_mask(shape, device, dtype, bits: int, threshold: int, scale: float, native_rng: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Float mask: scale where a uniform `bits`-bit integer u < threshold, else 0.

    The mask is ((threshold - u) * scale) clamped to [0, scale]: u and threshold are
    integers below 2**16, exact in float32, so it is exactly scale when u < threshold and
    exactly 0 otherwise, computed without bool tensors.
    """
    n = 1
    for d in shape:
        n *= d
    raw = random_bytes(n * bits // 8, device, native_rng, generator)
    if bits == 8:
        u = raw.to(torch.float32)
    else:
        u = (raw.view(torch.int16).to(torch.int32) & 0xFFFF).to(torch.float32)
    m = torch.rsub(u, threshold).mul_(scale).clamp_(0.0, scale)  # (threshold - u) * scale
    return m.view(shape).to(dtype)


# ---------------------------------------------------------------------------- allocator

_TUNED = False


def tune_allocator() -> bool:
    """glibc malloc returns large freed blocks to the OS (mmap/trim), so every training step
    page-faults its activations back in: ~1.5 ms of system time per lab2 step. Raising the
    mmap and trim thresholds keeps them in the process. Process-wide, numerics untouched;
    a no-op where there is no glibc. Returns whether it applied."""
    global _TUNED
    if _TUNED:
        return True
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    _TUNED = bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, (1 << 31) - 1))
    return _TUNED


# ---------------------------------------------------------------------------- fused conv block


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class BlockParts:
    """A hidden block's modules, as model.Net holds them: Conv2d or Linear, then optional
    BatchNorm, FastDropout and (conv only) MaxPool2d; the ReLU is always there."""

    def __init__(self, layer, bn=None, drop=None, pool=None, out_hw=(1, 1)):
        self.conv, self.bn, self.drop, self.pool = layer, bn, drop, pool
        self.fc = isinstance(layer, torch.nn.Linear)
        self.out_hw = tuple(out_hw)  # the layer's output size, from the layer table ((1, 1) for fc)

    def train_mode(self) -> bool:
        """Whether the block's output depends on the rest of the batch or on random draws."""
        return (self.bn is not None and self.bn.training) or (self.drop is not None and self.drop.training
                                                                and self.drop.p > 0)

    def native_ok(self, x: torch.Tensor) -> bool:
        """Whether `block` can run this block, in the current mode, for the net's input x (NCHW)."""
        c = self.conv
        if not self.fc and not (c.groups == 1 and c.dilation == (1, 1) and c.padding_mode == "zeros" and isinstance(c.padding, tuple)
                and c.kernel_size[0] == c.kernel_size[1] and c.stride[0] == c.stride[1]
                and c.padding[0] == c.padding[1]):
            return False
        if self.pool is not None and not (self.pool.kernel_size == self.pool.stride and self.pool.padding == 0
                                          and self.pool.dilation == 1 and not self.pool.ceil_mode
                                          and _int(self.pool.kernel_size) ** 2 < 255):
            return False  # the kernels keep a window's winner in one byte, 255 meaning "none"
        if self.drop is not None and self.drop.training and self.drop.p > 0 and getattr(self.drop, "bits", None) is None:
            return False  # a p without an exact 8/16-bit threshold: torch's dropout
        bn = self.bn
        if bn is not None:
            if not (bn.affine and bn.track_running_stats and bn.momentum is not None):
                return False
            if not bn.training and torch.is_grad_enabled() and (bn.weight.requires_grad or x.requires_grad):
                return False  # backward through running statistics: torch's
            if bn.training and x.shape[0] * self.out_hw[0] * self.out_hw[1] < 2:
                return False  # torch raises its own error for one value per channel
        return True


def _int(v) -> int:
    return v[0] if isinstance(v, tuple) else v


def _conv_geometry(x, parts):
    """(C, B, H, W, k, s, p, Ho, Wo) of a block's input; an fc block is a 1x1 "conv" on [F][B]."""
    if parts.fc:
        return x.shape[0], x.shape[1], 1, 1, 1, 1, 0, 1, 1
    C, B, H, W = x.shape
    conv = parts.conv
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    return C, B, H, W, k, s, p, (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1


def _block_forward(x, weight, bias, gamma, beta, parts, mask, lib, grad: bool):
    """One block forward on the native kernels: (output, what backward needs or None)."""
    bn, drop, pool = parts.bn, parts.drop, parts.pool
    C, B, H, W, k, s, p, Ho, Wo = geo = _conv_geometry(x, parts)
    O = weight.shape[0]
    pk = _int(pool.kernel_size) if pool is not None else 0
    N = B * Ho * Wo
    if parts.fc:
        cols = x  # [F][B]
    else:
        cols = torch.empty(C * k * k, N)
        lib.cl_im2col(x.data_ptr(), cols.data_ptr(), C, B, H, W, k, s, p, Ho, Wo)
    z = torch.mm(weight.view(O, -1), cols)
    Hp, Wp = (Ho // pk, Wo // pk) if pk else (Ho, Wo)
    out = torch.empty((O, B, Hp, Wp) if not parts.fc else (O, B))
    arg = torch.empty(out.shape, dtype=torch.uint8) if grad else None
    if mask is not None:  # FastDropout's draws are in NCHW order; the kernels read them channel-major
        mask = mask.view(B, O, -1).transpose(0, 1).contiguous()
    batch_stats = bn is not None and bn.training
    invstd = torch.empty(O) if bn is not None else None
    tmp = torch.empty(Ho * Wo)
    bits, thr, scale = (drop.bits, drop.threshold, drop.scale) if mask is not None else (8, 0, 0.0)
    lib.cl_block_forward(
        z.data_ptr(), O, B, Ho, Wo, _ptr(bias), _ptr(gamma), _ptr(beta),
        _ptr(bn.running_mean) if bn is not None else None, _ptr(bn.running_var) if bn is not None else None,
        int(batch_stats), float(bn.momentum) if bn is not None else 0.0, float(bn.eps) if bn is not None else 0.0,
        _ptr(invstd), _ptr(mask), bits, thr, scale, pk, out.data_ptr(), _ptr(arg), tmp.data_ptr())
    if batch_stats:
        bn.num_batches_tracked.add_(1)
    if not grad:
        return out, None
    return out, (cols, weight, z, arg, mask, gamma, invstd, geo, O, pk, bits, thr, scale, bias is not None,
                 parts.fc, lib)


def _block_backward(saved, gout, need):
    """Gradients (input, weight, bias, gamma, beta) of one block from its output's gradient;
    need: which of them to compute."""
    cols, weight, zhat, arg, mask, gamma, invstd, geo, O, pk, bits, thr, scale, has_bias, fc, lib = saved
    C, B, H, W, k, s, p, Ho, Wo = geo
    gout = gout.contiguous()
    gz = torch.empty(O, B * Ho * Wo)
    dbias = torch.empty(O) if has_bias and need[2] else None
    dgamma = torch.empty(O) if gamma is not None and need[3] else None
    dbeta = torch.empty(O) if gamma is not None and need[4] else None
    lib.cl_block_backward(gout.data_ptr(), arg.data_ptr(), zhat.data_ptr(), gz.data_ptr(), O, B, Ho, Wo,
                          _ptr(mask), bits, thr, scale, pk, _ptr(gamma), _ptr(invstd), _ptr(dgamma),
                          _ptr(dbeta), _ptr(dbias))
    dw = torch.mm(gz, cols.t()).view_as(weight) if need[1] else None
    dx = None
    if need[0]:
        dcols = torch.mm(weight.view(O, -1).t(), gz)
        if fc:
            dx = dcols
        else:
            dx = torch.empty(C, B, H, W)
            lib.cl_col2im(dcols.data_ptr(), dx.data_ptr(), C, B, H, W, k, s, p, Ho, Wo)
    return dx, dw, dbias, dgamma, dbeta


class _Block(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, gamma, beta, parts, mask, lib):
        out, ctx.saved = _block_forward(x, weight, bias, gamma, beta, parts, mask, lib, any(ctx.needs_input_grad[:5]))
        return out

    @staticmethod
    def backward(ctx, gout):
        return (*_block_backward(ctx.saved, gout, ctx.needs_input_grad), None, None, None)


def _mask_for(x, parts):
    """The block's dropout mask bytes (FastDropout's draw: same bytes, same order), or None."""
    drop = parts.drop
    if drop is None or not drop.training or drop.p == 0:
        return None
    _, B, _, _, _, _, _, Ho, Wo = _conv_geometry(x, parts)
    return random_bytes(B * parts.conv.weight.shape[0] * Ho * Wo * drop.bits // 8, x.device)


def _bn_params(parts):
    bn = parts.bn
    return (bn.weight, bn.bias) if bn is not None else (None, None)


def block(x: torch.Tensor, parts: BlockParts, lib) -> torch.Tensor:
    """One hidden block with the native kernels (cnnlab/native/kernels.c), channel-major:
    a conv block (conv, [batch norm], [dropout], ReLU, [max-pool]) maps [C][B][H][W] to
    [O][B][Ho'][Wo']; an fc block (Linear, [batch norm], [dropout], ReLU) maps [F][B] to [O][B].
    float32 on the CPU, through autograd.

    The dropout mask takes the random bytes FastDropout.mask would take, in the same order and
    indexed by the unit's NCHW position, so the torch path and this one use the same mask."""
    x = x.contiguous()
    return _Block.apply(x, parts.conv.weight, parts.conv.bias, *_bn_params(parts), parts, _mask_for(x, parts), lib)


def flatten_cm(h: torch.Tensor) -> torch.Tensor:
    """Channel-major conv activations [C][B][H][W] -> fc input [C*H*W][B], in NCHW flatten order."""
    c, b = h.shape[:2]
    return h.reshape(c, b, -1).transpose(1, 2).reshape(-1, b)


def train_step(blocks: list[BlockParts], head: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor, lib):
    """One training step's forward and backward without autograd: the hidden blocks on the
    native kernels, then the output layer and the mean cross-entropy, their gradients by hand
    ((softmax - onehot) / B, what torch's cross_entropy backward computes). Gradients are
    accumulated into each parameter's .grad, as loss.backward() does. Returns (loss, logits),
    both detached.

    The same kernels and mask draws as the autograd path (model.Net.forward), so the same
    numbers up to float rounding (tests/test_native.py); what it saves is autograd's per-op
    bookkeeping, about a third of a step at the lab's sizes."""
    with torch.no_grad():
        h = x.transpose(0, 1)
        saved = []
        for parts in blocks:
            flat = parts.fc and h.dim() == 4
            if flat:
                shape4 = h.shape
                h = flatten_cm(h)
            h = h.contiguous()
            params = (parts.conv.weight, parts.conv.bias, *_bn_params(parts))
            h, sv = _block_forward(h, *params, parts, _mask_for(h, parts), lib, True)
            saved.append((parts, params, sv, shape4 if flat else None))
        shape4 = h.shape if h.dim() == 4 else None
        feats = flatten_cm(h) if shape4 is not None else h  # [F][B]
        logits = torch.addmm(head.bias, feats.t(), head.weight.t()) if head.bias is not None else feats.t() @ head.weight.t()
        loss = F.cross_entropy(logits, y)
        g = torch.softmax(logits, 1)
        g[torch.arange(len(y)), y] -= 1.0
        g /= len(y)
        _set_grad(head.weight, torch.mm(g.t(), feats.t()))
        if head.bias is not None:
            _set_grad(head.bias, g.sum(0))
        gh = torch.mm(head.weight.t(), g.t())  # [F][B]
        if shape4 is not None:
            gh = _unflatten_cm(gh, shape4)
        for i in range(len(saved) - 1, -1, -1):
            parts, params, sv, flat_shape = saved[i]
            need = (i > 0,) + tuple(t is not None and t.requires_grad for t in params)  # no input gradient for x
            dx, *grads = _block_backward(sv, gh, need)
            for t, gt in zip(params, grads):
                if gt is not None:
                    _set_grad(t, gt)
            gh = _unflatten_cm(dx, flat_shape) if flat_shape is not None and dx is not None else dx
    return loss, logits


def _unflatten_cm(g: torch.Tensor, shape4) -> torch.Tensor:
    """The gradient of flatten_cm: [C*H*W][B] -> [C][B][H][W]."""
    c, b, hh, ww = shape4
    return g.view(c, hh * ww, b).transpose(1, 2).reshape(c, b, hh, ww)


def _set_grad(t: torch.Tensor, g: torch.Tensor) -> None:
    if t.requires_grad:
        t.grad = g.view_as(t) if t.grad is None else t.grad.add_(g.view_as(t))


# ---------------------------------------------------------------------------- the step in one C call


_MAX_TAPS = 64  # kernels.c's MAX_TAPS
DIRECT_CONV1 = True  # bench/ablate.py switches it off


class PlanMismatch(Exception):
    """A tensor is not what a TrainStep plan was built for (the caller takes torch's path)."""


class TrainStep:
    """train_step in one C call (kernels.c's cl_train_step), for one batch size: the same
    kernels, mask draws and math, with the matrix products in torch's own BLAS sgemm_
    (native.sgemm()). The plan holds the layer geometry, the hyperparameters it was built
    with (key()) and every activation buffer; parameters, buffers and gradients are passed
    per step, so they may be replaced between steps. Gradients accumulate into .grad as in
    train_step, with one difference: a .grad that is None gets the plan's buffer for that
    parameter, the same tensor every step (as if zero_grad(set_to_none=False) had kept it),
    not a new one, which saved a tenth of a step in allocations. The loss and logits are new
    tensors each step.

    With backward=False the plan only runs the forward pass (forward(); kernels.c's
    cl_forward), for evaluation without autograd, and holds no gradient buffers.

    threads: the C step's threads (the batch's images shared out between them, kernels.c);
    default native.threads() when the plan is built: torch.get_num_threads(), unless
    native.set_threads() said otherwise, and 1 without OpenMP. A thread count gives the same
    numbers every time; other counts add the batch's sums in other parts, so they round
    differently (docs/performance.md, issue 18)."""

    def __init__(self, blocks: list[BlockParts], head: torch.nn.Linear, in_shape, batch: int, lib, sgemm: int,
                 backward: bool = True, threads: int | None = None):
        self.blocks, self.head, self.batch, self.lib, self.sgemm = blocks, head, batch, lib, sgemm
        self.backward = backward
        self.threads = max(1, threads) if threads else native.threads()
        B = batch
        bw = self._buf if backward else (lambda n, dtype=None: None)  # what only backward needs
        C, H, W = in_shape
        shape = (C, H, W)  # the previous output, per sample: (C, H, W), or (F,) after an fc block
        self._keep = []  # the workspace tensors, alive as long as the plan
        self.xcm = self._buf(C * H * W * B)
        cblocks = []
        tmp_n = 1
        for parts in blocks:
            d = dict.fromkeys(native.BLOCK_INTS, 0)
            bufs = {}
            O = parts.conv.weight.shape[0]
            d["fc"], d["O"] = int(parts.fc), O
            if parts.fc:
                if len(shape) == 3:
                    d["flatten"], d["flat_hw"] = shape[0], shape[1] * shape[2]
                d["C"] = shape[0] if len(shape) == 1 else shape[0] * shape[1] * shape[2]
                d["H"] = d["W"] = d["k"] = d["s"] = d["Ho"] = d["Wo"] = 1
                if d["flatten"]:
                    bufs["feats"] = self._buf(d["C"] * B)
                    bufs["dcols"] = bw(d["C"] * B)
                shape = (O,)
            else:
                c = parts.conv
                k, st, pd = c.kernel_size[0], c.stride[0], c.padding[0]
                Ho, Wo = (shape[1] + 2 * pd - k) // st + 1, (shape[2] + 2 * pd - k) // st + 1
                d.update(C=shape[0], H=shape[1], W=shape[2], k=k, s=st, p=pd, Ho=Ho, Wo=Wo)
                d["pool"] = pk = _int(parts.pool.kernel_size) if parts.pool is not None else 0
                # the first block on a one-channel image, stride 1: a direct convolution (no
                # im2col); it needs no input gradient either
                d["direct"] = int(DIRECT_CONV1 and not cblocks and shape[0] == 1 and st == 1 and k * k <= _MAX_TAPS)
                if not d["direct"]:
                    bufs["cols"] = self._buf(shape[0] * k * k * B * Ho * Wo)
                if cblocks:
                    bufs["dcols"] = bw(shape[0] * k * k * B * Ho * Wo)
                shape = (O, Ho // pk, Wo // pk) if pk else (O, Ho, Wo)
            n_out = O * B * (shape[1] * shape[2] if len(shape) == 3 else 1)
            N = B * d["Ho"] * d["Wo"]
            tmp_n = max(tmp_n, d["Ho"] * d["Wo"])
            bufs.update(z=self._buf(O * N), gz=bw(O * N), out=self._buf(n_out), gout=bw(n_out),
                        arg=bw(n_out, torch.uint8), invstd=self._buf(O))
            drop = parts.drop
            if drop is not None and drop.training and drop.p > 0:
                d.update(mask_bits=drop.bits, threshold=drop.threshold)
                bufs["mask_raw"] = self._buf(O * N * drop.bits // 8, torch.uint8)
                bufs["mask"] = self._buf(O * N * drop.bits // 8, torch.uint8)
            cb = native.CBlock(**d, **{k: _ptr(v) for k, v in bufs.items()})
            if d["mask_bits"]:
                cb.scale = drop.scale
            bn = parts.bn
            if bn is not None:
                cb.batch_stats, cb.momentum, cb.eps = int(bn.training), float(bn.momentum), float(bn.eps)
            cblocks.append(cb)
        self.n_drops = sum(1 for cb in cblocks if cb.mask_bits)
        self.tmp = self._buf(tmp_n)
        self.F, self.K = head.in_features, head.out_features
        last = shape
        self.hfeats = self._buf(self.F * B) if len(last) == 3 else None
        self.hgrad = bw(self.F * B) if len(last) == 3 else None
        self.probs = bw(B * self.K)
        self.cblocks = (native.CBlock * len(cblocks))(*cblocks)
        self._sizes = [(cb.O, cb.O * cb.C * cb.k * cb.k) for cb in cblocks]  # per block: O, the weight's size
        self._grads: dict[torch.Tensor, torch.Tensor] = {}  # parameter -> its gradient buffer

    def _buf(self, n: int, dtype=torch.float32) -> torch.Tensor:
        t = torch.empty(n, dtype=dtype)
        self._keep.append(t)
        return t

    @staticmethod
    def key_of(blocks: list[BlockParts], batch: int, backward: bool = True) -> tuple:
        """What the plan bakes in besides shapes: forward only or not, the batch size, the
        threads (native.threads(), now), batch norm's mode and constants, dropout's mode and
        threshold."""
        key = [backward, batch, native.threads()]
        for parts in blocks:
            bn, drop = parts.bn, parts.drop
            key.append((bn.training, bn.momentum, bn.eps) if bn is not None else None)
            key.append((drop.training, drop.p, drop.bits, drop.threshold, drop.scale) if drop is not None else None)
        return tuple(key)

    def _pointers(self, grad_of) -> list:
        """kernels.c's ptrs: P_COUNT per block, then the head's; grad_of(t): the address to
        write t's gradient to, or None. Raises PlanMismatch when a tensor is not what the
        plan was built for (float32, contiguous, on the CPU, of its size): after
        model.double(), say, the C code must not read it."""

        def f32(t, n):
            if not (_plain(t) and t.numel() == n):
                raise PlanMismatch(t)
            return t.data_ptr()

        ptrs = []
        for parts, (O, wn) in zip(self.blocks, self._sizes):
            c, bn = parts.conv, parts.bn
            w, b = c.weight, c.bias
            row = [f32(w, wn), None if b is None else f32(b, O)]
            if bn is None:
                row += [None] * 5
            else:
                nbt = bn.num_batches_tracked
                if nbt is not None and not (nbt.dtype is torch.int64 and nbt.numel() == 1):
                    raise PlanMismatch(nbt)
                row += [f32(bn.weight, O), f32(bn.bias, O), f32(bn.running_mean, O), f32(bn.running_var, O),
                        _ptr(nbt)]
            ptrs += row + [grad_of(w), grad_of(b)]
            ptrs += [grad_of(bn.weight), grad_of(bn.bias)] if bn is not None else [None, None]
        head = self.head
        return ptrs + [f32(head.weight, self.K * self.F), None if head.bias is None else f32(head.bias, self.K),
                       grad_of(head.weight), grad_of(head.bias)]

    def _seeds(self):
        return (ctypes.c_uint64 * max(self.n_drops, 1))(*[_draw_seed() for _ in range(self.n_drops)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits [B][K] of x [B][C][H][W] (float32), the forward pass alone: dropout and
        batch statistics as the plan's modes were when it was built (key_of)."""
        x = x.contiguous()
        seeds = self._seeds()
        ptrs = self._pointers(lambda t: None)
        logits = torch.empty(self.batch, self.K)
        rc = self.lib.cl_forward(len(self.blocks), self.cblocks, (ctypes.c_void_p * len(ptrs))(*ptrs), seeds,
                                 x.data_ptr(), self.batch, self.K, self.F, self.xcm.data_ptr(), _ptr(self.hfeats),
                                 self.tmp.data_ptr(), logits.data_ptr(), self.sgemm, self.threads)
        if rc:
            raise MemoryError("out of memory in the native forward pass")
        return logits

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        """(loss, logits) of one step on the batch x [B][C][H][W] (float32), y [B]; gradients
        accumulated into each parameter's .grad, BatchNorm's running statistics updated."""
        x = x.contiguous()
        y = y.to(torch.int64).contiguous()
        seeds = self._seeds()
        fresh, added = [], []

        def grad_of(t):
            if t is None or not t.requires_grad:
                return None
            if t.grad is None:  # the plan's own buffer, the same every step
                g = self._grad_buffer(t)
                fresh.append((t, g))
            else:  # accumulate: into a new tensor, added below
                g = torch.empty(t.shape)
                added.append((t, g))
            return g.data_ptr()

        ptrs = self._pointers(grad_of)
        logits = torch.empty(self.batch, self.K)
        loss = torch.empty(())
        rc = self.lib.cl_train_step(len(self.blocks), self.cblocks, (ctypes.c_void_p * len(ptrs))(*ptrs), seeds,
                                    x.data_ptr(), y.data_ptr(), self.batch, self.K, self.F, self.xcm.data_ptr(),
                                    _ptr(self.hfeats), _ptr(self.hgrad), self.probs.data_ptr(),
                                    self.tmp.data_ptr(), logits.data_ptr(), loss.data_ptr(), self.sgemm, self.threads)
        if rc == -1:
            raise MemoryError("out of memory in the native training step")
        if rc:
            raise IndexError(f"Target {int(y[rc - 1])} is out of bounds.")  # torch's cross_entropy message
        for t, g in fresh:
            t.grad = g
        for t, g in added:
            t.grad.add_(g)
        return loss, logits

    def _grad_buffer(self, p: torch.Tensor) -> torch.Tensor:
        """The plan's gradient buffer for parameter p, the same tensor every step."""
        g = self._grads.get(p)
        if g is None or g.shape != p.shape:
            g = self._grads[p] = torch.empty(p.shape)
        return g

    def run(self, opt: "LeanAdam", x_all: torch.Tensor, y_all: torch.Tensor, idx: torch.Tensor,
            losses: torch.Tensor, preds: torch.Tensor) -> bool:
        """len(idx) // batch training steps, each followed by opt's step, in one C call
        (kernels.c's cl_train_steps): what the training loop does per batch, without Python
        between the steps. Step s trains on x_all[idx[s*B:(s+1)*B]] and writes losses[s] (the
        mean loss) and preds[s*B:(s+1)*B] (the predicted classes). The same numbers as this
        plan's __call__, then opt.step(), then torch.argmax, step by step: the same dropout
        seeds, drawn from torch's generator in the same order, and the same kernels.

        Returns False, having done nothing, where that does not apply: opt's step is not its
        plain C step (a hook, options, no state yet), a parameter is frozen or not what the
        plan was built for, or a tensor is not a contiguous CPU one of the right dtype."""
        B = self.batch
        count = idx.numel() // B
        if not (count and idx.numel() == count * B and _plain(idx, torch.int64) and _plain(y_all, torch.int64)
                and _plain(x_all, torch.float32) and _plain(losses, torch.float32) and losses.numel() >= count
                and _plain(preds, torch.int64) and preds.numel() >= count * B and x_all.dim() == 4):
            return False
        params = [p for group in opt.param_groups for p in group["params"]]
        mine = self._parameters()
        if len(params) != len(mine) or {id(p) for p in params} != {id(p) for p in mine} \
                or not all(p.requires_grad for p in params):
            return False  # opt must step exactly the net's parameters, none frozen
        grads = [self._grad_buffer(p) for p in params]
        try:
            ptrs = self._pointers(lambda t: None if t is None else self._grads[t].data_ptr())
        except PlanMismatch:
            return False
        args = opt.c_args(grads)
        if args is None:
            return False
        seeds = torch.empty(count * self.n_drops, dtype=torch.int64).random_(-(2**63), None)  # as _draw_seed
        xb, yb = torch.empty((B,) + tuple(x_all.shape[1:])), torch.empty(B, dtype=torch.int64)
        logits = torch.empty(B, self.K)
        rc = self.lib.cl_train_steps(len(self.blocks), self.cblocks, (ctypes.c_void_p * len(ptrs))(*ptrs),
                                     seeds.data_ptr(), self.n_drops, count, x_all.data_ptr(), y_all.data_ptr(),
                                     len(x_all), math.prod(x_all.shape[1:]), idx.data_ptr(), B, self.K, self.F,
                                     xb.data_ptr(), yb.data_ptr(), self.xcm.data_ptr(), _ptr(self.hfeats),
                                     _ptr(self.hgrad), self.probs.data_ptr(), self.tmp.data_ptr(), logits.data_ptr(),
                                     losses.data_ptr(), preds.data_ptr(), ctypes.byref(args), self.sgemm,
                                     self.threads)
        for p, g in zip(params, grads):
            p.grad = g
        if rc == -1:
            raise MemoryError("out of memory in the native training step")
        if rc == -2:
            raise IndexError(f"a batch index is outside the {len(x_all)} samples")
        if rc:
            raise IndexError(f"Target {int(y_all[idx[rc - 1]])} is out of bounds.")  # torch's cross_entropy message
        return True

    def _parameters(self) -> list[torch.Tensor]:
        """Every parameter the plan reads: each block's, then the head's."""
        out = []
        for parts in self.blocks:
            c, bn = parts.conv, parts.bn
            out += [t for t in (c.weight, c.bias) if t is not None]
            if bn is not None:
                out += [t for t in (bn.weight, bn.bias) if t is not None]
        return out + [t for t in (self.head.weight, self.head.bias) if t is not None]


# ---------------------------------------------------------------------------- optimizer


class LeanAdam(torch.optim.Adam):
    """torch.optim.Adam(fused=True) with a shorter step: the same arithmetic as torch's fused
    CPU kernel, operation for operation, so the same numbers bit for bit where that kernel
    runs 8 floats per vector (AVX2; tests/test_native.py and test_speed_equivalence.py
    check), without the generic step's per-call Python (grouping by device and dtype,
    option checks, a dispatch per list), which cost more than the arithmetic at the lab's
    60k parameters. On the CPU with the native kernels, the whole step is one C call
    (kernels.c's cl_adam); otherwise torch's own fused kernel is called directly. Anything
    outside the plain case (several groups, amsgrad, weight decay, a closure, the first step
    that creates the state, a missing gradient) goes through torch's own step. State and
    state_dict are torch's."""

    def __init__(self, params, lr: float = 1e-3):
        super().__init__(params, lr=lr, fused=True)

    def _plain_group(self) -> dict | None:
        """The one parameter group, when the fast step applies to it and no hook is registered."""
        groups = self.param_groups
        g = groups[0]
        if (len(groups) != 1 or g["amsgrad"] or g["maximize"] or g["weight_decay"] or g["capturable"]
                or g["differentiable"] or g.get("decoupled_weight_decay") or not g["fused"]
                or self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks or _global_step_hooks()):
            return None
        return g

    def c_args(self, grads: list | None = None) -> "native.AdamArgs | None":
        """kernels.c's cl_adam_args for a step with these gradients (default: each .grad): None
        unless the fast step applies, every state exists, and every tensor is a plain CPU
        float32 one with the native kernels built."""
        g = self._plain_group()
        lib = native.library()
        if g is None or lib is None:
            return None
        params = g["params"]
        grads = [p.grad for p in params] if grads is None else grads
        states = [self.state.get(p) for p in params]
        if any(not s or gr is None for s, gr in zip(states, grads)):
            return None
        if not all(_plain(p) and _plain(gr) for p, gr in zip(params, grads)):  # 0.3 us each
            return None
        n = len(params)
        arrays = [(ctypes.c_void_p * n)(*[t.data_ptr() for t in ts]) for ts in
                  (params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                   [s["step"] for s in states])]
        beta1, beta2 = g["betas"]
        arrays.append((ctypes.c_int64 * n)(*[p.numel() for p in params]))
        args = native.AdamArgs(n, *[ctypes.addressof(a) for a in arrays], float(g["lr"]), float(beta1), float(beta2),
                         float(g["eps"]), _adam_vector_width())
        args.keep = arrays  # the arrays live as long as the struct that points into them
        return args

    def step(self, closure=None):
        g = self._plain_group() if closure is None else None
        if g is None:
            return self._torch_step(closure)
        params = g["params"]
        if any(p.grad is None for p in params):
            return self._torch_step()
        if any(p not in self.state for p in params):  # the first step creates the state
            if not all(_plain(p) and _plain(p.grad) for p in params):
                return self._torch_step()
            self._init_state(params)
        states = [self.state[p] for p in params]
        args = self.c_args()
        if args is not None:
            native.library().cl_adam(args.nt, args.params, args.grads, args.exp_avgs, args.exp_avg_sqs, args.steps,
                                     args.sizes, args.lr, args.beta1, args.beta2, args.eps, args.vec)
            return None
        steps = [s["step"] for s in states]
        beta1, beta2 = g["betas"]
        with torch.no_grad():
            torch._foreach_add_(steps, 1)
            torch._fused_adam_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                               [s["exp_avg_sq"] for s in states], [], steps, amsgrad=False, lr=g["lr"],
                               beta1=beta1, beta2=beta2, weight_decay=0.0, eps=g["eps"], maximize=False,
                               grad_scale=None, found_inf=None)
        return None

    def _init_state(self, params) -> None:
        """Each parameter's state as torch's fused Adam creates it on its first step."""
        for p in params:
            if not self.state.get(p):
                self.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                 "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                 "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}

    # torch marks these methods "never compile" with a wrapper that imports torch._dynamo
    # (about 2.4 s, once per process) on its first call; cnnlab never compiles, so it calls
    # the methods themselves. With the first step above, a CPU run never imports torch._dynamo.
    def add_param_group(self, param_group: dict) -> None:
        _undecorated(torch.optim.Optimizer.add_param_group)(self, param_group)

    def state_dict(self):
        return _undecorated(torch.optim.Optimizer.state_dict)(self)

    def load_state_dict(self, state_dict) -> None:
        _undecorated(torch.optim.Optimizer.load_state_dict)(self, state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's zero_grad without its profiler range (0.1 ms a step at the lab's sizes)."""
        if not set_to_none:
            return _undecorated(torch.optim.Optimizer.zero_grad)(self, False)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    # Optimizer.__init__ wraps a subclass's step in a profiler range and the hook calls
    # (torch.optim.Optimizer.profile_hook_step), unless it is marked as wrapped already. That
    # wrapper cost ~0.15 ms a step, more than the arithmetic; the fast path above runs only
    # when no hook is registered, and everything else goes through torch's step, wrapped.
    step.hooked = True

    def _torch_step(self, closure=None):
        step = torch.optim.Adam.step
        if not getattr(step, "hooked", False):  # no Adam made yet in this process: not wrapped
            step = torch.optim.Optimizer.profile_hook_step(step)
        return step(self, closure)


def _undecorated(method):
    """An Optimizer method without torch's "never compile" wrapper (torch._disable_dynamo)."""
    return getattr(method, "__wrapped__", method)


def _global_step_hooks() -> bool:
    from torch.optim import optimizer

    return bool(getattr(optimizer, "_global_optimizer_pre_hooks", None)
                or getattr(optimizer, "_global_optimizer_post_hooks", None))


def _plain(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> bool:
    """A contiguous CPU tensor of dtype: what the C code may read as raw memory."""
    return t.is_cpu and t.dtype is dtype and t.is_contiguous()


_ADAM_VEC: int | None = None


def _adam_vector_width() -> int:
    """Floats per vector in torch's fused Adam kernel on this CPU (where its scalar tail begins)."""
    global _ADAM_VEC
    if _ADAM_VEC is None:
        _ADAM_VEC = 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8
    return _ADAM_VEC
