"""The native kernels (cnnlab/native) compute what torch's modules compute.

- Net on the native path against Net(fast=False) (plain torch modules) from the same
  weights and, before each forward, the same seed (so both draw the same dropout masks):
  training output, loss, every gradient, the BatchNorm buffers after the step, the eval
  output, and a few Adam steps; for the presets and for odd specs.
- Max-pool ties go to the element torch's max_pool2d picks; NaN is never lost.
- Fallbacks: CNNLAB_NATIVE=0, no compiler, a failing compiler, a dropout p without an exact
  8/16-bit threshold; the build cache is reused by a second process.
- Two native runs with the same seed are bit-identical.

Every test that needs the kernels builds them into a temporary CNNLAB_NATIVE_DIR (never the
user's cache) and is skipped, with native.describe()'s reason, when they cannot be built.
A spy on native.library() counts the kernels a net calls: proof that the native path really
ran (or really did not).
"""

from __future__ import annotations

import copy
import ctypes
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab import model, native
from cnnlab.model import FastDropout, build_model
from cnnlab.spec import PRESETS, ConvBlock, FcBlock, ModelSpec

ROOT = Path(__file__).resolve().parents[1]
ALL_PATHS = {"pool", "conv1", "native", "cstep"}
TORCH_PATHS = {"pool", "conv1"}
P16 = 1 - 52416 / 65536  # 0.2001953125: exact with a 16-bit draw, not with an 8-bit one


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("native")


def _reset(monkeypatch):
    """Forget the loaded library, so that library() looks at the environment again
    (monkeypatch puts the module's cache back after the test)."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_status", None)
    monkeypatch.setattr(native, "_dot_wgrad", native._dot_wgrad)  # put back after the test


@pytest.fixture
def lib(native_dir, monkeypatch):
    """The native kernels, built once per module into a temporary dir; FAST_PATHS all on.
    The environment's CC and CNNLAB_NATIVE are respected (CNNLAB_NATIVE=0 skips these tests)."""
    monkeypatch.setenv("CNNLAB_NATIVE_DIR", str(native_dir))
    monkeypatch.setattr(model, "FAST_PATHS", set(ALL_PATHS))
    _reset(monkeypatch)
    got = native.library()
    if got is None:
        pytest.skip(f"native kernels cannot be built here: {native.describe()}")
    return got


class _CountingLib:
    """The loaded library, counting each kernel call by name."""

    def __init__(self, lib, calls: list):
        self._lib, self._calls = lib, calls

    def __getattr__(self, name):
        fn = getattr(self._lib, name)
        if not callable(fn):
            return fn

        def counted(*args):
            self._calls.append(name)
            if name in ("cl_train_step", "cl_forward"):  # one call runs args[0] blocks
                self._calls.extend([f"cl_block_forward (in {name})"] * args[0])
            return fn(*args)

        return counted


@pytest.fixture
def spy(monkeypatch):
    """The names of the native kernels called, in order (so a test knows whether the native
    path really ran); wraps whatever native.library() returns."""
    calls: list[str] = []
    real = native.library

    def library():
        got = real()
        return None if got is None else _CountingLib(got, calls)

    monkeypatch.setattr(native, "library", library)
    return calls


def native_blocks(spy) -> int:
    """How many blocks ran on the native path (one by one, or inside cl_train_step)."""
    return sum(1 for name in spy if name.startswith("cl_block_forward"))


def n_blocks(spec) -> int:
    """The blocks a pass must run natively: conv and fc alike (an fc-only net has no conv
    block, and `>= len(spec.conv)` would be `>= 0`, true whatever ran)."""
    return len(spec.conv) + len(spec.fc)


def block_kernels(spy) -> list[str]:
    """The kernels called, less the random-byte generator: with the kernels loaded, every
    dropout mask on the CPU draws its bytes there, on the torch path too (so that both paths
    use the same mask)."""
    return [name for name in spy if name != "cl_random_bytes"]


# ---------------------------------------------------------------------------- helpers


