"""lightning_gradmask: Lightning callbacks that control which weights learn and what they learn from.

Attach the callbacks to a ``lightning.Trainer``; mix :class:`MaskedL1Mixin` into a LightningModule.

* :class:`GradientMask` -- only chosen weight entries are updated, exactly::

      L.Trainer(callbacks=[GradientMask(trainable={"net.0.weight": edge_mask, "re:.*\\\\.bias": False})])

* :class:`SensitiveColumnBlinding` -- the model provably neither reads nor learns from chosen columns::

      L.Trainer(callbacks=[SensitiveColumnBlinding(columns=["age", "sex"], feature_names=names, layer="net.0")])
      verify_independence(model, inputs, columns=[0, 1]).independent   # True: outputs never moved

* :class:`MaskedL1Mixin` -- L1 on chosen edges, added to ``training_step``'s loss::

      class Model(MaskedL1Mixin, L.LightningModule):
          def __init__(self):
              super().__init__()
              self.net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
              self.register_masked_l1("net.0.weight", mask=edges, strength=1e-3)

* :class:`HessianMonitor` -- trace, top eigenvalues, diagonal and spectral density at epoch end::

      L.Trainer(callbacks=[HessianMonitor(loss_fn=lambda m, b: F.mse_loss(m(b[0]), b[1]), top_k=3)])

* :class:`GradientNoise`, :class:`WeightNoise` -- seeded noise, identical on every rank::

      L.Trainer(callbacks=[GradientNoise(eta=0.3, gamma=0.55), WeightNoise(std=1e-2, relative=True)])

* Without a Trainer (pure torch, :mod:`lightning_gradmask.functional`): :func:`select_parameters`
  (what an argument ``params`` selects), :func:`resolve_masks` (specs to masks, with every check),
  :class:`FrozenEntries` (gradient masking and exact restore), :class:`CompactEntries` (an optimizer
  that holds only the trainable entries: what ``GradientMask(compact=True)`` runs), :func:`verify_independence`, and
  :mod:`lightning_gradmask.curvature` (Hessian-vector products, Lanczos, trace, diagonal, density on a
  bare ``nn.Module``).

* Errors: every configuration mistake raises :class:`GradmaskConfigError` (a ``ValueError``) or a
  subclass, before the first step, with the model untouched.
"""

from lightning_gradmask.callbacks.gradient_mask import GradientMask
from lightning_gradmask.callbacks.gradient_noise import GradientNoise
from lightning_gradmask.callbacks.hessian_monitor import HessianMonitor
from lightning_gradmask.callbacks.sensitive_column_blinding import SensitiveColumnBlinding
from lightning_gradmask.callbacks.weight_noise import WeightNoise
from lightning_gradmask.errors import (
    ColumnSpecError,
    GradmaskConfigError,
    GradmaskConfigTypeError,
    MaskSpecError,
    NoiseStdError,
    NonFiniteLossError,
    UnsupportedStrategyError,
)
from lightning_gradmask.functional.blinding import IndependenceReport, verify_independence
from lightning_gradmask.functional.compact import CompactEntries
from lightning_gradmask.functional.frozen import FrozenEntries
from lightning_gradmask.functional.masks import resolve_masks
from lightning_gradmask.functional.selection import select_parameters
from lightning_gradmask.mixins.masked_l1 import MaskedL1Mixin, MaskedL1Term

__version__ = "0.1.0"

__all__ = [
    "ColumnSpecError",
    "CompactEntries",
    "FrozenEntries",
    "GradientMask",
    "GradientNoise",
    "GradmaskConfigError",
    "GradmaskConfigTypeError",
    "HessianMonitor",
    "IndependenceReport",
    "MaskSpecError",
    "MaskedL1Mixin",
    "MaskedL1Term",
    "NoiseStdError",
    "NonFiniteLossError",
    "SensitiveColumnBlinding",
    "UnsupportedStrategyError",
    "WeightNoise",
    "resolve_masks",
    "select_parameters",
    "verify_independence",
]
