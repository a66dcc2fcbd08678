"""One run's state and its run directory (docs/layout.md, cnnlab.rundir): everything of a
run but its training steps, which cnnlab.engine.loop.fit takes.

Sections: device & versions, data, evaluation, checkpoint state, the run.

Speed without changing the protocol (docs/performance.md):
- the whole split lives on the device as one float tensor, indexed per batch;
- metrics accumulate on the device; the host syncs once per epoch;
- dropout masks come from random bytes (model.FastDropout), exact distribution;
- on the CPU, model.Net runs its hidden blocks on cnnlab's native kernels (cnnlab/native,
  compiled on first use; torch's fast path in cnnlab.fastops without a C compiler), malloc
  is kept from returning memory to the OS (fastops.tune_allocator), and Adam takes a leaner
  step into the same fused kernel (fastops.LeanAdam); with the C step, runs of up to
  loop.PROGRESS_STEPS full batches (gather, step, Adam, predictions) are one C call each
  (Net.native_train_steps), bit-identical to the steps one by one;
- evaluation runs under inference_mode in large chunks, while the loss is still reported
  as the lab's "sum of per-batch mean losses" at the training batch size.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cnnlab import cpu_model, factory, fastops, faults, native, trackers, versions
from cnnlab.config import RunConfig, dump_config
from cnnlab.errors import CnnlabError, ConfigError, RunError
from cnnlab.fsutil import atomic_savez, atomic_write_json, atomic_write_text, clean_temp_files, exclusive
from cnnlab.model import build_model
from cnnlab import rundir
from cnnlab.rundir import metrics_csv
from cnnlab.spec import ModelSpec, layer_table

EVAL_CHUNK = 1000  # samples per forward pass in eval mode
EXAMPLE_INDEX = 4  # the lab plots test image 4


# ---------------------------------------------------------------------------- device & versions

def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {name}: unsupported device type {dev.type!r}")
    return dev


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    if dev.type == "cpu":
        return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)"
    return str(dev)


def kernels(dev: torch.device, model=None) -> str:
    """Which kernels train `model` on dev: for the lab's networks on the CPU cnnlab's native
    ones (or torch's and why); for any other module torch's, with autograd."""
    from cnnlab.model import Net

    if model is not None and not isinstance(model, Net):
        return f"torch ({dev.type}), autograd"
    if dev.type != "cpu":
        return f"torch ({dev.type})"
    if model is not None and not model._can_plan:
        return "torch (cpu): the network has a layer the native kernels do not cover"
    return native.describe()


# ---------------------------------------------------------------------------- data

def make_split(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The lab's split: a seeded permutation of the training file, the last val_size held out."""
    if val_size >= n:
        raise ConfigError(f"val_size {val_size} leaves no training images (the training file has {n}); lower val_size")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[: n - val_size]), np.sort(perm[n - val_size :])


@dataclass
class Tensors:
    """The split as device tensors: images float32 (N, C, H, W) in [0, 1], labels int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def to_tensors(ds, train_idx, val_idx, device, norm: dict | None = None) -> Tensors:
    """The split's images as float32 in [0, 1] (uint8 / 255; float32 as is), then, with norm
    ({"mean": [...], "std": [...]} per channel), (x - mean) / std as model.Normalized does."""
    def imgs(a):  # Dataset images are (N, C, H, W)
        if a.dtype == np.uint8:
            t = torch.from_numpy(np.ascontiguousarray(a)).to(device).float().div_(255.0)
        else:
            t = torch.from_numpy(np.array(a, dtype=np.float32)).to(device)
        if norm:
            shape = (1, -1, 1, 1)
            t = (t - torch.tensor(norm["mean"], dtype=torch.float32, device=device).view(shape)) / \
                torch.tensor(norm["std"], dtype=torch.float32, device=device).view(shape)
        return t

    def labels(a):
        return torch.from_numpy(np.asarray(a, dtype=np.int64)).to(device)

    return Tensors(
        imgs(ds.train_images[train_idx]), labels(ds.train_labels[train_idx]),
        imgs(ds.train_images[val_idx]), labels(ds.train_labels[val_idx]),
        imgs(ds.test_images), labels(ds.test_labels),
    )


def normalization(ds, train_idx) -> dict:
    """{"mean": [...], "std": [...]} per channel over the training split's images only (a
    constant channel keeps std 1: nothing to scale)."""
    from cnnlab.data import channel_stats

    mean, std = channel_stats(ds.train_images, train_idx)
    return {"mean": [float(m) for m in mean], "std": [float(s) if s > 0 else 1.0 for s in std]}


# ---------------------------------------------------------------------------- evaluation

def _sum_of_batch_means(losses: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The lab's loss: sum over batches of size batch_size of each batch's mean loss."""
    n = losses.numel()
    full = n // batch_size
    total = losses[: full * batch_size].view(full, batch_size).mean(1).sum()
    if n % batch_size:
        total = total + losses[full * batch_size :].mean()
    return total


