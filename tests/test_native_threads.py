"""The C training step across threads (issue 18; kernels.c, fastops.TrainStep's `threads`).

- The same thread count twice gives the same bits: losses, predictions, every weight and
  buffer, Adam's state (a BN network and a dropout network, conv and fc blocks, runs of steps
  in one C call and single steps, the forward pass alone).
- 2 and 3 threads against 1: the same math. Conv blocks are split by image, so the batch
  statistics, their gradients' sums and the weight gradients are each thread's sums over its
  images, added in thread order: different rounding from one thread's single sums, compared
  to tolerance (test_n_threads_report_bitwise_equality prints whether they happen to be
  equal, and does not assert it). One thread's numbers are the plain sums.
- Batches smaller than the team (a thread with no image) give the same math too.
- The dropout bytes do not depend on the thread count: the random stream after a run is the
  same.
- Without OpenMP (CNNLAB_NATIVE_OPENMP=0, a library of its own in the cache) the step runs
  one thread, describe() says so, and it trains to one OpenMP thread's numbers.
- The thread count: torch.get_num_threads() when the plan is built, or native.set_threads().
"""

from __future__ import annotations

import copy

import pytest
import torch

from cnnlab import fastops, model, native
from cnnlab.model import build_model
from cnnlab.spec import PRESETS, ConvBlock, FcBlock, ModelSpec

ALL_PATHS = {"pool", "conv1", "native", "cstep"}
LR = 1e-3

SPECS = {
    "bn": PRESETS["lab2-3c3f-bn"],  # batch norm everywhere, conv dropout
    "dropout": ModelSpec((ConvBlock(6, kernel=3, padding=1, dropout=0.5, pool=2),
                          ConvBlock(10, kernel=3, dropout=0.25, pool=2)),
                         (FcBlock(40, dropout=0.5), FcBlock(24, bn=True, dropout=0.25))),
    "fc-only": ModelSpec((), (FcBlock(64, bn=True, dropout=0.5), FcBlock(32))),
}


def _reset(monkeypatch):
    for name, value in (("_lib", None), ("_status", None), ("_openmp_status", None), ("_threads", None)):
        monkeypatch.setattr(native, name, value)


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("native")


@pytest.fixture
def lib(native_dir, monkeypatch):
    """The kernels with OpenMP, built into a temporary dir; skipped where they cannot be."""
    monkeypatch.setenv("CNNLAB_NATIVE_DIR", str(native_dir))
    monkeypatch.delenv("CNNLAB_NATIVE_OPENMP", raising=False)
    monkeypatch.setattr(model, "FAST_PATHS", set(ALL_PATHS))
    _reset(monkeypatch)
    got = native.library()
    if got is None or native.sgemm() is None:
        pytest.skip(f"no native C step here: {native.describe()}")
    if not native.openmp():
        pytest.skip(f"kernels without OpenMP here: {native.describe()}")
    n = torch.get_num_threads()
    yield got
    torch.set_num_threads(n)


def _data(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def _net(spec):
    torch.manual_seed(0)
    net = build_model(spec, (1, 28, 28), 10)
    net.train()
    return net, fastops.LeanAdam(net.parameters(), lr=LR)


def _train(spec, threads: int, steps: int = 6, batch: int = 50):
    """A fresh net (seed 0) trained on fixed batches: one single C step (which creates Adam's
    state), then a run of steps-1 steps in one C call, at `threads` threads. Returns the net,
    the optimizer, the losses, the predictions and a draw from torch's generator after."""
    native.set_threads(threads)
    try:
        x, y = _data()
        net, opt = _net(spec)
        torch.manual_seed(7)
        opt.zero_grad()
        loss, _ = net.native_train_step(x[:batch], y[:batch])
        opt.step()
        idx = torch.arange(batch, batch * steps) % len(y)
        losses, preds = torch.empty(steps - 1), torch.empty((steps - 1) * batch, dtype=torch.int64)
        assert net.native_train_steps(opt, x, y, idx, batch, losses, preds)
        plans = [p for p in net._step_plans.values() if p.backward]
        assert plans and all(p.threads == threads for p in plans)
        return net, opt, torch.cat([loss.view(1), losses]), preds, torch.randint(0, 2**62, (2,))
    finally:
        native.set_threads(None)


def _adam(opt):
    return [opt.state[p] for g in opt.param_groups for p in g["params"]]


def _noise_params(net) -> set[str]:
    """Biases feeding a batch norm, and that norm's running mean: their gradient is 0 in exact
    arithmetic, so Adam steps them by about +-lr on rounding noise alone."""
    names = {id(t): n for n, t in net.state_dict(keep_vars=True).items()}
    out = set()
    for parts in net._blocks:
        if parts.bn is not None and parts.conv.bias is not None:
            out |= {names[id(parts.conv.bias)], names[id(parts.bn.running_mean)]}
    return out


@pytest.mark.parametrize("case", list(SPECS))
def test_the_same_thread_count_gives_the_same_bits(lib, case):
    a = _train(SPECS[case], 2)
    b = _train(SPECS[case], 2)
    assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3]) and torch.equal(a[4], b[4])
    for (k, v), w in zip(a[0].state_dict().items(), b[0].state_dict().values()):
        assert torch.equal(v, w), k
    for sa, sb in zip(_adam(a[1]), _adam(b[1])):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("case", list(SPECS))
