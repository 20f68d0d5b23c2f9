"""lightning_gradmask: Lightning callbacks that control which weights learn and what they learn from.

Public API:

* :class:`GradientMask` -- only chosen weight entries are updated, exactly::

      trainer = L.Trainer(callbacks=[GradientMask(trainable={"net.0.weight": edge_mask})])

* :func:`resolve_masks` / :class:`MaskSpecError` -- resolve and check a mask spec without a Trainer.
* :class:`FrozenEntries` -- the pure mask mechanism (gradient masking and exact restore).
"""

from lightning_gradmask._distributed import UnsupportedStrategyError
from lightning_gradmask.callbacks.gradient_mask import GradientMask
from lightning_gradmask.masking import FrozenEntries
from lightning_gradmask.specs import MaskSpecError, resolve_masks

__version__ = "0.1.0"

__all__ = [
    "FrozenEntries",
    "GradientMask",
    "MaskSpecError",
    "UnsupportedStrategyError",
    "resolve_masks",
]
