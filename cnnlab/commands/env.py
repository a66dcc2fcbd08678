"""cnnlab env: what a bug report needs (versions, device, data cache, optional extras)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("env", help="print versions, devices and data locations for bug reports")
    p.set_defaults(func=run)


def run(args) -> int:
    import importlib.util
    import shutil

    from cnnlab.data import cache_dir
    from cnnlab import versions
    from cnnlab.engine.run import device_name, kernels, resolve_device

    for k, v in versions().items():
        print(f"{k:<10} {v}")
    dev = resolve_device("auto")
    print(f"{'device':<10} {device_name(dev)}")
    print(f"{'kernels':<10} {kernels(dev)}")
    print(f"{'data':<10} {cache_dir()}")
    print(f"{'dot':<10} {shutil.which('dot') or 'not found (model graphs fall back to a layer list)'}")
    print(f"{'ray':<10} {'installed' if importlib.util.find_spec('ray') else 'not installed (pip install cnnlab[ray])'}")
    return 0