def assert_close(a, b, what, rtol=1e-4, atol=1e-5):
    """|a - b| <= atol + rtol * max|b| everywhere; b is torch's reference."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, what
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), what
    err = (a - b).abs().max().item() if a.numel() else 0.0
    tol = atol + rtol * (b.abs().max().item() if b.numel() else 0.0)
    assert err <= tol, f"{what}: max |native - torch| = {err:.3g} > {tol:.3g}"


def noise_biases(net: nn.Sequential) -> dict[str, str]:
    """{bias: weight} of each Conv2d/Linear directly followed by a BatchNorm. The BN subtracts
    the batch mean, so such a bias's true gradient is 0 and what either path computes is
    float noise."""
    kids = list(net.named_children())
    out = {}
    for (name, m), (_, nxt) in zip(kids, kids[1:]):
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None and isinstance(nxt, nn.modules.batchnorm._BatchNorm):
            out[f"{name}.bias"] = f"{name}.weight"
    return out


def pair(spec, in_shape, classes=10, seed=0):
    """(torch's plain modules, the fast Net) with the same weights."""
    torch.manual_seed(seed)
    ref = build_model(spec, in_shape, classes, fast=False)
    net = build_model(spec, in_shape, classes)
    net.load_state_dict(ref.state_dict())
    assert not ref.fast and net.fast
    return ref, net


def train_step(net, x, y, seed):
    torch.manual_seed(seed)  # the dropout masks
    out = net(x)
    loss = F.cross_entropy(out, y)
    loss.backward()
    return out, loss


def data(in_shape, batch, classes=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((batch, *in_shape), generator=g), torch.randint(0, classes, (batch,), generator=g)


# ---------------------------------------------------------------------------- 1. equivalence

ODD = {
    # stride 2, padding 2, kernel 5, BN, 8-bit dropout 0.5; then kernel 2, dropout 0.25, no pool
    "k5-s2-p2-bn": (ModelSpec((ConvBlock(5, kernel=5, stride=2, padding=2, bn=True, dropout=0.5, pool=2),
                               ConvBlock(7, kernel=2, dropout=0.25)), (FcBlock(16, dropout=0.5),)),
                    (1, 19, 19), 50),
    # 3 input channels, pool 3 with a remainder (17 -> 5), 8-bit 0.75; then BN + pool 2
    "rgb-pool3": (ModelSpec((ConvBlock(6, kernel=3, padding=1, dropout=0.75, pool=3),
                             ConvBlock(8, kernel=2, bn=True, pool=2)), (FcBlock(12, bn=True),)),
                  (3, 17, 17), 3),
    # a block without pool, then one with: 16-bit dropout + BN, then 0.1875 (13/16, 8-bit), padding 2
    "nopool-then-pool-16bit": (ModelSpec((ConvBlock(4, kernel=3, bn=True, dropout=P16),
                                          ConvBlock(6, kernel=3, padding=2, dropout=0.1875, pool=2)),
                                         (FcBlock(20, bn=True, dropout=0.25),)),
                               (1, 19, 19), 50),
    # kernel 2, odd map into pool 2 (18 -> 9), then kernel 3 stride 2 padding 1 (overlapping windows), BN, pool 1
    "k2-stride2-pool1": (ModelSpec((ConvBlock(5, kernel=2, pool=2),
                                    ConvBlock(6, kernel=3, stride=2, padding=1, bn=True, dropout=0.5, pool=1),
                                    ConvBlock(4, kernel=3, bn=True, pool=3)), ()),
                         (3, 19, 19), 3),
    # 16-bit dropout with pool 2 and no BN, kernel 5 on 1 channel, batch 3; 16-bit dropout in an fc block
    "k5-16bit-nobn": (ModelSpec((ConvBlock(8, kernel=5, padding=1, dropout=P16, pool=2),), (FcBlock(24, dropout=P16),)),
                      (1, 19, 19), 3),
    # no conv block at all: fc blocks straight on the flattened image
    "fc-only": (ModelSpec((), (FcBlock(32, bn=True, dropout=0.5), FcBlock(16, dropout=P16))), (1, 9, 9), 50),
}
CASES = {f"{name}-{s[0]}x{s[1]}x{s[2]}-b{b}": (PRESETS[name], s, b)
         for name in sorted(PRESETS) for s, b in (((1, 28, 28), 50), ((3, 17, 17), 3))}
CASES.update(ODD)


def test_the_odd_specs_cover_what_they_claim():
    blocks = [b for spec, _, _ in ODD.values() for b in spec.conv]
    bits = {FastDropout(b.dropout).bits for b in blocks if b.dropout}
    assert bits == {8, 16}
    assert {FastDropout(b.dropout).bits for spec, _, _ in ODD.values() for b in spec.fc if b.dropout} == {8, 16}
    assert {b.pool for b in blocks} >= {0, 1, 2, 3}
    assert {b.kernel for b in blocks} >= {2, 3, 5} and {b.stride for b in blocks} >= {1, 2}
    assert {b.padding for b in blocks} >= {0, 1, 2} and {b.bn for b in blocks} == {False, True}


def native_step(net, x, y, seed):
    """Net.native_train_step: the engine's training step, without autograd."""
    torch.manual_seed(seed)
    got = net.native_train_step(x, y)
    assert got is not None, "native_train_step refused"
    loss, out = got
    return out, loss


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("how", ["autograd", "step", "C step", "C step, FMA weight gradients"])
def test_native_training_step_and_eval_equal_torch_modules(lib, spy, monkeypatch, request, case, how):
    """The native net through autograd (forward + loss.backward()), and its hand-written
    training step (Net.native_train_step, what the engine runs) both as calls from Python
    (fastops.train_step) and as one C call (fastops.TrainStep), against torch's modules; the
    C step also with the opt-in weight-gradient kernel (CNNLAB_NATIVE_DOT_WGRAD=1)."""
    if how == "step":
        monkeypatch.setattr(model, "FAST_PATHS", model.FAST_PATHS - {"cstep"})
    elif how.startswith("C step") and native.sgemm() is None:
        pytest.skip(f"no BLAS sgemm_ in torch's library: {native._sgemm_status}")
    if how == "C step, FMA weight gradients":
        if lib.cl_small_k() == 0:
            pytest.skip("the conv kernels need AVX2 + FMA or AVX-512, which this build does not target")
        lib.cl_set_dot_wgrad(1)
        request.addfinalizer(lambda: lib.cl_set_dot_wgrad(0))
    spec, in_shape, batch = CASES[case]
    ref, net = pair(spec, in_shape)
    x, y = data(in_shape, batch)
    out_r, loss_r = train_step(ref, x, y, seed=5)
    assert not block_kernels(spy)
    out_n, loss_n = (train_step if how == "autograd" else native_step)(net, x, y, seed=5)
    assert native_blocks(spy) >= n_blocks(spec), "the native path did not run"
    assert ("cl_train_step" in spy) == how.startswith("C step")
    assert_close(out_n, out_r, "training output")
    assert_close(loss_n, loss_r, "loss")

    noise = noise_biases(ref)
    grads_r = {k: p.grad for k, p in ref.named_parameters()}
    for k, p in net.named_parameters():
        assert p.grad is not None, k
        if k in noise:  # true gradient 0: both must be float noise
            scale = grads_r[noise[k]].abs().max().item()
            assert p.grad.abs().max().item() < 1e-4 * scale, k
            assert grads_r[k].abs().max().item() < 1e-4 * scale, k
        else:
            assert grads_r[k].abs().max() > 0, k  # the test has something to compare
            assert_close(p.grad, grads_r[k], f"grad {k}")
    buffers_r = dict(ref.named_buffers())
    assert buffers_r.keys() == dict(net.named_buffers()).keys()
    for k, b in net.named_buffers():
        if k.endswith("num_batches_tracked"):
            assert b.item() == buffers_r[k].item() == 1, k
        else:
            assert_close(b, buffers_r[k], k, rtol=1e-5, atol=1e-6)
            assert not torch.equal(b, torch.zeros_like(b) if "mean" in k else torch.ones_like(b)), k  # it moved

    ref.eval(), net.eval()
    spy.clear()
    with torch.no_grad():
        ev_r, ev_n = ref(x), net(x)
    assert native_blocks(spy) >= n_blocks(spec)
    assert_close(ev_n, ev_r, "eval output")
    assert not torch.allclose(ev_r, out_r, atol=1e-3)  # eval really differs from training (dropout/BN)


@pytest.mark.parametrize("case", ["lab2-3c3f-bn-1x28x28-b50", "lab2-2c3f-1x28x28-b50", "nopool-then-pool-16bit",
                                  "rgb-pool3"])
def test_adam_steps_stay_close(lib, spy, case):
    """A few Adam steps from the same weights with the same masks follow the same trajectory.

    Adam divides by sqrt(v) + eps: with the default eps (1e-8) a gradient of pure float noise
    (|g| ~ 1e-7, e.g. a bias right before a BN) becomes a full-size step of random sign, on
    either path. eps = 1e-5 keeps such gradients from moving anything while every real
    gradient here (>> 1e-5) is normalised as usual."""
    spec, in_shape, batch = CASES[case]
    ref, net = pair(spec, in_shape)
    start = {k: v.clone() for k, v in ref.state_dict().items()}
    x, y = data(in_shape, batch)
    lr, steps = 1e-3, 3
    opts = [torch.optim.Adam(m.parameters(), lr=lr, eps=1e-5) for m in (ref, net)]
    losses = [[], []]
    for step in range(steps):
        for i, (m, opt) in enumerate(zip((ref, net), opts)):
            opt.zero_grad()
            losses[i].append(train_step(m, x, y, seed=100 + step)[1].item())
            opt.step()
    assert native_blocks(spy) >= steps * n_blocks(spec)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=0)
    # the noise biases, and the running mean of the BN right after each (it carries the bias)
    skip = {k for b in noise_biases(ref) for k in (b, f"{int(b.split('.')[0]) + 1}.running_mean")}
    final_r = ref.state_dict()
    for k, v in net.state_dict().items():
        if k in skip:
            continue
        if k.endswith("num_batches_tracked"):
            assert v.item() == final_r[k].item() == steps
            continue
        moved = (final_r[k] - start[k]).abs().max().item()
        assert moved > 0, k
        err = (v - final_r[k]).abs().max().item()
        assert err <= 0.1 * moved, f"{k}: differs by {err:.3g}, moved {moved:.3g}"
    outs = []
    for m in (ref, net):
        torch.manual_seed(77)
        with torch.no_grad():
            outs.append(m(x))
    assert_close(outs[1], outs[0], "training output after Adam", rtol=1e-3)
    ref.eval(), net.eval()
    with torch.no_grad():
        assert_close(net(x), ref(x), "eval output after Adam", rtol=1e-3)


def test_input_gradient_and_eval_mode_gradients(lib, spy):
    """Gradients w.r.t. the input (the col2im path), and backward in eval mode: through the
    native kernels without BN, through torch's when a BN's running statistics are in the graph."""
    for spec, native_expected in ((ModelSpec((ConvBlock(5, kernel=3, padding=1, dropout=0.5, pool=2),
                                              ConvBlock(4, kernel=3, stride=2, padding=1, pool=0)), ()), True),
                                  (PRESETS["lab2-3c3f-bn"], False)):
        ref, net = pair(spec, (1, 19, 19))
        x, y = data((1, 19, 19), 7)
        for training in (True, False):
            ref.train(training), net.train(training)
            grads = []
            for m in (ref, net):
                m.zero_grad()
                xr = x.clone().requires_grad_()
                spy.clear()
                out, _ = train_step(m, xr, y, seed=3)
                grads.append((out, xr.grad, [p.grad for p in m.parameters()]))
            assert (native_blocks(spy) >= n_blocks(spec)) if native_expected or training else not spy, training
            assert_close(grads[1][0], grads[0][0], "output")
            assert_close(grads[1][1], grads[0][1], "input gradient")
            noise = set(noise_biases(ref))
            for (k, _), a, b in zip(ref.named_parameters(), grads[1][2], grads[0][2]):
                if k not in noise:
                    assert_close(a, b, f"grad {k} (training={training})")


@pytest.mark.parametrize("layout", ["crop", "channels-last", "strided batch", "training under no_grad"])
def test_non_contiguous_inputs_and_training_without_grad(lib, spy, layout):
    spec, c = PRESETS["lab2-3c3f-bn"], 1 if layout == "strided batch" else 3
    ref, net = pair(spec, (c, 28, 28))
    g = torch.Generator().manual_seed(0)
    if layout == "crop":
        x = torch.rand(20, c, 30, 31, generator=g)[:, :, 1:29, 2:30]
    elif layout == "channels-last":
        x = torch.rand(20, 28, 28, c, generator=g).permute(0, 3, 1, 2)
    elif layout == "strided batch":
        x = torch.rand(40, c, 28, 28, generator=g)[::2]
    else:
        x = torch.rand(20, c, 28, 28, generator=g)
    assert x.is_contiguous() == (layout == "training under no_grad")
    y = torch.randint(0, 10, (20,), generator=g)
    outs = []
    for m in (ref, net):
        torch.manual_seed(2)
        if layout == "training under no_grad":
            with torch.no_grad():
                outs.append(m(x))  # still updates the BatchNorm running statistics
        else:
            outs.append(train_step(m, x, y, seed=2)[0])
    assert native_blocks(spy) >= n_blocks(spec)
    assert_close(outs[1], outs[0], "output")
    noise = set(noise_biases(ref))
    for (k, p), q in zip(ref.named_parameters(), net.parameters()):
        if layout == "training under no_grad":
            assert p.grad is None and q.grad is None, k
        elif k not in noise:
            assert_close(q.grad, p.grad, f"grad {k}")
    for (k, b), d in zip(ref.named_buffers(), net.buffers()):
        assert_close(d.float(), b.float(), k, rtol=1e-5, atol=1e-6)


def test_batch_norm_with_one_value_per_channel_raises_like_torch(lib):
    spec = ModelSpec((ConvBlock(4, kernel=3, bn=True),), ())  # 3x3 -> 1x1: one value per channel
    ref, net = pair(spec, (1, 3, 3))
    x = torch.rand(1, 1, 3, 3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ref(x)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        net(x)


# ---------------------------------------------------------------------------- 2. ties and NaN in max-pool


def _integer_net(spec, in_shape, seed=0):
    """Integer weights and zero biases: every value and gradient below is an exact float."""
    ref, net = pair(spec, in_shape, seed=seed)
    g = torch.Generator().manual_seed(seed)
    state = {k: (torch.randint(-1, 3, v.shape, generator=g).float() if k.endswith("weight") and v.dim() > 1
                 else torch.zeros_like(v) if k.endswith("bias") and v.dim() == 1 and "running" not in k else v)
             for k, v in ref.state_dict().items()}
    ref.load_state_dict(state), net.load_state_dict(state)
    return ref, net


@pytest.mark.parametrize("first_pool, bn", [(2, False), (2, True), (3, False)])
def test_max_pool_ties_send_the_gradient_where_torch_does(lib, spy, first_pool, bn):
    """Integer images through integer weights: many windows hold their maximum twice or more
    (and ReLU zeros). Without BN every value is an exact integer, so gradients must be equal
    bit for bit; with BN (ties survive the normalisation) within float tolerance."""
    spec = ModelSpec((ConvBlock(4, kernel=2, pool=first_pool), ConvBlock(3, kernel=2, dropout=0.5, pool=3, bn=bn)), ())
    in_shape = (1, 15, 15)  # 14x14 -> pool -> 7x7 (or 4x4) -> conv -> pool 3
    ref, net = _integer_net(spec, in_shape)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 3, (20, *in_shape), generator=g).float()
    go = torch.randint(-2, 3, (20, 10), generator=g).float()

    # the test has teeth: many windows of the first block have a tied positive maximum
    with torch.no_grad():
        a = F.relu(F.conv2d(x, ref[0].weight, ref[0].bias))
        w = F.unfold(a.reshape(-1, 1, *a.shape[2:]), first_pool, stride=first_pool)
        top = w.max(1, keepdim=True).values
        tied = ((w == top).sum(1) > 1) & (top[:, 0] > 0)
    assert tied.sum() > 100, tied.sum()

    res = []
    for m in (ref, net):
        xr = x.clone().requires_grad_()
        torch.manual_seed(4)
        out = m(xr)
        (out * go).sum().backward()
        res.append([out, xr.grad] + [p.grad for p in m.parameters()])
    assert native_blocks(spy) >= 2
    names = ["output", "input grad"] + [k for k, _ in ref.named_parameters()]
    noise = set(noise_biases(ref))
    for k, a, b in zip(names, res[1], res[0]):
        if k in noise:
            continue
        if bn:
            assert_close(a, b, k)
        else:
            assert torch.equal(a, b), f"{k}: max diff {(a - b).abs().max().item()}"


@pytest.mark.parametrize("pool", [16, 17])
def test_large_pool_window_gradient_goes_to_the_maximum(lib, spy, pool):
    spec = ModelSpec((ConvBlock(2, kernel=1, pool=pool),), ())
    in_shape = (1, pool, pool)
    ref, net = pair(spec, in_shape)
    x = torch.rand(4, *in_shape)
    x[:, :, -1, -1] = 2.0  # the maximum at the window's last place (pool*pool - 1)
    x[1, :, -1, 0] = 3.0  # or at place pool*(pool-1)
    y = torch.tensor([0, 1, 2, 3])
    train_step(ref, x, y, seed=0)
    train_step(net, x, y, seed=0)  # native, or torch's if native_ok refuses such a window: either is right
    for (k, p), q in zip(ref.named_parameters(), net.parameters()):
        assert_close(q.grad, p.grad, f"grad {k}")


@pytest.mark.parametrize("pool, bn, dropout", [(2, False, 0.0), (3, False, 0.0), (0, False, 0.0), (2, True, 0.0),
                                               (3, True, 0.5)])
@pytest.mark.parametrize("training", [False, True])
def test_nan_input_gives_nan_like_torch(lib, spy, pool, bn, dropout, training):
    """A NaN pixel, in each place of a window among larger or negative neighbours, must reach
    the output exactly where torch's does (max-pool and ReLU both pass NaN)."""
    k = pool or 2
    spec = ModelSpec((ConvBlock(2, kernel=1, bn=bn, dropout=dropout, pool=pool),), ())
    in_shape = (1, 2 * k, 2 * k)
    ref, net = pair(spec, in_shape)
    with torch.no_grad():
        for m in (ref, net):
            m[0].weight.fill_(1.0), m[0].bias.zero_()
    g = torch.Generator().manual_seed(2)
    n = k * k
    x = torch.randint(1, 6, (2 * n + 1, *in_shape), generator=g).float()
    x[n:2 * n] -= 10  # negative neighbours: ReLU(NaN) is NaN, the rest 0
    for i in range(2 * n):  # sample i: NaN at place i % n of the first window
        x[i, 0, (i % n) // k, (i % n) % k] = float("nan")
    ref.train(training), net.train(training)
    outs = []
    for m in (ref, net):
        torch.manual_seed(9)
        with torch.set_grad_enabled(training):
            outs.append(m(x))
    assert native_blocks(spy) >= 1
    nan_r, nan_n = torch.isnan(outs[0]), torch.isnan(outs[1])
    if bn and training:
        assert nan_r.all()  # the batch statistics are NaN
    else:
        assert nan_r[:2 * n].all() and not nan_r[2 * n:].any()  # only the NaN samples, every logit
    assert torch.equal(nan_n, nan_r), f"native NaN rows {nan_n.any(1).tolist()} vs torch {nan_r.any(1).tolist()}"
    if not nan_r.all():
        assert_close(outs[1][~nan_r], outs[0][~nan_r], "finite outputs")


@pytest.mark.parametrize("pool, bn", [(2, False), (3, False), (0, False), (2, True)])
def test_nan_input_gives_nan_gradients_like_torch(lib, spy, pool, bn):
    k = pool or 2
    spec = ModelSpec((ConvBlock(2, kernel=1, bn=bn, pool=pool),), ())
    in_shape = (1, 2 * k, 2 * k)
    ref, net = pair(spec, in_shape)
    with torch.no_grad():
        for m in (ref, net):
            m[0].weight.fill_(1.0), m[0].bias.zero_()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, *in_shape, generator=g) + 1
    x[0] -= 3  # sample 0: every activation <= 0 but the NaN
    x[0, 0, 0, 0] = float("nan")
    y = torch.zeros(4, dtype=torch.long)
    nans = []
    for m in (ref, net):
        xr = x.clone().requires_grad_()
        loss = train_step(m, xr, y, seed=0)[1]
        assert torch.isnan(loss)
        nans.append({"input": bool(torch.isnan(xr.grad).any()),
                     **{k: bool(torch.isnan(p.grad).any()) for k, p in m.named_parameters()}})
    assert native_blocks(spy) >= 1
    assert all(nans[0].values())  # torch: every gradient is NaN
    assert nans[1] == nans[0], f"finite on the native path: {[k for k, v in nans[1].items() if not v]}"


# ---------------------------------------------------------------------------- 3. fallbacks

SMALL = ModelSpec((ConvBlock(4, kernel=3, padding=1, bn=True, dropout=0.5, pool=2),
                   ConvBlock(6, kernel=3, dropout=0.25, pool=2)), (FcBlock(16, bn=True, dropout=0.5),))


def _torch_path_results(monkeypatch, spy):
    """Train SMALL for 3 Adam steps with whatever native.library() gives, and the same with the
    native path switched off in FAST_PATHS; both must be bit-identical and use no native block."""
    x, y = data((1, 14, 14), 16)
    runs = []
    for paths in (set(ALL_PATHS), set(TORCH_PATHS)):
        monkeypatch.setattr(model, "FAST_PATHS", paths)
        torch.manual_seed(0)
        net = build_model(SMALL, (1, 14, 14), 10)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        losses = []
        for step in range(3):
            opt.zero_grad()
            losses.append(train_step(net, x, y, seed=step)[1].item())
            opt.step()
        runs.append((losses, net.state_dict()))
    assert not spy, "a native block ran although the kernels are unavailable"
    (la, sa), (lb, sb) = runs
    assert la == lb and la[-1] < la[0]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_cnnlab_native_0_falls_back_to_torch(monkeypatch, spy, native_dir):
    monkeypatch.setenv("CNNLAB_NATIVE_DIR", str(native_dir))
    monkeypatch.setenv("CNNLAB_NATIVE", "0")
    _reset(monkeypatch)
    assert native.library() is None
    d = native.describe()
    assert d.startswith("torch") and "CNNLAB_NATIVE=0" in d, d
    _torch_path_results(monkeypatch, spy)


@pytest.mark.parametrize("how", ["CC missing", "PATH without cc"])
def test_no_compiler_falls_back_to_torch(monkeypatch, spy, tmp_path, how):
    build = tmp_path / "fresh"
    monkeypatch.setenv("CNNLAB_NATIVE_DIR", str(build))
    monkeypatch.delenv("CNNLAB_NATIVE", raising=False)
    if how == "CC missing":
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    else:
        monkeypatch.delenv("CC", raising=False)
        (tmp_path / "empty").mkdir()
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    _reset(monkeypatch)
    assert native.library() is None
    d = native.describe()
    assert d.startswith("torch") and "no C compiler" in d, d
    assert not build.exists() or not any(build.iterdir())
    _torch_path_results(monkeypatch, spy)


def test_failing_compiler_falls_back_and_leaves_no_files(monkeypatch, spy, tmp_path):
    fake = tmp_path / "badcc"
    fake.write_text("#!/bin/sh\necho 'fake cc: broken on purpose' >&2\nexit 1\n")
    fake.chmod(0o755)
    build = tmp_path / "fresh"
    monkeypatch.setenv("CNNLAB_NATIVE_DIR", str(build))
    monkeypatch.delenv("CNNLAB_NATIVE", raising=False)
    monkeypatch.setenv("CC", str(fake))
    _reset(monkeypatch)
    assert native.library() is None
    d = native.describe()
    assert d.startswith("torch") and "broken on purpose" in d, d
    assert not build.exists() or list(build.iterdir()) == []  # no half-built library, no temporary file
    _torch_path_results(monkeypatch, spy)


def test_build_goes_to_native_dir_and_a_second_process_reuses_it(monkeypatch, tmp_path):
    build = tmp_path / "fresh"
    monkeypatch.setenv("CNNLAB_NATIVE_DIR", str(build))
    _reset(monkeypatch)
    if native.library() is None:
        pytest.skip(f"native kernels cannot be built here: {native.describe()}")
    assert native.describe().startswith("native"), native.describe()
    files = list(build.iterdir())
    assert len(files) == 1 and files[0].suffix == ".so", files
    so = files[0]
    assert Path(native.library()._name) == so
    before = so.stat()
    code = ("from cnnlab import native; lib = native.library(); "
            "print(lib._name if lib is not None else 'NONE ' + native.describe())")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(so)
    after = so.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert list(build.iterdir()) == [so]  # nothing rebuilt beside it

    # a damaged library in the cache: the next process builds it again and loads it. (Damaged
    # by replacing the file, never by writing into it: this process has it mapped, and
    # rewriting a mapped library in place kills the process with SIGBUS.)
    bad = so.with_name(so.name + ".bad")
    bad.write_bytes(b"not a shared library")
    os.replace(bad, so)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(so), r.stdout
    assert so.stat().st_size > 1000 and so.read_bytes()[:4] == b"\x7fELF"
    assert list(build.iterdir()) == [so]


# ---------------------------------------------------------------------------- 4. a p without an exact threshold


@pytest.mark.parametrize("where", ["conv", "fc"])
def test_dropout_without_exact_threshold_trains_and_matches_torch(lib, spy, where):
    assert FastDropout(0.3).bits is None
    conv_p, fc_p = (0.3, 0.5) if where == "conv" else (0.5, 0.3)
    spec = ModelSpec((ConvBlock(4, kernel=3, padding=1, bn=True, dropout=conv_p, pool=2),
                      ConvBlock(6, kernel=3, pool=2)), (FcBlock(16, dropout=fc_p),))
    ref, net = pair(spec, (1, 14, 14))
    x, y = data((1, 14, 14), 32)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (ref, net)]
    losses = [[], []]
    for step in range(4):
        for i, (m, opt) in enumerate(zip((ref, net), opts)):
            opt.zero_grad()
            out, loss = train_step(m, x, y, seed=step)
            losses[i].append(loss.item())
            if step == 0:
                if i == 0:
                    first = (out, [p.grad.clone() for p in m.parameters()])
                else:
                    assert_close(out, first[0], "output")
                    for (k, _), a, b in zip(m.named_parameters(), [p.grad for p in m.parameters()], first[1]):
                        if k not in noise_biases(ref):
                            assert_close(a, b, f"grad {k}")
            opt.step()
    if where == "conv":
        assert not block_kernels(spy)  # a native conv block cannot draw torch's bernoulli mask: the net runs on torch
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-3, atol=0)
    assert losses[0][-1] < losses[0][0]


