"""Model factories: any nn.Module, built by the user's own code.

    [model]
    factory = "examples/tiny_resnet.py:tiny_resnet"   # or "package.module:function"
    [model.args]
    width = 16

cnnlab calls `function(in_shape, num_classes, **args)` with in_shape = (C, H, W) and expects
an nn.Module whose forward maps (B, C, H, W) to (B, num_classes) logits. A file path is
relative to the current directory; a dotted module is imported with the current directory
first on sys.path.

Importing a module runs its code, so cnnlab imports a factory only when the user asked for it:
training from a configuration or study file the user passes, or `--trust-code` (`trust_code=True`)
for commands that read a run directory (eval, predict, export, resume). Finding the source file
and hashing it (`source`) runs nothing. The run directory records the factory, its args and the
SHA-256 of its source file; a resume refuses when that file changed.

This module imports no torch until a factory is built.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnlab.errors import ConfigError

_TARGET = re.compile(r"^(?P<where>[^:]+):(?P<fn>[A-Za-z_][A-Za-z0-9_]*)$")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class UntrustedCode(ConfigError):
    """Building this run's model would import code named in its run directory."""


@dataclass(frozen=True)
class FactorySpec:
    """A model built by `factory(in_shape, num_classes, **args)`; args as sorted (key, value) pairs."""

    factory: str
    args: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return {k: _thaw(v) for k, v in self.args}

    @property
    def is_file(self) -> bool:
        return self.factory.rpartition(":")[0].endswith(".py")

    @property
    def label(self) -> str:
        fn = self.factory.rpartition(":")[2]
        return f"{fn}(" + ", ".join(f"{k}={_thaw(v)!r}" for k, v in self.args) + ")"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"factory": self.factory}
        if self.args:
            out["args"] = self.kwargs
        return out


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return ("__table__", tuple(sorted((k, _freeze(v)) for k, v in value.items())))
    if isinstance(value, list):
        return ("__list__", tuple(_freeze(v) for v in value))
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "__table__":
        return {k: _thaw(v) for k, v in value[1]}
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "__list__":
        return [_thaw(v) for v in value[1]]
    return value


def factory_from_dict(data: dict, where: str) -> FactorySpec:
    """[model] factory = "...", args = {...} -> FactorySpec; checks the form only, imports nothing."""
    unknown = sorted(set(data) - {"factory", "args"})
    if unknown:
        raise ConfigError(f"{where}: with `factory`, the only other key is `args`; {', '.join(unknown)} belong to "
                          "presets and block lists (give those to your factory as args)")
    target = data["factory"]
    m = _TARGET.match(target) if isinstance(target, str) else None
    if m is None or not (m["where"].endswith(".py") or _MODULE.match(m["where"])):
        raise ConfigError(f"{where}.factory: expected \"package.module:function\" or \"path/to/file.py:function\", "
                          f"got {target!r}")
    args = data.get("args", {})
    if not isinstance(args, dict):
        raise ConfigError(f"{where}.args: must be a table of keyword arguments for the factory, got {args!r}")
    bad = [k for k in args if not k.isidentifier() or k in ("in_shape", "num_classes")]
    if bad:
        raise ConfigError(f"{where}.args: {', '.join(map(repr, bad))} cannot be keyword arguments "
                          "(in_shape and num_classes are passed by cnnlab)")
    return FactorySpec(target, tuple(sorted((k, _freeze(v)) for k, v in args.items())))


# ---------------------------------------------------------------------------- finding the code

def source(spec: FactorySpec) -> tuple[Path | None, str]:
    """(the factory's source file, its SHA-256) without running any code; (None, "") when
    the file cannot be found without importing (a namespace or compiled module)."""
    where = spec.factory.rpartition(":")[0]
    path = Path(where) if spec.is_file else _module_file(where)
    if path is None or not path.is_file():
        return None, ""
    return path.resolve(), hashlib.sha256(path.read_bytes()).hexdigest()