def test_n_threads_match_one_thread(lib, case, threads):
    """The same math as one thread: losses, predictions, weights, buffers and Adam's state
    after 6 steps to float tolerance; the random stream after the run exactly (the dropout
    bytes are drawn in one fixed order whatever the thread count)."""
    one = _train(SPECS[case], 1)
    many = _train(SPECS[case], threads)
    torch.testing.assert_close(many[2], one[2], rtol=1e-5, atol=1e-6)
    assert (many[3] != one[3]).float().mean() < 0.02  # a prediction flips only on a near tie
    assert torch.equal(many[4], one[4])
    noise = _noise_params(one[0])
    for (k, v), w in zip(one[0].state_dict().items(), many[0].state_dict().values()):
        if not v.is_floating_point():
            assert torch.equal(v, w), k
        elif k in noise:
            assert (v - w).abs().max() <= 2 * LR * 6, k
        else:
            # Adam moves an element by about lr a step whatever its gradient's size, so where a
            # gradient is mostly cancellation (a conv weight's sum over 7,200 columns) a rounding
            # difference of 1% of it moves the weight by 1% of lr a step: up to 1% of lr per step
            # is allowed here; the gradients themselves are compared tightly in
            # test_one_step_gradients_match_one_thread
            torch.testing.assert_close(w, v, rtol=1e-4, atol=0.01 * LR * 6, msg=k)


def test_one_step_gradients_match_one_thread(lib):
    """A single C step (cl_train_step) at 2 threads: loss, logits and every gradient."""
    x, y = _data()
    out = []
    for threads in (1, 2):
        net, _ = _net(SPECS["bn"])
        plan = fastops.TrainStep(net._blocks, net[-1], (1, 28, 28), 50, lib, native.sgemm(), threads=threads)
        assert plan.threads == threads
        torch.manual_seed(3)
        loss, logits = plan(x[:50], y[:50])
        out.append((loss, logits, [p.grad.clone() for p in net.parameters()], copy.deepcopy(net.state_dict())))
    (l1, g1, d1, s1), (l2, g2, d2, s2) = out
    torch.testing.assert_close(l2, l1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-6)
    for a, b in zip(d1, d2):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("case", ["bn", "dropout"])
def test_a_batch_smaller_than_the_team(lib, case, batch):
    """3 threads on 1, 2 or 5 images (some threads have none; the sums over no image are 0):
    loss and every gradient as one thread's, and the same twice."""
    x, y = _data()
    out = []
    for threads in (1, 3, 3):
        net, _ = _net(SPECS[case])
        plan = fastops.TrainStep(net._blocks, net[-1], (1, 28, 28), batch, lib, native.sgemm(), threads=threads)
        torch.manual_seed(3)
        loss, _ = plan(x[:batch], y[:batch])
        out.append((loss, {k: p.grad.clone() for k, p in net.named_parameters()}))
    noise = _noise_params(net)
    (l1, d1), (l3, d3), (l3b, d3b) = out
    assert torch.equal(l3, l3b) and all(torch.equal(d3[k], d3b[k]) for k in d3)
    torch.testing.assert_close(l3, l1, rtol=1e-6, atol=1e-7)
    for k, a in d1.items():
        b = d3[k]
        assert torch.isfinite(b).all(), k
        if k in noise:  # 0 in exact arithmetic: rounding noise either way
            assert a.abs().max() < 1e-5 and b.abs().max() < 1e-5, k
        else:  # a batch norm over a few images cancels most of each sum: rounding relative to the tensor's scale
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()) + 1e-7, msg=k)