# ---------------------------------------------------------------------------- 5. determinism


@pytest.mark.parametrize("case", ["lab2-3c3f-bn-1x28x28-b50", "nopool-then-pool-16bit", "k2-stride2-pool1"])
def test_native_runs_are_bit_identical_with_the_same_seed(lib, spy, case):
    spec, in_shape, batch = CASES[case]
    _, a = pair(spec, in_shape)
    _, b = pair(spec, in_shape)
    _, c = pair(spec, in_shape)
    x, y = data(in_shape, batch)
    ra, rb, rc = train_step(a, x, y, seed=7), train_step(b, x, y, seed=7), train_step(c, x, y, seed=8)
    assert native_blocks(spy) >= 3 * n_blocks(spec)
    assert torch.equal(ra[0], rb[0]) and torch.equal(ra[1], rb[1])
    for (k, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad), k
    for (k, p), q in zip(a.named_buffers(), b.buffers()):
        assert torch.equal(p, q), k
    assert not torch.equal(ra[0], rc[0])  # the masks do come from the seed


def test_native_train_step_refuses_what_it_cannot_do(lib, monkeypatch):
    """The engine falls back to forward + backward whenever the hand-written step does not apply."""
    ref, net = pair(PRESETS["lab2-3c3f-bn"], (1, 28, 28))
    x, y = data((1, 28, 28), 8)
    assert net.native_train_step(x, y) is not None
    net.eval()
    assert net.native_train_step(x, y) is None  # evaluation mode: no batch statistics to train with
    net.train()
    with torch.no_grad():
        assert net.native_train_step(x, y) is None
    assert net.native_train_step(x.double(), y) is None
    assert net.native_train_step(torch.rand(8, 1, 27, 27), y) is None  # not the net's input shape
    assert ref.native_train_step(x, y) is None  # fast=False: torch's modules only
    monkeypatch.setattr(model, "FAST_PATHS", model.FAST_PATHS - {"native"})
    assert net.native_train_step(x, y) is None


