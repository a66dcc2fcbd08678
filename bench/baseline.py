"""The plain PyTorch baseline: the lab's training loop, written the way the report's code is.

Kept deliberately plain (do not optimise it): a DataLoader over a TensorDataset with
shuffle, batch 50, Adam (torch's default implementation), nn.Dropout, model.train() /
model.eval() as usual, a validation pass after every epoch, a test pass at the end.

The protocol is cnnlab's (bench/README.md): the same dataset, split (cnnlab.engine.run.make_split),
network (built from the same ModelSpec with plain nn modules, in the same order, so the
same seed gives the same initial weights), batch size, epochs, optimizer and lr.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from cnnlab.spec import ModelSpec, layer_table


def plain_model(spec: ModelSpec, in_shape, num_classes: int) -> nn.Sequential:
    """The network of `spec` from plain torch modules: Conv2d, BatchNorm, nn.Dropout, ReLU, MaxPool2d, Linear."""
    layers: list[nn.Module] = []
    for r in layer_table(spec, tuple(in_shape), num_classes):
        if r.kind == "Linear" and not any(isinstance(m, nn.Flatten) for m in layers):
            layers.append(nn.Flatten())
        layers.append(getattr(nn, r.kind)(**r.args))
    return nn.Sequential(*layers)


class FixedOrder(Sampler):
    """A sampler that replays given permutations, one per epoch (for equivalence tests)."""

    def __init__(self, orders):
        self.orders, self.epoch = orders, 0

    def __iter__(self):
        order = self.orders(self.epoch)
        self.epoch += 1
        return iter(order.tolist())

    def __len__(self):
        return len(self.orders(self.epoch))


@dataclass
class PlainResult:
    train_loss: list[float] = field(default_factory=list)  # per epoch: sum of per-batch mean losses
    train_acc: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)  # training + validation, per epoch
    test_accuracy: float = 0.0
    wall_seconds: float = 0.0
    model: nn.Module | None = None


def accuracy(model, x, y, batch_size: int = 50) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for xb, yb in DataLoader(TensorDataset(x, y), batch_size=batch_size):
            correct += (model(xb).argmax(1) == yb).sum().item()
    return 100.0 * correct / len(y)


def train_plain(spec: ModelSpec, data, *, epochs: int = 10, batch_size: int = 50, lr: float = 1e-3,
                seed: int = 0, order=None, model: nn.Module | None = None) -> PlainResult:
    """Train the plain way on `data` (cnnlab.engine.run.Tensors). `order(epoch)` -> a permutation of
    the training indices replaces the DataLoader's shuffle (tests feed it the engine's order);
    `model` replaces the freshly seeded plain network."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    in_shape, num_classes = tuple(data.x_train.shape[1:]), int(data.y_test.max()) + 1
    if model is None:
        model = plain_model(spec, in_shape, num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ds = TensorDataset(data.x_train, data.y_train)
    if order is None:
        loader = DataLoader(ds, batch_size=batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
    else:
        loader = DataLoader(ds, batch_size=batch_size, sampler=FixedOrder(order))
    res = PlainResult(model=model)
    for _ in range(epochs):
        te = time.perf_counter()
        model.train()
        total, correct = 0.0, 0
        for xb, yb in loader:
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
            correct += (out.argmax(1) == yb).sum().item()
        res.train_loss.append(total)
        res.train_acc.append(100.0 * correct / len(ds))
        res.val_acc.append(accuracy(model, data.x_val, data.y_val, batch_size))
        res.epoch_seconds.append(time.perf_counter() - te)
    res.test_accuracy = accuracy(model, data.x_test, data.y_test, batch_size)
    res.wall_seconds = time.perf_counter() - t0
    return res
