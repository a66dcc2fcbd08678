"""cnnlab: ablation studies of small CNNs over seeds, with honest statistics.

Importing this package is cheap on purpose: torch, numpy and matplotlib are imported
only by the modules that need them, so `cnnlab --help` stays fast.
"""

__version__ = "0.1.0"


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
    """The CPU's model name ("AMD EPYC 7B13"), or the machine type when the OS does not say.
    Float rounding, and with it the accuracies of fragile networks, can move with it."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == "model name":
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
