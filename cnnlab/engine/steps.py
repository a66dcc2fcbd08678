"""Step functions: how fit (cnnlab.engine.loop) takes an epoch's training steps.

A step function has train() (training mode), take(order, start, stop, step_loss, pred)
(train steps start.., at most up to stop; returns how many it took) and sync() (after the
epoch, leave each run's model and optimizer holding its own state). Three kinds:

- AutogradSteps: any nn.Module; forward, loss.backward(), opt.step();
- NativeSteps: the lab's networks (cnnlab.model.Net) on cnnlab's C kernels (cnnlab.fastops,
  cnnlab/native), many batches per C call; autograd where they do not apply;
- StackedSteps (cnnlab.engine.batched): K seeds of one variant as one network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class AutogradSteps:
    """Any nn.Module: forward, cross-entropy, loss.backward(), opt.step(), one batch per take."""

    def __init__(self, run):
        self.model, self.opt, self.data, self.bs = run.model, run.opt, run.data, run.cfg.train.batch_size

    def train(self) -> None:
        self.model.train()

    def sync(self) -> None:
        """Nothing to do: the run's own model and optimizer took the steps."""

    def take(self, order, start: int, stop: int, step_loss, pred) -> int:
        """Train steps start.. (at most up to stop) on batches of order[0]; write each step's
        mean loss into step_loss[0] and its predicted classes into pred[0] (in batch order).
        Returns how many steps were taken."""
        bs = self.bs
        idx = order[0, start * bs : (start + 1) * bs]
        xb, yb = torch.index_select(self.data.x_train, 0, idx), self.data.y_train[idx]  # 2x faster than x[idx]
        self.opt.zero_grad(set_to_none=True)
        loss, logits = self.forward_backward(xb, yb)
        self.opt.step()
        step_loss[0, start] = loss.detach()
        torch.argmax(logits.detach(), 1, out=pred[0, start * bs : start * bs + len(idx)])
        return 1

    def forward_backward(self, xb, yb):
        logits = self.model(xb)
        loss = F.cross_entropy(logits, yb)
        loss.backward()
        return loss, logits


class NativeSteps(AutogradSteps):
    """The lab's networks (cnnlab.model.Net) on the CPU: runs of full batches in one C call
    each (Net.native_train_steps: gather, step, Adam, predictions), a lone step on the native
    kernels without autograd (Net.native_train_step); the same numbers as the steps one by
    one. Where the native path does not apply (a GPU, float64, no C compiler) it is autograd."""

    def take(self, order, start: int, stop: int, step_loss, pred) -> int:
        bs = self.bs
        span = min(stop, order.shape[1] // bs) - start
        if span > 0 and self.model.native_train_steps(self.opt, self.data.x_train, self.data.y_train,
                                                      order[0, start * bs : (start + span) * bs], bs,
                                                      step_loss[0, start : start + span],
                                                      pred[0, start * bs : (start + span) * bs]):
            return span
        return super().take(order, start, stop, step_loss, pred)

    def forward_backward(self, xb, yb):
        native_step = self.model.native_train_step(xb, yb)  # the CPU fast path, no autograd
        return native_step if native_step is not None else super().forward_backward(xb, yb)


def steps_for(run):
    """The step function for one run: the native plan for the lab's networks, autograd for any other."""
    from cnnlab.model import Net

    return NativeSteps(run) if isinstance(run.model, Net) else AutogradSteps(run)