def test_a_block_the_kernels_do_not_know_runs_on_torch(lib, spy, monkeypatch):
    """A layer kind added to a block later (here: a Tanh instead of the ReLU) must never be
    skipped by the native path: the net then runs on torch's modules."""
    spec = ModelSpec((ConvBlock(3, kernel=3, pool=2),), (FcBlock(8),))
    real_make = model._make

    def make(kind, args, fast_dropout):
        return nn.Tanh() if kind == "ReLU" else real_make(kind, args, fast_dropout)

    monkeypatch.setattr(model, "_make", make)
    net = build_model(spec, (1, 12, 12), 10)
    ref = build_model(spec, (1, 12, 12), 10, fast=False)
    ref.load_state_dict(net.state_dict())
    x, y = data((1, 12, 12), 4)
    assert net.native_train_step(x, y) is None
    out_n, out_r = net(x), ref(x)
    assert not block_kernels(spy)
    assert torch.allclose(out_n, out_r, atol=1e-6)
    assert sum(isinstance(m, nn.Tanh) for m in net) == 2 and (out_n != 0).all()


# ---------------------------------------------------------------------------- the step in one C call


@pytest.fixture
def sgemm(lib):
    got = native.sgemm()
    if got is None:
        pytest.skip(f"no BLAS sgemm_ in torch's library: {native._sgemm_status}")
    return got


