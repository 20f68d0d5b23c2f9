"""The errors of lightning_gradmask.

Every configuration mistake (a bad argument, a spec naming no parameter, a wrong shape) raises
:class:`GradmaskConfigError` or a subclass, before the first training step and with the model
untouched; catch the subclasses only to tell a mask, column or noise mistake apart::

    try:
        trainer.fit(model, data)
    except GradmaskConfigError as err:   # any configuration mistake of this package
        print(err)                       # names the argument, the parameter and the closest names

:class:`UnsupportedStrategyError` is not a configuration mistake of ours: the Trainer's strategy
shards or hides what the callback needs (a ``RuntimeError``).
"""

from __future__ import annotations

__all__ = [
    "ColumnSpecError",
    "GradmaskConfigError",
    "GradmaskConfigTypeError",
    "MaskSpecError",
    "NoiseStdError",
    "NonFiniteLossError",
    "UnsupportedStrategyError",
]


class GradmaskConfigError(ValueError):
    """A callback, mixin or function of this package was configured wrongly.

    The message names the argument, what was wrong and, where it helps, the closest valid names.
    """


class GradmaskConfigTypeError(GradmaskConfigError, TypeError):
    """An argument has the wrong type (``seed=1.5``, ``relative="yes"``); also a ``TypeError``."""


class MaskSpecError(GradmaskConfigError):
    """A mask specification or a parameter selector (``params``) cannot be applied to the model.

    The message names the spec key, the parameter and what was wrong.
    """


class ColumnSpecError(MaskSpecError):
    """The blinded columns or the layer cannot be applied to the model.

    Raised before anything on the model is changed. The message names the column, the layer and
    what was wrong (available names, the layer's input size, the closest layer names).
    """


class NoiseStdError(GradmaskConfigError):
    """A noise standard deviation (or a schedule's value at some step) is not a finite number >= 0."""


class UnsupportedStrategyError(RuntimeError):
    """The Trainer's strategy hides or shards gradients in a way the callback cannot serve."""


class NonFiniteLossError(ValueError):
    """The loss (or a Hessian-vector product) is NaN or infinite.

    A subclass of :class:`ValueError`, so ``except ValueError`` still catches it, while a caller that
    wants to skip a step on a diverged loss can catch exactly this class::

        try:
            op = HessianOperator.from_module(model, closure)  # lightning_gradmask.curvature
        except NonFiniteLossError:
            return  # nothing sensible to measure
    """
