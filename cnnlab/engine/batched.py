"""Batched seeds: K runs of one variant (same network and settings, K seeds) trained as
one network, so that a study fills a GPU instead of feeding it one small network at a time.

Each model keeps everything its own run has: its split, batch order, initial weights,
dropout random stream (its own generator, starting where its separate run's stream starts),
BatchNorm statistics and Adam state. Nothing is reduced across models:

- a convolution is one grouped convolution (groups = K) over the K models' channels side
  by side, a BatchNorm one call over K x C channels (its statistics are per channel), ReLU,
  max-pool and dropout elementwise or per channel;
- a Linear layer is one batched matrix product (K, B, in) x (K, in, out);
- the loss is the sum of the K models' mean losses, whose gradient with respect to model k's
  parameters is exactly that of its own loss; Adam is elementwise over the stacked tensors.

So each model computes its separate run's numbers, up to the order of float operations
inside the kernels (tests/test_batched.py: losses, accuracies and weights against separate
runs on the same kernels). The K run directories are written by engine.run.Run, exactly as K
separate runs write them; a run whose loss becomes NaN fails alone, the others go on.

This is the GPU path. On the CPU, separate runs on cnnlab's native kernels are faster (and
draw their dropout masks in another layout), so a batched CPU run equals the separate run
made with torch's kernels (`Net(fast=False)`), not the native one; its result.json says
which kernels trained it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab import fastops, model as model_mod
from cnnlab.config import RunConfig
from cnnlab.errors import ConfigError, RunError
from cnnlab.model import build_model
from cnnlab.engine.loop import fit
from cnnlab.engine.run import Run, run_directory

_KINDS = (nn.Conv2d, nn.BatchNorm2d, nn.BatchNorm1d, model_mod.FastDropout, nn.Dropout, nn.ReLU, nn.MaxPool2d,
          nn.Flatten, nn.Linear)


class NotBatchable(ConfigError):
    """These runs cannot train as one network (cnnlab.study then trains them one by one)."""


def why_not(net: nn.Module) -> str | None:
    """Why a network cannot be trained batched, or None when it can."""
    for m in net:
        if not isinstance(m, _KINDS):
            return f"layer {type(m).__name__} has no batched form"
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)):
            return "only plain convolutions (groups 1, zero padding) are batched"
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) and not (m.affine and m.track_running_stats
                                                                     and m.momentum is not None):
            return "only affine BatchNorm with running statistics and a momentum is batched"
        if isinstance(m, model_mod.FastDropout) and m.p and m.bits is None:
            return f"dropout p={m.p} draws its mask with torch's bernoulli_, which takes no generator"
        if type(m) is nn.Dropout and m.p:
            return "torch's nn.Dropout takes no generator"
    return None


class StackedNet:
    """K copies of one Net's architecture with their parameters stacked: leaf tensors of shape
    (K, *shape), in the order of Net.parameters(), so that index i of this net's parameters
    and of each model's are the same tensor's."""

    def __init__(self, nets: list[model_mod.Net]):
        self.k = len(nets)
        self.layers = list(nets[0])
        self.params: list[torch.Tensor] = []
        self.buffers: list[torch.Tensor] = []
        self.ops: list[tuple[nn.Module, dict]] = []
        for j, m in enumerate(self.layers):
            same = [net[j] for net in nets]
            stacked = {}
            for name, _ in m.named_parameters(recurse=False):
                stacked[name] = torch.stack([getattr(s, name).detach() for s in same]).requires_grad_()
                self.params.append(stacked[name])
            for name, _ in m.named_buffers(recurse=False):
                stacked[name] = torch.stack([getattr(s, name).detach() for s in same]).clone()
                self.buffers.append(stacked[name])
            self.ops.append((m, stacked))
        ref = [tuple(p.shape) for p in nets[0].parameters()]
        if ref != [tuple(p.shape[1:]) for p in self.params]:  # Net.parameters() walks the layers in order
            raise AssertionError("stacked parameters out of Net.parameters() order")

    def train(self, mode: bool = True) -> None:
        for m, _ in self.ops:
            m.train(mode)

    def forward(self, x: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """x: (K, B, C, H, W), model k's batch at index k. Returns the logits, (K, B, classes).
        Dropout masks for model k come from generators[k], layer by layer, as its own run
        draws them from torch's generator."""
        K, B = x.shape[0], x.shape[1]
        h = x.transpose(0, 1).reshape(B, K * x.shape[2], *x.shape[3:])  # conv layout (B, K*C, H, W)
        fc = False  # fc layout: (K, B, F)
        for m, t in self.ops:
            if isinstance(m, nn.Conv2d):
                w = t["weight"]
                h = F.conv2d(h, w.reshape(K * w.shape[1], *w.shape[2:]),
                             None if m.bias is None else t["bias"].reshape(-1), m.stride, m.padding, m.dilation, K)
            elif isinstance(m, nn.Linear):
                if not fc:
                    h = h.reshape(B, K, -1).transpose(0, 1)
                    fc = True
                if m.bias is None:
                    h = torch.bmm(h, t["weight"].transpose(1, 2))
                else:
                    h = torch.baddbmm(t["bias"].unsqueeze(1), h, t["weight"].transpose(1, 2))
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                if m.training:
                    t["num_batches_tracked"].add_(1)
                flat = h.transpose(0, 1).reshape(B, -1) if fc else h
                y = F.batch_norm(flat, t["running_mean"].view(-1), t["running_var"].view(-1), t["weight"].reshape(-1),
                                 t["bias"].reshape(-1), m.training, m.momentum, m.eps)
                h = y.reshape(B, K, -1).transpose(0, 1) if fc else y
            elif isinstance(m, (model_mod.FastDropout, nn.Dropout)):
                if m.training and m.p:
                    h = h * self._mask(m, h, fc, generators)
            elif isinstance(m, nn.ReLU):
                h = torch.relu(h)
            elif isinstance(m, nn.MaxPool2d):
                h = F.max_pool2d(h, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
            # nn.Flatten: the first Linear flattens, in each model's (C, H, W) order
        if not fc:
            h = h.reshape(B, K, -1).transpose(0, 1)
        return h

    def _mask(self, m, h, fc: bool, generators) -> torch.Tensor:
        """Each model's mask in the shape its own run's layer sees, from its own generator."""
        K = self.k
        shape = h.shape[1:] if fc else (h.shape[0], h.shape[1] // K, *h.shape[2:])
        native_rng = "native" in model_mod.FAST_PATHS  # as FastDropout.mask
        masks = [fastops.dropout_mask(shape, h.device, h.dtype, m.bits, m.threshold, m.scale, native_rng, g)
                 for g in generators]
        if fc:
            return torch.stack(masks)  # (K, B, F)
        return torch.stack(masks, 1).reshape(h.shape)  # (B, K, C, H, W) -> (B, K*C, H, W)

    @torch.no_grad()
    def copy_to(self, k: int, net: nn.Module) -> None:
        """Model k's parameters and buffers into net (a Net of the same architecture)."""
        for p, s in zip(net.parameters(), self.params):
            p.copy_(s[k])
        for b, s in zip(net.buffers(), self.buffers):
            b.copy_(s[k])


class FuncStackedNet:
    """K copies of any module, stacked with torch.func (stack_module_state, then vmap over
    functional_call): the stacked form for a factory's module (cnnlab.factory). Parameters
    are leaves of shape (K, *shape) in the order of the module's parameters(). Random ops
    are refused (vmap randomness="error"): vmap cannot give each model its own run's stream,
    so a module with dropout trains one seed at a time."""

    def __init__(self, nets: list[nn.Module]):
        import copy

        from torch.func import stack_module_state

        self.k = len(nets)
        params, buffers = stack_module_state(nets)
        self.names = [name for name, _ in nets[0].named_parameters()]
        self.params = [params[n] for n in self.names]
        self.state = {**params, **buffers}
        self.template = copy.deepcopy(nets[0]).to("meta")  # the architecture only; no weights

    def train(self, mode: bool = True) -> None:
        self.template.train(mode)

    def forward(self, x: torch.Tensor, generators=None) -> torch.Tensor:
        from torch.func import functional_call, vmap

        return vmap(lambda state, xk: functional_call(self.template, state, (xk,)), randomness="error")(self.state, x)

    @torch.no_grad()
    def copy_to(self, k: int, net: nn.Module) -> None:
        for name, t in list(net.named_parameters()) + list(net.named_buffers()):
            t.copy_(self.state[name][k])


def func_why_not(net: nn.Module, in_shape) -> str | None:
    """Why torch.func cannot stack this module (a training step on two copies, on zeros), or None."""
    import copy

    try:
        copies = [copy.deepcopy(net).train() for _ in range(2)]
        stacked = FuncStackedNet(copies)
        out = stacked.forward(torch.zeros(2, 2, *in_shape, device=stacked.params[0].device if stacked.params else None))
        out.float().sum().backward()
    except Exception as e:  # noqa: BLE001 - any failure means: train one seed at a time
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "random operation" in text:
            return (f"{type(net).__name__} draws random numbers (dropout) in training, and torch.func's vmap "
                    "cannot give each seed its own run's random stream")
        return f"torch.func cannot stack {type(net).__name__}: {text[:200]}"
    return None


def _generator(run: Run) -> torch.Generator:
    """A generator that draws what this run's own dropout draws from torch's generator: on the
    CPU, torch's stream right after the model's initialisation; on a GPU, the device's
    stream from torch.manual_seed(seed) (the weights are initialised on the CPU)."""
    if run.device.type == "cpu":
        g = torch.Generator()
        g.set_state(run.rng_after_init)
    else:
        g = torch.Generator(device=run.device)
        g.manual_seed(run.cfg.train.seed)
    return g


def _rng_state(run: Run, g: torch.Generator):
    """What run's checkpoints store as its random streams, so a lone resume continues them."""
    if run.device.type == "cpu":
        return lambda: {"rng.torch": g.get_state()}
    return lambda: {"rng.torch": run.rng_after_init, "rng.cuda": g.get_state()}


def check_group(cfgs: list[RunConfig]) -> None:
    """Runs batch together only when they differ in nothing but the seed."""
    base = dataclasses.replace(cfgs[0], train=dataclasses.replace(cfgs[0].train, seed=0))
    for c in cfgs[1:]:
        if dataclasses.replace(c, train=dataclasses.replace(c.train, seed=0)) != base:
            raise ConfigError("batched runs must differ only in their seed")
    seeds = [c.train.seed for c in cfgs]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"batched runs need distinct seeds, got {seeds}")


def train_batched(cfgs: list[RunConfig], outs: list, *, dataset, echos=None, progresses=None,
                  command: str | None = None) -> list[dict | RunError]:
    """Train len(cfgs) runs that differ only in their seed as one batched network, each into
    its own run directory (as train_run would). Each run starts from scratch. Returns, per
    run, its result.json dict or the RunError that failed it (NaN loss)."""
    from cnnlab import checkpoint

    check_group(cfgs)
    c = cfgs[0]
    net = build_model(c.model, dataset.input_shape, dataset.num_classes)
    why = why_not(net) if isinstance(net, model_mod.Net) else func_why_not(net, dataset.input_shape)
    if why:
        raise NotBatchable(f"these runs cannot be batched: {why}; run them one by one")
    K = len(cfgs)
    echos = echos or [print] * K
    progresses = progresses or [None] * K
    outs = [Path(o) for o in outs]
    with contextlib.ExitStack() as locks:
        for out in outs:
            locks.enter_context(run_directory(out))
        runs = [Run(c, out, dataset, False, e, command, checkpoint) for c, out, e in zip(cfgs, outs, echos)]
        return _train(runs, progresses)


def _train(runs: list[Run], progresses) -> list[dict | RunError]:
    return fit(runs, StackedSteps(runs), progresses)


class StackedSteps:
    """The step function for K seeds of one variant (engine.loop.fit): one StackedNet, one Adam
    over the stacked parameters, one batch per take from each run's own order; after an
    epoch each model's slice goes back into its run's model and optimizer (sync)."""

    def __init__(self, runs: list[Run]):
        K, tc, device = len(runs), runs[0].cfg.train, runs[0].device
        self.runs, self.k, self.bs = runs, K, tc.batch_size
        nets = [r.model for r in runs]
        self.net = StackedNet(nets) if isinstance(nets[0], model_mod.Net) else FuncStackedNet(nets)
        self.gens = [_generator(r) for r in runs]
        for r, g in zip(runs, self.gens):
            r.rng_state = _rng_state(r, g)
            r.batched = r.base_result["kernels"] = (f"torch ({device.type}), {K} seeds batched as one network "
                                                    f"(cnnlab.engine.batched{', torch.func' if isinstance(self.net, FuncStackedNet) else ''})")
        self.opt = fastops.LeanAdam(self.net.params, lr=tc.lr)  # elementwise: model k's Adam, exactly
        self.x_all = torch.cat([r.data.x_train for r in runs])  # (K*N, C, H, W): one gather per step
        self.y_all = torch.cat([r.data.y_train for r in runs])
        n = self.n = len(runs[0].data.y_train)
        for k, r in enumerate(runs):  # each run's own images are a view of the batch's
            r.data.x_train, r.data.y_train = self.x_all[k * n : (k + 1) * n], self.y_all[k * n : (k + 1) * n]
        self.offsets = (torch.arange(K, device=device) * n).unsqueeze(1)

    def train(self) -> None:
        self.net.train()

    def take(self, order, start: int, stop: int, step_loss, pred) -> int:
        K, bs = self.k, self.bs
        idx = order[:, start * bs : (start + 1) * bs] + self.offsets  # (K, b) indices into x_all
        b = idx.shape[1]
        xb = torch.index_select(self.x_all, 0, idx.reshape(-1)).view(K, b, *self.x_all.shape[1:])
        yb = self.y_all[idx]
        self.opt.zero_grad(set_to_none=True)
        logits = self.net.forward(xb, self.gens)
        losses = F.cross_entropy(logits.reshape(K * b, -1), yb.reshape(-1), reduction="none").view(K, b).mean(1)
        losses.sum().backward()
        self.opt.step()
        step_loss[:, start] = losses.detach()
        torch.argmax(logits.detach(), 2, out=pred[:, start * bs : start * bs + b])
        return 1

    def sync(self) -> None:
        for k, r in enumerate(self.runs):
            self.net.copy_to(k, r.model)
            _copy_adam_state(self.opt, self.net.params, k, r.opt)


@torch.no_grad()
def _copy_adam_state(opt: torch.optim.Optimizer, stacked: list[torch.Tensor], k: int, target) -> None:
    """Model k's slice of the batched Adam state into its run's optimizer, as its own would hold it."""
    for p, s in zip(target.param_groups[0]["params"], stacked):
        st = opt.state[s]
        target.state[p] = {"step": st["step"].clone(), "exp_avg": st["exp_avg"][k].clone(),
                           "exp_avg_sq": st["exp_avg_sq"][k].clone()}