def _python_then_c(monkeypatch, net_py, net_c, x, y, seed):
    """One step of each: net_py on fastops.train_step (calls from Python), net_c on the C step."""
    monkeypatch.setattr(model, "FAST_PATHS", set(ALL_PATHS) - {"cstep"})
    torch.manual_seed(seed)
    got_py = net_py.native_train_step(x, y)
    monkeypatch.setattr(model, "FAST_PATHS", set(ALL_PATHS))
    torch.manual_seed(seed)
    got_c = net_c.native_train_step(x, y)
    assert got_py is not None and got_c is not None
    return got_py, got_c


def _assert_same_state(net_py, net_c, what):
    noise = noise_biases(net_py)
    for (k, p), q in zip(net_py.named_parameters(), net_c.parameters()):
        assert (p.grad is None) == (q.grad is None), f"{what}: grad {k}"
        if p.grad is not None and k not in noise:
            assert_close(q.grad, p.grad, f"{what}: grad {k}")
    for (k, b), c in zip(net_py.named_buffers(), net_c.buffers()):
        assert_close(c, b, f"{what}: {k}", rtol=1e-5, atol=1e-6)


def test_c_step_plans_follow_the_batch_size_and_the_mode(lib, sgemm, spy, monkeypatch):
    """A plan is built per batch size (the epoch's last batch is smaller) and rebuilt when
    what it bakes in changes (dropout p, batch norm momentum); each step still equals the
    Python step."""
    spec, in_shape, _ = CASES["nopool-then-pool-16bit"]
    _, net_py = pair(spec, in_shape)
    _, net_c = pair(spec, in_shape)
    steps = [(50, "first"), (17, "a smaller last batch"), (50, "batch 50 again")]
    for i, (batch, what) in enumerate(steps):
        x, y = data(in_shape, batch, seed=i)
        (l_py, o_py), (l_c, o_c) = _python_then_c(monkeypatch, net_py, net_c, x, y, seed=i)
        assert_close(o_c, o_py, f"{what}: logits")
        assert_close(l_c, l_py, f"{what}: loss")
        _assert_same_state(net_py, net_c, what)
    assert len(net_c._step_plans) == 2 and spy.count("cl_train_step") == 3
    for net in (net_py, net_c):
        next(m for m in net if isinstance(m, FastDropout)).eval()  # the first block's dropout: off
        next(m for m in net if isinstance(m, nn.BatchNorm2d)).momentum = 0.5
    x, y = data(in_shape, 50, seed=9)
    (l_py, o_py), (l_c, o_c) = _python_then_c(monkeypatch, net_py, net_c, x, y, seed=9)
    assert len(net_c._step_plans) == 3
    assert_close(o_c, o_py, "after turning a dropout off and changing a momentum: logits")
    _assert_same_state(net_py, net_c, "after turning a dropout off and changing a momentum")


