"""Lightning glue: one callback per file, each deciding *when* the pure tensor code runs."""

from lightning_gradmask.callbacks.blinding import SensitiveColumnBlinding
from lightning_gradmask.callbacks.gradient_mask import GradientMask
from lightning_gradmask.callbacks.hessian import HessianMonitor
from lightning_gradmask.callbacks.noise import GradientNoise, WeightNoise

__all__ = ["GradientMask", "GradientNoise", "HessianMonitor", "SensitiveColumnBlinding", "WeightNoise"]
