"""Lightning glue: one callback per file, each deciding *when* the pure tensor code runs."""

from lightning_gradmask.callbacks.gradient_mask import GradientMask
from lightning_gradmask.callbacks.gradient_noise import GradientNoise
from lightning_gradmask.callbacks.hessian_monitor import HessianMonitor
from lightning_gradmask.callbacks.sensitive_column_blinding import SensitiveColumnBlinding
from lightning_gradmask.callbacks.weight_noise import WeightNoise

__all__ = ["GradientMask", "GradientNoise", "HessianMonitor", "SensitiveColumnBlinding", "WeightNoise"]