def test_c_step_accumulates_gradients_and_skips_frozen_parameters(lib, sgemm, monkeypatch):
    spec, in_shape, batch = CASES["lab2-3c3f-bn-1x28x28-b50"]
    _, net_py = pair(spec, in_shape)
    _, net_c = pair(spec, in_shape)
    for net in (net_py, net_c):
        net[0].weight.requires_grad_(False)  # frozen first conv
        net[1].bias.requires_grad_(False)  # and its batch norm's beta
        net[-1].weight.grad = torch.ones_like(net[-1].weight)  # a gradient from before: accumulate
    x, y = data(in_shape, batch)
    _python_then_c(monkeypatch, net_py, net_c, x, y, seed=3)
    assert net_c[0].weight.grad is None and net_c[1].bias.grad is None
    assert net_c[1].weight.grad is not None
    _assert_same_state(net_py, net_c, "frozen and accumulated")
    assert (net_c[-1].weight.grad - 1).abs().max() > 0  # the new gradient was added to the old


def test_c_step_label_out_of_range_raises_like_torch(lib, sgemm, monkeypatch):
    spec, in_shape, batch = CASES["lab2-2c2f-1x28x28-b50"]
    ref, net = pair(spec, in_shape)
    x, y = data(in_shape, batch)
    y[7] = 10
    with pytest.raises(IndexError) as want:
        train_step(ref, x, y, seed=0)
    with pytest.raises(IndexError) as got:
        net.native_train_step(x, y)
    assert str(got.value) == str(want.value) == "Target 10 is out of bounds."


def test_copies_of_a_net_build_their_own_plans(lib, sgemm):
    """A plan holds raw pointers into its net's tensors: a copy or a pickled net must not
    keep it, and trains exactly like the original."""
    spec, in_shape, batch = CASES["lab2-3c3f-bn-1x28x28-b50"]
    _, net = pair(spec, in_shape)
    x, y = data(in_shape, batch)
    net.native_train_step(x, y)
    assert net._step_plans
    twins = [copy.deepcopy(net), pickle.loads(pickle.dumps(net))]
    assert all(not t._step_plans for t in twins)
    results = []
    for m in [net, *twins]:
        for p in m.parameters():
            p.grad = None
        torch.manual_seed(4)
        results.append(m.native_train_step(x, y))
    for loss, logits in results[1:]:
        assert torch.equal(logits, results[0][1]) and torch.equal(loss, results[0][0])
    assert torch.equal(twins[0][0].weight.grad, net[0].weight.grad)
    assert net[0].weight.data_ptr() != twins[0][0].weight.data_ptr()


def test_without_sgemm_the_step_runs_from_python(lib, spy, monkeypatch):
    """No usable BLAS sgemm_ (another torch build): the same step as separate calls."""
    monkeypatch.setattr(native, "sgemm", lambda: None)
    spec, in_shape, batch = CASES["lab2-3c3f-bn-1x28x28-b50"]
    _, net = pair(spec, in_shape)
    x, y = data(in_shape, batch)
    assert net.native_train_step(x, y) is not None
    assert "cl_train_step" not in spy and spy.count("cl_block_forward") == 5


def test_the_weight_gradient_kernel_is_opt_in_and_named(lib, monkeypatch, request, capsys):
    """Off unless CNNLAB_NATIVE_DOT_WGRAD=1 when the library is loaded (it rounds differently
    from BLAS, so a run's numbers would change); when on, the kernels string (result.json, the
    report) says so."""
    assert not native.dot_wgrad() and "weight gradients" not in native.describe()
    monkeypatch.setenv("CNNLAB_NATIVE_DOT_WGRAD", "yes")
    assert not native.dot_wgrad()
    err = capsys.readouterr().err
    assert err == "cnnlab: CNNLAB_NATIVE_DOT_WGRAD='yes' is neither 0 nor 1: the weight-gradient kernel stays off\n"
    monkeypatch.setenv("CNNLAB_NATIVE_DOT_WGRAD", "1")
    assert "weight gradients" not in native.describe()  # the loaded library's setting, not the environment's
    request.addfinalizer(lambda: lib.cl_set_dot_wgrad(0))  # the same library stays loaded for the next tests
    _reset(monkeypatch)
    assert native.library() is not None and native.dot_wgrad()
    if lib.cl_small_k() and native.sgemm() is not None:
        assert "weight gradients too (CNNLAB_NATIVE_DOT_WGRAD=1" in native.describe()


def test_a_wrong_sgemm_fails_the_check(lib):
    """cl_sgemm_check is what stands between a mismatched BLAS and wrong numbers."""
    proto = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 13)
    noop = proto(lambda *args: None)  # multiplies nothing: C keeps whatever it held
    assert lib.cl_sgemm_check(ctypes.cast(noop, ctypes.c_void_p).value) != 0
    real = native.sgemm()
    if real is not None:
        assert lib.cl_sgemm_check(real) == 0
        assert "step in C with torch's BLAS" in native.describe()  # what result.json records


