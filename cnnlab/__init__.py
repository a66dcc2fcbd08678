"""cnnlab: ablation studies of small CNNs over seeds, with honest statistics.

Importing this package is cheap on purpose: torch, numpy and matplotlib are imported
only by the modules that need them, so `cnnlab --help` stays fast.
"""

__version__ = "0.1.0"
