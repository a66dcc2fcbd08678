"""cnnlab: ablation studies of small CNNs over seeds, with honest statistics.

    import cnnlab
    run = cnnlab.train(preset="lab2-3c3f-bn", data="mnist", epochs=10, seed=0, out="runs/a")
    study = cnnlab.study("studies/lab2.toml", out="out/lab2")
    cnnlab.summary("lab2-3c3f-bn")

The Python API lives in cnnlab.api (docs/python-api.md) and is re-exported here lazily.
Importing this package is cheap on purpose: torch, numpy and matplotlib are imported
only by the modules that need them, so `cnnlab --help` and `import cnnlab` stay fast.
"""

import sys as _sys
import types as _types

__version__ = "0.1.0"

# cnnlab.api's names, imported on first use (module-level __getattr__, PEP 562).
_LAZY = ("train", "load_run", "resume", "load_study", "Run", "Study", "Prediction", "ModelSummary",
         "MissingDependency")
# These two API functions share their names with a subpackage and a submodule (cnnlab/study/,
# cnnlab/summary.py); see _Package below.
_CALLABLE_SUBMODULES = ("study", "summary")


def __getattr__(name: str):
    if name in _LAZY:
        from cnnlab import api

        return getattr(api, name)
    raise AttributeError(f"module 'cnnlab' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY) | set(_CALLABLE_SUBMODULES))


class _CallableModule(_types.ModuleType):
    """A submodule that is also an API function: cnnlab.study is still the package
    cnnlab/study/ (cnnlab.study.load_study, monkeypatching, pickling by reference all
    work), and calling it calls cnnlab.api.study."""

    def __call__(self, *args, **kwargs):
        from cnnlab import api

        return getattr(api, self.__name__.rpartition(".")[2])(*args, **kwargs)


def _api_entry(name: str) -> property:
    """cnnlab.<name>: the submodule, made callable, once something imported it; until then
    cnnlab.api.<name> itself (so that the attribute costs no torch import). The import
    system's own `setattr(cnnlab, name, submodule)` is absorbed: the submodule is in
    sys.modules, which this getter reads."""
    overrides: dict = {}

    def get(package):
        if name in overrides:
            return overrides[name]
        module = _sys.modules.get(f"{__name__}.{name}")
        if module is None:
            from cnnlab import api

            return getattr(api, name)
        if not isinstance(module, _CallableModule):
            module.__class__ = _CallableModule
        return module

    def set_(package, value):
        if isinstance(value, _types.ModuleType):
            overrides.pop(name, None)
        else:  # an explicit assignment (a test's monkeypatch) wins until it is undone
            overrides[name] = value

    return property(get, set_)


class _Package(_types.ModuleType):
    study = _api_entry("study")
    summary = _api_entry("summary")


_sys.modules[__name__].__class__ = _Package


def versions() -> dict:
    """The versions a run or study records. Does not import torch or numpy: it reads the
    loaded module's version when there is one, else the installed package's."""
    import platform
    import sys
    from importlib import metadata

    def version(name: str) -> str:
        module = sys.modules.get(name)
        if module is not None:
            return module.__version__
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {"cnnlab": __version__, "torch": version("torch"), "numpy": version("numpy"),
            "python": sys.version.split()[0], "platform": platform.platform()}


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC 7B13"; some ARM boards say "Hardware" or "cpu model"),
    or the machine type when the OS does not say. Float rounding, and with it the accuracies
    of fragile networks, can move with it."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.split(":", 1)[0].strip().lower() in ("model name", "hardware", "cpu model"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