def _module_file(dotted: str) -> Path | None:
    parts = dotted.split(".")
    for entry in [os.getcwd(), *sys.path]:
        base = Path(entry or ".").joinpath(*parts)
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def record(spec: FactorySpec) -> dict[str, Any]:
    """What a run directory records about its factory (result.json, checkpoint meta)."""
    path, sha = source(spec)
    return {**spec.to_dict(), "file": str(path) if path else None, "sha256": sha}


def changed(spec: FactorySpec, recorded: dict | None) -> str | None:
    """How the factory's source file changed since a run recorded it, or None."""
    if not recorded or not recorded.get("sha256"):
        return None
    path, sha = source(spec)
    if sha == recorded["sha256"]:
        return None
    now = "is missing" if path is None else f"now has SHA-256 {sha[:12]}…"
    return (f"the model's source {recorded.get('file') or spec.factory} changed since the run started "
            f"(SHA-256 {recorded['sha256'][:12]}…, {now})")


def require_trust(spec, trust_code: bool, where, what: str = "loading it") -> None:
    """The gate for commands that read a run directory: a factory is imported only with trust_code."""
    if isinstance(spec, FactorySpec) and not trust_code:
        target = spec.factory.rpartition(":")[0]
        raise UntrustedCode(f"{where} builds its model with {spec.factory}; {what} imports and runs "
                            f"{target}. Pass --trust-code (trust_code=True) if you trust that code")


# ---------------------------------------------------------------------------- building

_imported: dict[str, str] = {}  # dotted module -> SHA-256 of the source it was imported from


def load(spec: FactorySpec):
    """Import the factory's module and return the function. Runs the user's code. A source
    file that changed since this process imported it is imported again, so that the code that
    runs is the code whose hash the run records (a notebook, a reused Ray worker)."""
    where, _, fn = spec.factory.rpartition(":")
    try:
        if spec.is_file:
            path = Path(where).resolve()
            if not path.is_file():
                raise ConfigError(f"model.factory {spec.factory!r}: no such file {where}")
            # the name holds the path's and the content's hash: a changed file is a new module
            stem = re.sub(r"\W", "_", path.stem)
            name = f"cnnlab_factory_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}_{source(spec)[1][:12]}_{stem}"
            module = sys.modules.get(name)
            if module is None:
                mspec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(mspec)
                sys.modules[name] = module
                try:
                    mspec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            sha = source(spec)[1]
            module = importlib.import_module(where)
            if where in _imported and _imported[where] != sha:
                module = importlib.reload(module)
            _imported[where] = sha
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's module failed to import: say which and why
        raise ConfigError(f"model.factory {spec.factory!r}: importing {where} failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None
    func = getattr(module, fn, None)
    if not callable(func):
        raise ConfigError(f"model.factory {spec.factory!r}: {where} has no function {fn}")
    return func


def build(spec: FactorySpec, in_shape, num_classes: int):
    """The user's nn.Module for this input shape and class count, checked on a zero batch."""
    import torch
    from torch import nn

    func = load(spec)
    try:
        model = func(tuple(in_shape), num_classes, **spec.kwargs)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"model.factory {spec.factory!r} failed for in_shape {tuple(in_shape)}, "
                          f"{num_classes} classes, args {spec.kwargs}: {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.factory {spec.factory!r} returned {type(model).__name__}, not a torch nn.Module")
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *in_shape))
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"model.factory {spec.factory!r}: the model fails on input {[2, *in_shape]}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"model.factory {spec.factory!r}: the model maps input {[2, *in_shape]} to {got}; "
                          f"expected logits of shape (2, {num_classes})")
    return model


def check_model(spec, in_shape, num_classes: int) -> None:
    """Shape errors before any work: a spec's layer table (no torch), or a factory's module
    built and run on a zero batch (imports torch and the factory's code)."""
    if isinstance(spec, FactorySpec):
        build(spec, in_shape, num_classes)
    else:
        from cnnlab.spec import layer_table

        layer_table(spec, in_shape, num_classes)
