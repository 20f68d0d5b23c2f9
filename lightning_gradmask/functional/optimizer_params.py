"""The ids of an optimizer's parameters, for hooks that run at every optimizer step."""

from __future__ import annotations

import weakref
from typing import Any

import torch

__all__ = ["OptimizerParamIds"]


class OptimizerParamIds:
    """``ids(optimizer)``: the set of ``id()`` of every parameter in ``optimizer.param_groups``.

    The set is rebuilt only when the groups change (a group added, as ``BackboneFinetuning`` does
    mid-run, or a group's ``params`` list replaced or resized), so a hook that runs at every step pays
    for it once per optimizer, not per step. Optimizers are held weakly; a pickled copy starts empty.

    Replacing an element of a group's ``params`` list in place is not seen: assign a new list instead
    (``GradientMask(compact=True)``'s swap does).
    """

    def __init__(self) -> None:
        self._cache: weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple[tuple[Any, ...], set[int]]] = (
            weakref.WeakKeyDictionary()
        )

    def __call__(self, optimizer: torch.optim.Optimizer) -> set[int]:
        layout = tuple((id(group["params"]), len(group["params"])) for group in optimizer.param_groups)
        cached = self._cache.get(optimizer)
        if cached is not None and cached[0] == layout:
            return cached[1]
        ids = {id(param) for group in optimizer.param_groups for param in group["params"]}
        self._cache[optimizer] = (layout, ids)
        return ids

    def clear(self) -> None:
        """Forget every optimizer."""
        self._cache.clear()

    def __reduce__(self) -> tuple[type[OptimizerParamIds], tuple[()]]:
        # a cache: callbacks holding one are pickled for ddp_spawn, where it starts empty
        return (OptimizerParamIds, ())
