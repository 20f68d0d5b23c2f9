"""Leave every random number generator exactly as it was: torch CPU and CUDA, Python, NumPy."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import torch


@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Save the global RNG states on entry and restore them on exit (also on an exception).

    Covers torch's CPU generator, every CUDA device's generator when CUDA is initialized, Python's
    :mod:`random` and NumPy's global generator when NumPy is imported. Iterating a shuffling
    ``DataLoader`` or drawing a random tensor inside the block leaves the training run's random
    stream untouched.
    """
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    python = random.getstate()
    numpy_state: Any = None
    numpy_random: Any = None
    try:
        import numpy

        numpy_random = numpy.random
        numpy_state = numpy_random.get_state()
    except ImportError:  # pragma: no cover - numpy ships with every torch wheel we test
        pass
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(python)
        if numpy_random is not None:
            numpy_random.set_state(numpy_state)