def test_forward_alone_matches_one_thread_and_repeats(lib):
    """The C forward pass (cl_forward: evaluation) at 2 threads, twice, and at 1."""
    x, _ = _data(300)
    net, _ = _net(SPECS["bn"])
    net.eval()
    got = {}
    for threads in (2, 1, 2):
        native.set_threads(threads)
        net._step_plans.clear()
        with torch.no_grad():
            out = net(x)
        assert any(p.threads == threads and not p.backward for p in net._step_plans.values())
        if threads in got:
            assert torch.equal(got[threads], out)
        got[threads] = out
    native.set_threads(None)
    torch.testing.assert_close(got[2], got[1], rtol=1e-5, atol=1e-5)


def test_n_threads_report_bitwise_equality(lib, capsys):
    """Not a requirement: whether this machine's BLAS makes 2 threads equal 1 bit for bit
    (docs/performance.md records it). Printed with -s."""
    one, two = _train(SPECS["bn"], 1), _train(SPECS["bn"], 2)
    same = torch.equal(one[2], two[2]) and all(torch.equal(v, w) for v, w in
                                               zip(one[0].state_dict().values(), two[0].state_dict().values()))
    with capsys.disabled():
        print(f"\n2 threads vs 1, lab2-3c3f-bn, 6 steps: {'bit for bit equal' if same else 'equal to rounding'}")


def test_the_thread_count_follows_torch_or_set_threads(lib, monkeypatch):
    torch.set_num_threads(2)
    assert native.threads() == 2 and "2 threads (OpenMP)" in native.describe()
    torch.set_num_threads(1)
    assert native.threads() == 1 and "1 thread (OpenMP)" in native.describe()
    native.set_threads(3)
    try:
        assert native.threads() == 3 and "3 threads" in native.describe()
        net, _ = _net(SPECS["bn"])
        x, y = _data()
        net.native_train_step(x[:50], y[:50])
        assert [p.threads for p in net._step_plans.values()] == [3]
        native.set_threads(2)  # a new count: a new plan (key_of has it)
        net.native_train_step(x[:50], y[:50])
        assert sorted(p.threads for p in net._step_plans.values()) == [2, 3]
        native.set_threads(0)  # every core this process may use
        assert native.threads() == native._cores()
    finally:
        native.set_threads(None)
    with pytest.raises(ValueError):
        native.set_threads(-1)


def test_without_openmp_the_step_runs_one_thread_and_says_so(native_dir, monkeypatch):
    """CNNLAB_NATIVE_OPENMP=0 builds the kernels without -fopenmp, into a file of their own
    beside the OpenMP one: the step runs one thread whatever torch's count or set_threads
    say, describe() (result.json's `kernels`) says why, and it trains to the numbers of one
    OpenMP thread."""
    monkeypatch.setenv("CNNLAB_NATIVE_DIR", str(native_dir))
    monkeypatch.setattr(model, "FAST_PATHS", set(ALL_PATHS))
    _reset(monkeypatch)
    monkeypatch.delenv("CNNLAB_NATIVE_OPENMP", raising=False)
    if native.library() is None or native.sgemm() is None or not native.openmp():
        pytest.skip(f"no native C step with OpenMP here: {native.describe()}")
    with_omp = _train(SPECS["bn"], 1)
    built = set(native_dir.glob("libcnnlab-*.so"))

    _reset(monkeypatch)
    monkeypatch.setenv("CNNLAB_NATIVE_OPENMP", "0")
    lib = native.library()
    assert lib is not None and not lib.cl_openmp() and not native.openmp()
    assert set(native_dir.glob("libcnnlab-*.so")) - built, "the build without OpenMP has a file of its own"
    torch.set_num_threads(2)
    native.set_threads(2)
    try:
        assert native.threads() == 1
        d = native.describe()
        assert "1 thread (built without OpenMP: CNNLAB_NATIVE_OPENMP=0)" in d, d
        assert d.startswith("native") and "step in C" in d
    finally:
        native.set_threads(None)
    net, opt, losses, preds, after = _train(SPECS["bn"], 1)
    assert torch.isfinite(losses).all()
    assert torch.equal(losses, with_omp[2]) and torch.equal(preds, with_omp[3]) and torch.equal(after, with_omp[4])
    for (k, v), w in zip(net.state_dict().items(), with_omp[0].state_dict().values()):
        assert torch.equal(v, w), k
    # a plan asked for 2 threads still runs (one: the library has no OpenMP)
    x, y = _data()
    plan = fastops.TrainStep(net._blocks, net[-1], (1, 28, 28), 50, lib, native.sgemm(), threads=2)
    loss, _ = plan(x[:50], y[:50])
    assert torch.isfinite(loss)