@pytest.mark.parametrize("ta, M, K, N", [(0, 12, 54, 7200), (0, 24, 108, 800), (1, 54, 12, 3600), (1, 108, 24, 400),
                                         (0, 5, 9, 45), (1, 7, 3, 17), (0, 13, 256, 33), (1, 1, 1, 1)])
def test_the_short_k_kernel_multiplies_within_the_rounding_of_a_dot_product(lib, ta, M, K, N):
    """gemm_small_k (the conv products of short K: z = W cols and dcols = W^T gz) against an
    exact product in double: every element within K units of float rounding of sum |a||b| (a
    chain of K fused multiply-adds); rows past a multiple of the 6-row tile, columns past a
    multiple of the vector, leading dimensions wider than the product, nothing written past
    its columns; K above 256 refused (those go to BLAS)."""
    if lib.cl_small_k() == 0:
        pytest.skip("the short-K kernel needs AVX2 + FMA or AVX-512, which this build does not target")
    torch.manual_seed(M * 1000 + K)
    w = torch.randn(K, M) if ta else torch.randn(M, K)  # op(A) = w.t() when ta
    a = w.t() if ta else w
    b = torch.randn(K, N + 3)[:, :N]
    c = torch.full((M, N + 5), float("nan"))
    rc = lib.cl_gemm_small_k(ta, M, N, K, w.data_ptr(), M if ta else K, b.data_ptr(), N + 3, c.data_ptr(), N + 5)
    assert rc == 0
    exact = a.double() @ b.double()
    bound = K * 2.0**-24 * (a.double().abs() @ b.double().abs()) + 1e-30
    assert ((c[:, :N].double() - exact).abs() <= bound).all()
    assert c[:, N:].isnan().all()
    big = torch.zeros(2, 257)
    assert lib.cl_gemm_small_k(0, 2, 1, 257, big.data_ptr(), 257, big.data_ptr(), 1, c.data_ptr(), 1) == -1


@pytest.mark.parametrize("M, N, K", [(12, 54, 7200), (24, 108, 3600), (6, 9, 39200), (5, 7, 37), (1, 1, 3), (4, 4, 16)])
def test_the_weight_gradient_kernel_multiplies_within_the_rounding_of_a_dot_product(lib, M, N, K):
    """gemm_dot (a conv's weight gradient, C = A B^T along a long K) against an exact product
    in double: within (K + 16) units of float rounding of sum |a||b| (lane chains, the lanes'
    sum, the tail); tiles past M and N, K not a multiple of the vector, leading dimensions
    wider than K."""
    if lib.cl_small_k() == 0:
        pytest.skip("the conv kernels need AVX2 + FMA or AVX-512, which this build does not target")
    torch.manual_seed(M * 7 + N * 3 + K)
    a = torch.randn(M, K + 2)[:, :K]
    b = torch.randn(N, K + 5)[:, :K]
    c = torch.full((M, N + 1), float("nan"))
    assert lib.cl_gemm_dot(M, N, K, a.data_ptr(), K + 2, b.data_ptr(), K + 5, c.data_ptr(), N + 1) == 0
    exact = a.double() @ b.double().t()
    bound = (K + 16) * 2.0**-24 * (a.double().abs() @ b.double().abs().t()) + 1e-30
    assert ((c[:, :N].double() - exact).abs() <= bound).all()
    assert c[:, N:].isnan().all()


