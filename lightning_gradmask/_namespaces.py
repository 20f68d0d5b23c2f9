"""Lightning ships under two names: ``lightning.pytorch`` and the standalone ``pytorch_lightning``.

They are separate copies of the same classes, so ``isinstance`` against one namespace's class is
False for the other's objects, and each Trainer expects its own ``Callback``. Everything here
works with either, whichever the user imports:

* :class:`Callback` is the base of every callback in this package. It subclasses
  ``lightning.pytorch.Callback`` and, when ``pytorch_lightning`` is installed, also
  ``pytorch_lightning.Callback`` (importing it costs about 60 ms once ``lightning`` is imported).
* :func:`lightning_classes` collects one class by name from every installed namespace, for
  ``isinstance`` checks on strategies, callbacks and modules.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

import lightning.pytorch as _lightning_pytorch


def _import_standalone() -> object | None:
    try:
        return importlib.import_module("pytorch_lightning")
    except ImportError:
        return None


_STANDALONE = _import_standalone()


def namespaces() -> list[object]:
    """The installed Lightning namespaces: ``lightning.pytorch``, then ``pytorch_lightning`` if present."""
    found: list[object] = [_lightning_pytorch]
    standalone = _STANDALONE if _STANDALONE is not None else sys.modules.get("pytorch_lightning")
    if standalone is not None:
        found.append(standalone)
    return found


def lightning_classes(module: str, name: str) -> tuple[type, ...]:
    """``name`` from ``<namespace>.<module>`` of every installed namespace (where it exists).

    ``lightning_classes("strategies", "DDPStrategy")`` is the DDP strategy class of
    ``lightning.pytorch`` and of ``pytorch_lightning``; an empty ``module`` means the top level.
    """
    found: list[type] = []
    for namespace in namespaces():
        base = namespace.__name__  # type: ignore[attr-defined]
        try:
            holder = importlib.import_module(f"{base}.{module}") if module else namespace
        except ImportError:  # pragma: no cover - a namespace without that submodule
            continue
        cls = getattr(holder, name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def trainer_callbacks(trainer: object) -> list[Any]:
    """``trainer.callbacks`` of a Trainer of either namespace (an attribute the Trainer sets at run time)."""
    return list(getattr(trainer, "callbacks", None) or [])


def module_overrides(pl_module: object, hook: str) -> bool:
    """Whether ``pl_module``'s class (of either namespace) overrides the ``LightningModule`` hook ``hook``."""
    own = getattr(type(pl_module), hook, None)
    for base in lightning_classes("", "LightningModule"):
        if isinstance(pl_module, base):
            return own is not getattr(base, hook, None)
    return own is not None


if TYPE_CHECKING:
    from lightning.pytorch.callbacks import Callback
else:
    _BASES = lightning_classes("callbacks", "Callback")

    class Callback(*_BASES):
        """A ``Callback`` of ``lightning.pytorch`` and, when installed, of ``pytorch_lightning`` too."""

