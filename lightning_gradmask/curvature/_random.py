"""Seeded random vectors that are identical on every process and every device.

Vectors are drawn on the CPU from a ``torch.Generator`` and then moved, so a given seed gives the
same probes on every DDP rank whatever its device.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

Seed = Union[int, torch.Generator]
"""An ``int`` seed or a CPU ``torch.Generator`` (which is advanced in place)."""

__all__ = ["Seed", "as_generator", "gaussian", "rademacher", "subseed"]


def subseed(seed: int, stream: int) -> int:
    """A deterministic seed for a sub-task (no Python ``hash``: it differs between processes)."""
    return (int(seed) * 1_000_003 + 7919 * (int(stream) + 1)) % (2**62)


def as_generator(seed: Seed) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        if seed.device.type != "cpu":
            raise ValueError("pass a CPU torch.Generator (probes are drawn on the CPU, then moved)")
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or a torch.Generator, got {type(seed).__name__}")
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def gaussian(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def rademacher(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    bits = torch.randint(0, 2, shape, generator=gen, dtype=torch.int8)
    return (bits * 2 - 1).to(device=device, dtype=dtype)
