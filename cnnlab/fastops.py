"""CPU-fast building blocks for model.Net: same math as torch's modules, cheaper kernels.

At the lab's sizes (batch 50, 6-24 channels) torch's CPU kernels for max-pool, batch-norm
and the first conv's weight gradient spend most of their time in overhead, not arithmetic.
Each function here computes the same values (float rounding aside) with a few large,
vectorised tensor ops instead (measurements: docs/performance.md):

- conv2d_gemm: convolution as one im2col copy + a batched matmul; the weight gradient is a
  batched matmul too. The input gradient, when needed, is torch's own.
- batch_norm_train: training-mode batch norm from per-channel sums, with a hand-written
  backward; running statistics are updated exactly as nn.BatchNorm does.
- max_pool2x2: 2x2/stride-2 max-pool from pairwise maxima. The gradient goes to the first
  maximum of each window in row-major order, the element torch's max_pool2d picks.
- dropout_mask: the float mask (0 or 1/(1-p)) from random bytes, with no bool tensors
  (bool ops are unvectorised on the CPU).

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


# ---------------------------------------------------------------------------- batch norm


class _BatchNormTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        c = x.shape[1]
        dims = (0,) if x.dim() == 2 else (0, 2, 3)
        shape = (1, c) + (1,) * (x.dim() - 2)
        n = x.numel() // c
        mean = x.sum(dims) / n
        xc = x - mean.view(shape)
        var = (xc * xc).sum(dims) / n  # biased, as batch norm normalises with it
        invstd = torch.rsqrt(var + eps)
        a = invstd * weight
        y = torch.addcmul(bias.view(shape), xc, a.view(shape))
        ctx.save_for_backward(xc, invstd, a)
        ctx.dims, ctx.shape, ctx.n = dims, shape, n
        return y, mean, var

    @staticmethod
    def backward(ctx, gy, _gmean, _gvar):
        xc, invstd, a = ctx.saved_tensors
        dims, shape, n = ctx.dims, ctx.shape, ctx.n
        gbeta = gy.sum(dims)
        gxc = (gy * xc).sum(dims)
        ggamma = gxc * invstd
        gx = None
        if ctx.needs_input_grad[0]:
            # d/dx of (x - mean) * invstd * gamma + beta with batch mean and variance:
            # a * (gy - mean(gy) - xc * invstd^2 * mean(gy * xc))
            k1 = a * invstd * invstd * gxc / n
            k0 = a * gbeta / n
            gx = gy * a.view(shape) - torch.addcmul(k0.view(shape), xc, k1.view(shape))
        return gx, ggamma, gbeta, None


def batch_norm_train(x, bn: torch.nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """bn(x) in training mode (batch statistics), updating bn's running statistics as torch does."""
    y, mean, var = _BatchNormTrain.apply(x, bn.weight, bn.bias, bn.eps)
    if bn.track_running_stats:
        n = x.numel() // x.shape[1]
        m = bn.momentum
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            bn.running_mean.mul_(1 - m).add_(mean, alpha=m)
            bn.running_var.mul_(1 - m).add_(var * (n / max(n - 1, 1)), alpha=m)
    return y


def can_batch_norm_fast(bn) -> bool:
    return bn.affine and bn.momentum is not None


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
    m = u.neg_().add_(threshold).mul_(scale).clamp_(0.0, scale)
    return m.view(shape).to(dtype)
