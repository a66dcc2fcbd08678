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

Nothing here changes what is computed; tests/test_speed_equivalence.py checks every
function against torch's reference (values and gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def random_bytes(n: int, device) -> torch.Tensor:
    """n uniform random bytes (uint8) from torch's generator: int64 random_ over the full
    64-bit range gives 8 independent uniform bytes per draw, ~15x cheaper than bernoulli_."""
    words = torch.empty((n + 7) // 8, dtype=torch.int64, device=device).random_(-(2**63), None)
    return words.view(torch.uint8)[:n]


def dropout_mask(shape, device, dtype, bits: int, threshold: int, scale: float) -> torch.Tensor:
    """Float mask: scale where a uniform `bits`-bit integer u < threshold, else 0.

    The mask is ((threshold - u) * scale) clamped to [0, scale]: u and threshold are
    integers below 2**16, exact in float32, so it is exactly scale when u < threshold and
    exactly 0 otherwise, computed without bool tensors.
    """
    n = 1
    for d in shape:
        n *= d
    raw = random_bytes(n * bits // 8, device)
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