def evaluate(model, x, y, batch_size: int, mode: str = "eval", seed: int = 0):
    """(loss as sum of per-batch means, accuracy %, predictions, probabilities).

    mode "eval": model.eval(), large chunks. mode "train": the lab's way, dropout and
    batch-stat BatchNorm active, at the training batch size; it uses its own seeded RNG and
    restores BatchNorm running statistics, so it changes neither the model nor the
    training random stream.
    """
    was_training = model.training
    probs, losses = [], []
    try:
        if mode == "eval":
            model.eval()
            with torch.inference_mode():
                for s in range(0, len(x), EVAL_CHUNK):
                    out = model(x[s : s + EVAL_CHUNK]).float()
                    losses.append(F.cross_entropy(out, y[s : s + EVAL_CHUNK], reduction="none"))
                    probs.append(out.softmax(1))
        else:
            buffers = {k: v.clone() for k, v in model.named_buffers()}
            model.train()
            devices = [x.device] if x.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                torch.manual_seed(seed)
                for s in range(0, len(x), batch_size):
                    out = model(x[s : s + batch_size]).float()
                    losses.append(F.cross_entropy(out, y[s : s + batch_size], reduction="none"))
                    probs.append(out.softmax(1))
            with torch.no_grad():
                for k, v in model.named_buffers():
                    v.copy_(buffers[k])
    finally:
        model.train(was_training)
    loss = torch.cat(losses)
    prob = torch.cat(probs)
    pred = prob.argmax(1)
    acc = (pred == y).float().mean() * 100
    return _sum_of_batch_means(loss, batch_size).item(), acc.item(), pred, prob


# ---------------------------------------------------------------------------- checkpoint state

def _global_rng_state() -> dict[str, torch.Tensor]:
    """The random streams a run's dropout draws from: torch's global generators."""
    t = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        t["rng.cuda"] = torch.cuda.get_rng_state()
    return t


