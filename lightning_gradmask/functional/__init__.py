"""Pure torch, no Lightning: the math each callback runs, one feature per module, usable without a Trainer.

* :mod:`~lightning_gradmask.functional.selection` -- which parameters an argument ``params`` selects.
* :mod:`~lightning_gradmask.functional.masks` -- mask specs to boolean masks, with every check.
* :mod:`~lightning_gradmask.functional.frozen` -- :class:`FrozenEntries`: gradient masking and exact restore.
* :mod:`~lightning_gradmask.functional.constraints` -- the frozen entries and optimizer-step hooks of a module.
* :mod:`~lightning_gradmask.functional.compact` -- :class:`CompactEntries`: optimizers that hold only trainable entries.
* :mod:`~lightning_gradmask.functional.blinding` -- column resolution, severing, input fills, independence check.
* :mod:`~lightning_gradmask.functional.noise` -- seeded noise draws and std schedules.
* :mod:`~lightning_gradmask.functional.l1` -- masked L1 penalty and proximal step.
* :mod:`~lightning_gradmask.functional.optimizer_params` -- the cached ids of an optimizer's parameters, for per-step hooks.
"""
