"""The training engine: one epoch loop for every network.

    run.py      Run: one run's split, tensors, model, optimizer, evaluation, checkpoints,
                metrics and result.json (its run directory's format: cnnlab.rundir)
    loop.py     fit, the one epoch loop, and train_run (one run)
    steps.py    step functions: NativeSteps (the lab's networks on cnnlab's C kernels),
                AutogradSteps (any nn.Module)
    batched.py  StackedSteps and train_batched: K seeds of one variant as one network

The block math lives in torch's modules (cnnlab.model: the reference and the fallback), in
the C kernels (cnnlab/native, driven by cnnlab.fastops.TrainStep) and in the stacked form
(batched.StackedNet); docs/architecture.md follows the data through them.
"""

from cnnlab.engine.loop import fit, train_run

__all__ = ["fit", "train_run"]
