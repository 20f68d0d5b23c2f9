"""Lightning glue mixed into a LightningModule: :class:`MaskedL1Mixin` (math in ``functional.l1``)."""

from lightning_gradmask.mixins.masked_l1 import MaskedL1Mixin, MaskedL1Term

__all__ = ["MaskedL1Mixin", "MaskedL1Term"]
