"""Lightning glue: one callback per file, each deciding *when* the pure tensor code runs."""

from lightning_gradmask.callbacks.gradient_mask import GradientMask

__all__ = ["GradientMask"]