def _state_tensors(model, opt, order_gen, rng: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    t = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            t[f"optim.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    t.update(rng)
    t["rng.order"] = order_gen.get_state()
    return t


def _restore_state(tensors, meta, model, opt, order_gen) -> None:
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    order_gen.set_state(tensors["rng.order"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


# ---------------------------------------------------------------------------- the run

def format_epoch(row: dict) -> str:
    return (
        f"Epoch: {row['epoch']} train loss: {row['train_loss']:.4f} train accuracy: {row['train_acc']:.4f} "
        f"val loss: {row['val_loss']:.4f} val accuracy: {row['val_acc']:.4f}"
    )


def make_optimizer(model, cfg: RunConfig, device):
    # Fused Adam: one kernel for all parameters (same update rule, float-level differences only).
    if device.type in ("cpu", "cuda"):
        return fastops.LeanAdam(model.parameters(), lr=cfg.train.lr)  # = Adam(fused=True), bit for bit
    return torch.optim.Adam(model.parameters(), lr=cfg.train.lr)


def run_directory(out: Path):
    """Make the run directory `out` (and its checkpoints/) and hold its lock: a context manager.
    A directory that cannot be made or written, or that another process trains, is a RunError."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / rundir.CHECKPOINTS).mkdir(exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create run directory {out}: {e.strerror}; choose a writable --out") from None
    if not os.access(out, os.W_OK):
        raise RunError(f"run directory {out} is not writable; choose another --out")
    return exclusive(out, ".lock", f"run directory {out} is in use by another cnnlab process (lock {out / '.lock'})")


class Run:
    """One run's state and its run directory: everything of a run but the training steps.

    The constructor makes the split, the data tensors, the seeded model and optimizer (or
    restores them from the last checkpoint) and writes config.toml and split.npz;
    end_epoch evaluates, checkpoints and logs an epoch whose steps fit took (cnnlab.engine.loop);
    finish evaluates on the test set and writes result.json.
    """

    def __init__(self, cfg: RunConfig, out: Path, ds, resume: bool, echo, command, checkpoint):
        self.t0 = time.time()
        trackers.require(cfg.train.log)  # a missing tracker package is a ConfigError before anything is done
        self.cfg, self.out, self.echo, self.checkpoint = cfg, out, echo, checkpoint
        clean_temp_files(out)
        clean_temp_files(out / rundir.CHECKPOINTS)
        tc = cfg.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        device = self.device = resolve_device(tc.device)
        if device.type == "cpu":
            fastops.tune_allocator()  # no page faults per step; numerics untouched
        in_shape, num_classes = self.in_shape, self.num_classes = ds.input_shape, ds.num_classes
        if isinstance(cfg.model, ModelSpec):
            layer_table(cfg.model, in_shape, num_classes)  # shape check before any work

        train_idx, val_idx = make_split(len(ds.train_labels), cfg.data.val_size, tc.seed)
        if cfg.data.limit:
            train_idx = train_idx[: cfg.data.limit]  # the first N of the split; val and test stay whole
        self.norm = normalization(ds, train_idx) if cfg.data.normalize else None
        self.data = to_tensors(ds, train_idx, val_idx, device, self.norm)

        torch.manual_seed(tc.seed)
        np.random.seed(tc.seed % 2**32)
        self.model = build_model(cfg.model, in_shape, num_classes).to(device)  # a factory's: checked on zeros
        # a factory's source file and its hash (cnnlab.factory): recorded, and a resume refuses a change
        self.factory = None if isinstance(cfg.model, ModelSpec) else factory.record(cfg.model)
        self.rng_after_init = torch.get_rng_state()  # where the run's dropout stream starts
        self.opt = make_optimizer(self.model, cfg, device)
        self.order_gen = torch.Generator().manual_seed(tc.seed)  # batch order; CPU so it is device-independent
        self.rng_state = _global_rng_state  # what checkpoints store as the run's random stream(s)

        self.batched = ""  # set by cnnlab.engine.batched: which batch trained this run (kept by its checkpoints)
        self.rows: list[dict] = []
        self.best_val, self.best_epoch, self.start_epoch = -1.0, -1, 0
        self.last_ckpt = out / rundir.CHECKPOINTS / "last.safetensors"
        if resume and self.last_ckpt.exists():
            tensors, meta = checkpoint.load(self.last_ckpt)
            _check_compatible(meta, cfg, in_shape, num_classes, self.last_ckpt)
            why = self.factory and factory.changed(cfg.model, meta.get("factory"))
            if why:
                raise ConfigError(f"--resume {out}: {why}; resuming would train another network. Restore that "
                                  "file, or start a new run")
            _restore_state(tensors, meta, self.model, self.opt, self.order_gen)
            self.start_epoch, self.best_val, self.best_epoch = meta["epoch"] + 1, meta["best_val_acc"], meta["best_epoch"]
            self.rows = meta["rows"]  # the checkpoint, not metrics.csv, is the source of truth
            self.t0 -= meta.get("wall_seconds", 0.0)
            self.batched = meta.get("batched", "")
            if self.batched:  # go on with the kernels and dropout layout it trained with (cnnlab.engine.batched)
                self.model.fast = False
        elif resume:
            echo(f"(no checkpoint in {out}; starting from scratch)")

        atomic_write_text(out / rundir.CONFIG, dump_config(cfg))
        atomic_savez(out / rundir.SPLIT, train_idx=train_idx.astype(np.int64), val_idx=val_idx.astype(np.int64))
        _describe_model(self.model, in_shape, num_classes, out)
        self._write_logs()
        self.base_result = {
            "seed": tc.seed, "eval_mode": tc.eval_mode, "epochs": tc.epochs, "device": device_name(device),
            "versions": versions(), "kernels": kernels(device, self.model), "command": command or " ".join(sys.argv),
            "params": sum(p.numel() for p in self.model.parameters()),
            **({"factory": self.factory} if self.factory else {}),
            "data": {"name": ds.name, "source": ds.source, "sha256": ds.sha256, "n_train": len(train_idx),
                     "n_val": len(val_idx), "n_test": len(ds.test_labels), "input_shape": list(in_shape),
                     "num_classes": num_classes, **({"normalize": self.norm} if self.norm else {})},
        }
        if self.batched:
            self.base_result["kernels"] = f"{self.batched}; from epoch {self.start_epoch} alone on torch's kernels"
        if (out / rundir.RESULT).exists():
            (out / rundir.RESULT).unlink()  # a stale result must never describe this run
        self.trackers = trackers.Trackers(cfg, out, self.start_epoch, echo)  # [train] log (cnnlab.trackers)

    def _write_logs(self, tail: str = "") -> None:
        atomic_write_text(self.out / rundir.METRICS, metrics_csv(self.rows))
        atomic_write_text(self.out / rundir.LOG, "".join(format_epoch(r) + "\n" for r in self.rows) + tail)

    def end_epoch(self, epoch: int, step_loss: torch.Tensor, pred: torch.Tensor, perm: torch.Tensor, te: float) -> None:
        """Close an epoch trained on perm's batch order: step_loss holds each step's mean loss,
        pred the predicted classes in batch order. Evaluates, logs, checkpoints; a non-finite
        loss fails the run (RunError, after result.json says so)."""
        tc, data, n = self.cfg.train, self.data, len(self.data.y_train)
        loss_sum = step_loss.sum()
        bad = int(torch.argmin(torch.isfinite(step_loss).to(torch.int8)))  # the first non-finite step
        if not math.isfinite(step_loss[bad]):
            self.trackers.finish(None)
            _fail(self.out, self.base_result, self.t0, epoch, bad, self.rows,
                  f"loss became {float(loss_sum)} at epoch {epoch}, step {bad}; lower the learning rate (lr={tc.lr})")
        correct = (pred == data.y_train[perm]).sum()
        vl, va, _, _ = evaluate(self.model, data.x_val, data.y_val, tc.batch_size, tc.eval_mode, tc.seed + 1)
        row = {"epoch": epoch, "train_loss": float(loss_sum), "train_acc": int(correct) * 100.0 / n,
               "val_loss": vl, "val_acc": va, "seconds": time.time() - te}
        self.rows.append(row)
        self.echo(format_epoch(row))
        self.trackers.epoch(row)
        if va > self.best_val:
            self.best_val, self.best_epoch = va, epoch
        meta = {"spec": self.cfg.model.to_dict(), "in_shape": list(self.in_shape), "num_classes": self.num_classes,
                "epoch": epoch, "best_val_acc": self.best_val, "best_epoch": self.best_epoch,
                "param_groups": self.opt.state_dict()["param_groups"], "wall_seconds": time.time() - self.t0,
                "rows": self.rows, **({"batched": self.batched} if self.batched else {}),
                **({"factory": self.factory} if self.factory else {}),
                **({"normalize": self.norm} if self.norm else {})}
        tensors = _state_tensors(self.model, self.opt, self.order_gen, self.rng_state())
        if self.best_epoch == epoch:
            self.checkpoint.save(self.out / rundir.CHECKPOINTS / "best.safetensors",
                                 {k: v for k, v in tensors.items() if k.startswith("model.")}, meta)
        self.checkpoint.save(self.last_ckpt, tensors, meta)
        faults.maybe_die(faults.point(), "kill-after-checkpoint", epoch, 0)
        self._write_logs()

    def finish(self) -> dict:
        """The final evaluation on the test set, both ways (the headline uses cfg.train.eval_mode);
        writes predictions.npz and result.json and returns the result."""
        tc, data, model, bs = self.cfg.train, self.data, self.model, self.cfg.train.batch_size
        res = {}
        for mode in ("eval", "train"):
            loss, acc, pred, prob = evaluate(model, data.x_test, data.y_test, bs, mode, tc.seed + 2)
            res[mode] = (loss, acc, pred.cpu().numpy(), prob.float().cpu().numpy())
        sub = slice(0, min(10_000, len(data.y_train)))
        train_eval = evaluate(model, data.x_train[sub], data.y_train[sub], bs, "eval")[1]
        train_train = evaluate(model, data.x_train[sub], data.y_train[sub], bs, "train", tc.seed + 3)[1]
        head = res[tc.eval_mode]
        atomic_savez(self.out / rundir.PREDICTIONS, labels=data.y_test.cpu().numpy(), pred_eval=res["eval"][2],
                     pred_train=res["train"][2], probs_eval=res["eval"][3].astype(np.float32))
        ex = min(EXAMPLE_INDEX, len(data.y_test) - 1)
        probs = head[3][ex]
        top = np.argsort(-probs)[:3]
        result = {
            **self.base_result, "status": "done",
            "test_accuracy": head[1], "test_loss": head[0],
            "test_accuracy_eval": res["eval"][1], "test_accuracy_train": res["train"][1],
            "train_accuracy_eval": train_eval, "train_accuracy_train": train_train,
            "best_epoch": self.best_epoch, "best_val_acc": self.best_val,
            "example": {"index": ex, "label": int(data.y_test[ex]), "predicted": int(head[2][ex]),
                        "top_k": [[int(c), float(probs[c])] for c in top]},
            "wall_seconds": time.time() - self.t0,
        }
        line = f"test accuracy: {head[1]:.4f}"
        self.echo(line)
        self._write_logs(line + "\n")
        atomic_write_json(self.out / rundir.RESULT, result)
        self.trackers.finish(result)
        return result


def _describe_model(model, in_shape, num_classes: int, out: Path) -> None:
    """summary.txt and graph.dot: the model's summary table and graph source, stored at
    training time so that the report never has to import a factory's code. A module that
    cannot be described costs these files a note, never the run."""
    from cnnlab.report.graph import module_dot
    from cnnlab.summary import summarize

    try:
        text = summarize(model, in_shape, num_classes)[0]
    except CnnlabError as e:
        text = f"(no summary: {e})"
    try:
        source, why = module_dot(model, in_shape)
    except CnnlabError as e:
        source, why = "", str(e)
    note = f"// note: {why}\n" if why else ""
    atomic_write_text(out / rundir.SUMMARY, text + "\n")
    atomic_write_text(out / rundir.GRAPH, note + source)


def _fail(out, base, t0, epoch, step, rows, message) -> dict:
    result = {**base, "status": "failed", "error": {"message": message, "epoch": epoch, "step": step},
              "wall_seconds": time.time() - t0}
    atomic_write_json(out / rundir.RESULT, result)
    raise RunError(f"run {out} failed: {message}")


def _check_compatible(meta: dict, cfg: RunConfig, in_shape, num_classes, path) -> None:
    if meta.get("spec") != cfg.model.to_dict():
        raise CnnlabError(f"{path}: checkpoint was saved from a different architecture than the config asks for")
    if list(meta.get("in_shape", [])) != list(in_shape) or meta.get("num_classes") != num_classes:
        raise CnnlabError(
            f"{path}: checkpoint expects input {meta.get('in_shape')} with {meta.get('num_classes')} classes, "
            f"the data has {list(in_shape)} with {num_classes}"
        )