@pytest.mark.parametrize("case", ["lab2-3c3f-bn-1x28x28-b50", "nopool-then-pool-16bit", "rgb-pool3", "fc-only"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_c_forward_without_autograd_equals_torch_modules(lib, sgemm, spy, monkeypatch, case, mode):
    """Net.forward under no_grad runs the whole forward in C (cl_forward): in eval mode
    (running statistics, no dropout) in slices of FORWARD_SLICE samples, and in training mode
    (what evaluate(mode="train") does: dropout masks from torch's seed, batch statistics,
    running statistics updated) as one batch, since batch statistics see the whole batch.
    Either way it equals torch's modules."""
    monkeypatch.setattr(model, "FORWARD_SLICE", 16)  # eval: 50 samples in slices of 16, 16, 16, 2
    spec, in_shape, _ = CASES[case]
    ref, net = pair(spec, in_shape)
    x, _ = data(in_shape, 50)
    for m in (ref, net):
        m.train(mode == "train")
    with torch.no_grad():
        torch.manual_seed(11)
        want = ref(x)
        assert not block_kernels(spy)
        torch.manual_seed(11)
        got = net(x)
    assert spy.count("cl_forward") == (4 if mode == "eval" else 1) and "cl_block_forward" not in spy
    assert_close(got, want, f"{mode} output")
    buffers = dict(ref.named_buffers())
    for k, b in net.named_buffers():
        if k.endswith("num_batches_tracked"):
            assert b.item() == buffers[k].item() == (1 if mode == "train" else 0), k
        else:
            assert_close(b, buffers[k], k, rtol=1e-5, atol=1e-6)
    if mode == "train":
        assert not torch.allclose(net.eval()(x), got, atol=1e-3)  # it was training mode


def test_c_step_refuses_tensors_it_was_not_planned_for(lib, sgemm, spy):
    """The C code reads raw memory: after model.double() (float x, float64 parameters) the
    plan must not run; the step falls back (None) and nothing was written."""
    spec, in_shape, batch = CASES["lab2-3c3f-bn-1x28x28-b50"]
    _, net = pair(spec, in_shape)
    x, y = data(in_shape, batch)
    assert net.native_train_step(x, y) is not None  # the plan exists
    net.double()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    spy.clear()
    assert net.native_train_step(x, y) is None
    assert "cl_train_step" not in spy
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    with torch.no_grad():
        net.eval()
        spy.clear()
        with pytest.raises(RuntimeError):  # torch's own dtype error, not a C call on float64 memory
            net(x)
        assert "cl_forward" not in spy


# ---------------------------------------------------------------------------- runs of steps in one C call


def _adam_state(opt):
    return [{k: v.clone() for k, v in opt.state[p].items()} for g in opt.param_groups for p in g["params"]]


def _one_by_one(net, opt, x, y, idx, batch, losses, preds):
    """What the training loop did before runs of steps: each step from Python."""
    for s in range(idx.numel() // batch):
        i = idx[s * batch:(s + 1) * batch]
        opt.zero_grad(set_to_none=True)
        loss, logits = net.native_train_step(torch.index_select(x, 0, i), y[i])
        opt.step()
        losses[s] = loss
        torch.argmax(logits, 1, out=preds[s * batch:(s + 1) * batch])


def _run_pair(case, steps=4, seed=0):
    """Two copies of a net with a LeanAdam each, after one ordinary step (Adam's state)."""
    from cnnlab.fastops import LeanAdam

    spec, in_shape, batch = CASES[case]
    _, a = pair(spec, in_shape, seed=seed)
    b = copy.deepcopy(a)
    x, y = data(in_shape, batch * (steps + 1) + 7, seed=seed)
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    opts = []
    for net in (a, b):
        opt = LeanAdam(net.parameters(), lr=1e-2)
        torch.manual_seed(11)
        _one_by_one(net, opt, x, y, idx[:batch], batch, torch.empty(1), torch.empty(batch, dtype=torch.int64))
        opts.append(opt)
    return a, b, opts, x, y, idx[batch:batch * (steps + 1)].contiguous(), batch


@pytest.mark.parametrize("case", ["lab2-3c3f-bn-1x28x28-b50", "lab2-2c2f-1x28x28-b50", "nopool-then-pool-16bit",
                                  "rgb-pool3", "k2-stride2-pool1", "fc-only"])
def test_a_run_of_steps_in_one_c_call_equals_the_steps_one_by_one(lib, sgemm, spy, case):
    """Net.native_train_steps (kernels.c's cl_train_steps: gather, step, Adam, argmax, in C)
    gives bit for bit what the loop of native_train_step + LeanAdam.step + argmax gave: the
    losses, the predictions, every parameter and buffer, Adam's state, and the random
    stream afterwards (the same dropout seeds drawn in the same order)."""
    a, b, (oa, ob), x, y, idx, batch = _run_pair(case)
    steps = idx.numel() // batch
    la, pa = torch.empty(steps), torch.empty(steps * batch, dtype=torch.int64)
    lb, pb = torch.full((steps,), float("nan")), torch.full((steps * batch,), -1, dtype=torch.int64)
    torch.manual_seed(5)
    _one_by_one(a, oa, x, y, idx, batch, la, pa)
    after_a = torch.randint(0, 2**62, (4,))
    spy.clear()
    torch.manual_seed(5)
    assert b.native_train_steps(ob, x, y, idx, batch, lb, pb)
    after_b = torch.randint(0, 2**62, (4,))
    assert spy.count("cl_train_steps") == 1 and "cl_train_step" not in spy and "cl_adam" not in spy
    assert torch.equal(la, lb) and torch.equal(pa, pb)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
    for sa, sb in zip(_adam_state(oa), _adam_state(ob)):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad)  # the last step's gradients, as after the loop
    assert torch.equal(after_a, after_b)


def test_a_run_of_steps_refuses_what_it_cannot_do_and_changes_nothing(lib, sgemm, spy):
    """Where the run's C path does not apply, native_train_steps returns False having
    touched nothing (weights, buffers, Adam's state, the random stream), and the caller
    takes the steps one by one."""
    from cnnlab.fastops import LeanAdam

    a, _, (oa, _), x, y, idx, batch = _run_pair("lab2-3c3f-bn-1x28x28-b50")
    losses, preds = torch.empty(8), torch.empty(8 * batch, dtype=torch.int64)

    def refuses(what, net=a, opt=oa, x=x, y=y, idx=idx, batch=batch):
        state = {k: v.clone() for k, v in net.state_dict().items()}
        adam = _adam_state(opt) if isinstance(opt, LeanAdam) else None
        rng = torch.get_rng_state()
        spy.clear()
        assert net.native_train_steps(opt, x, y, idx, batch, losses, preds) is False, what
        assert "cl_train_steps" not in spy, what
        assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items()), what
        assert adam is None or all(torch.equal(s[k], t[k]) for s, t in zip(adam, _adam_state(opt)) for k in s), what
        assert torch.equal(rng, torch.get_rng_state()), what

    refuses("a batch that does not divide the indices", idx=idx[:-1])
    refuses("int32 indices", idx=idx.to(torch.int32))
    refuses("torch's own Adam", opt=torch.optim.Adam(a.parameters(), lr=1e-3))
    fresh = LeanAdam(a.parameters(), lr=1e-3)  # no state before its first step
    refuses("an optimizer without state", opt=fresh)
    part = LeanAdam(list(a.parameters())[1:], lr=1e-3)
    refuses("an optimizer over some of the parameters", opt=part)
    handle = oa.register_step_post_hook(lambda *args: None)
    refuses("an optimizer with a hook")
    handle.remove()
    a[0].weight.requires_grad_(False)
    refuses("a frozen parameter")
    a[0].weight.requires_grad_(True)
    a.eval()
    refuses("a net in eval mode")
    a.train()
    refuses("float64 images", x=x.double())
    a.double()
    refuses("float64 parameters", x=x)


def test_a_run_of_steps_with_a_bad_label_stops_there_like_the_steps(lib, sgemm):
    """A label out of range at step 2 of a run: torch's IndexError; steps 0 and 1 were taken
    (as one by one), step 2 was not."""
    a, b, (oa, ob), x, y, idx, batch = _run_pair("lab2-2c2f-1x28x28-b50")
    y = y.clone()
    y[idx[2 * batch + 3]] = 10
    la, pa = torch.empty(4), torch.empty(4 * batch, dtype=torch.int64)
    lb, pb = torch.empty(4), torch.empty(4 * batch, dtype=torch.int64)
    torch.manual_seed(1)
    with pytest.raises(IndexError) as want:
        _one_by_one(a, oa, x, y, idx, batch, la, pa)
    torch.manual_seed(1)
    with pytest.raises(IndexError) as got:
        b.native_train_steps(ob, x, y, idx, batch, lb, pb)
    assert str(got.value) == str(want.value) == "Target 10 is out of bounds."
    assert torch.equal(la[:2], lb[:2]) and torch.equal(pa[:2 * batch], pb[:2 * batch])
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


# ---------------------------------------------------------------------------- struct layouts

def test_the_ctypes_mirrors_match_kernels_c_and_a_wrong_one_is_refused(monkeypatch):
    lib = native.library()
    if lib is None:
        pytest.skip(native.describe())
    native.check_layouts(lib)  # the real mirrors match: sizes and every offset

    def swapped(fields, a, b):
        names = [f[0] for f in fields]
        i, j = names.index(a), names.index(b)
        out = list(fields)
        out[i], out[j] = out[j], out[i]
        return out

    class BadBlock(ctypes.Structure):  # scale and batch_stats swapped: same size, other offsets
        _fields_ = swapped(native.CBlock._fields_, "scale", "batch_stats")

    class ShortAdam(ctypes.Structure):  # a field the C side has is missing
        _fields_ = native.AdamArgs._fields_[:-1]

    for which, struct, message in ((0, BadBlock, "cl_block's layout differs .* at field 'scale'"),
                                   (1, ShortAdam, "cl_adam_args's layout differs .* at its size")):
        with monkeypatch.context() as m:
            cname, _, names = native.STRUCTS[which]
            m.setitem(native.STRUCTS, which, (cname, struct, names))
            with pytest.raises(RuntimeError, match=message):
                native.check_layouts(lib)
            # loading the kernels with such a mirror falls back to torch's and says why
            m.setattr(native, "_lib", None)
            m.setattr(native, "_status", None)
            assert native.library() is None
            assert native.describe().startswith("torch (native kernels unavailable:") and "layout differs" in native.describe()
    assert native.library() is lib  # restored
