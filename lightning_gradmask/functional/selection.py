"""Which parameters an argument ``params`` selects: one grammar and one lookup for every feature.

A selector is one item or a sequence of items; an item is

* a full parameter name (``"net.0.weight"``),
* ``"re:"`` + a regular expression that must match a whole name (``"re:.*\\.bias"``),
* an ``nn.Module`` subclass (``nn.Linear``): every parameter those modules own directly.

Tied parameters (one tensor under several names) count once: they are reported under their first
name in ``named_parameters()`` order and selectable under any of their names. A name that matches
nothing raises :class:`~lightning_gradmask.errors.MaskSpecError` naming the argument and the closest
names::

    select_parameters(model, ["re:net\\.0\\..*", nn.LayerNorm], parameter="GradientNoise(params=...)")
    # -> ['net.0.weight', 'net.0.bias', 'norm.weight', 'norm.bias']

Pure torch: no Lightning import.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Union

import torch
from torch import nn

from lightning_gradmask.errors import GradmaskConfigTypeError, MaskSpecError

__all__ = [
    "REGEX_PREFIX",
    "ParamSelector",
    "ParameterTable",
    "closest_names",
    "match_parameters",
    "normalize_selector",
    "select_parameters",
]

REGEX_PREFIX = "re:"

SelectorItem = Union[str, type[nn.Module]]
ParamSelector = Union[SelectorItem, Sequence[SelectorItem]]
"""One item or a sequence of items: parameter names, ``re:`` patterns, ``nn.Module`` subclasses."""


def match_parameters(key: str, names: Iterable[str], *, parameter: str = "spec") -> list[str]:
    """Parameter names selected by one string item: an exact name, or ``re:`` + a regex (full match).

    Raises:
        MaskSpecError: the name is unknown (the closest names are listed), the regex is invalid,
            or it matches nothing.
    """
    names = list(names)
    if key.startswith(REGEX_PREFIX):
        pattern_text = key[len(REGEX_PREFIX) :]
        try:
            pattern = re.compile(pattern_text)
        except re.error as err:
            raise MaskSpecError(f"{parameter} key {key!r}: invalid regular expression ({err})") from err
        matched = [name for name in names if pattern.fullmatch(name)]
        if not matched:
            raise MaskSpecError(
                f"{parameter} key {key!r}: the regular expression matches no parameter name "
                f"(it must match a whole name; names look like {_preview(names)})"
            )
        return matched
    if key in names:
        return [key]
    close = closest_names(key, names)
    hint = f"; closest names: {', '.join(repr(n) for n in close)}" if close else f"; names look like {_preview(names)}"
    raise MaskSpecError(f"{parameter} key {key!r}: the model has no parameter of that name{hint}")


def closest_names(key: str, names: Iterable[str], *, n: int = 3, cutoff: float = 0.5) -> list[str]:
    """The names most like ``key`` (at most ``n``), for "did you mean" hints in error messages."""
    return difflib.get_close_matches(key, list(names), n=n, cutoff=cutoff)


def normalize_selector(params: object, *, parameter: str = "params") -> list[SelectorItem]:
    """``params`` as a non-empty list of items, checked for type (not against a model).

    Raises:
        GradmaskConfigTypeError: not a name, a ``re:`` pattern, an ``nn.Module`` subclass or a non-empty
            sequence of them.
    """
    items = [params] if isinstance(params, (str, type)) else params
    if (
        not isinstance(items, Sequence)
        or isinstance(items, str)
        or not items
        or not all(_is_item(item) for item in items)
    ):
        raise GradmaskConfigTypeError(
            f"{parameter} must be a parameter name, a 're:' pattern, an nn.Module subclass, or a non-empty "
            f"list of them; got {params!r}"
        )
    return list(items)


def _is_item(item: object) -> bool:
    if isinstance(item, str):
        return bool(item)
    return isinstance(item, type) and issubclass(item, nn.Module)


class ParameterTable:
    """Unique parameters of a module in ``named_parameters()`` order, with their aliases (tied weights)."""

    def __init__(self, module: nn.Module, *, aliases: Mapping[str, str] | None = None) -> None:
        """``aliases``: extra names for existing ones (``{"net.0.weight": "net.0.weight_orig"}`` after pruning)."""
        self.module = module
        self._params: dict[str, torch.Tensor] = {}
        self._index: dict[int, int] = {}
        self._canonical: dict[int, str] = {}
        self._aliases: dict[int, list[str]] = {}
        self._all: dict[str, torch.Tensor] = {}
        for name, param in module.named_parameters(remove_duplicate=False):
            self._all[name] = param
            key = id(param)
            if key not in self._index:
                self._index[key] = len(self._params)
                self._canonical[key] = name
                self._params[name] = param
                self._aliases[key] = []
            self._aliases[key].append(name)
        for extra, name in (aliases or {}).items():
            self._all.setdefault(extra, self._all[name])

    @property
    def names(self) -> list[str]:
        """Canonical names (the first name of each parameter)."""
        return list(self._params)

    @property
    def all_names(self) -> list[str]:
        """Every name, aliases of tied parameters included."""
        return list(self._all)

    def canonical(self, param: torch.Tensor) -> str:
        """The first name of ``param``."""
        return self._canonical[id(param)]

    def param(self, name: str) -> torch.Tensor:
        """The parameter under ``name`` (any alias)."""
        return self._all[name]

    def index(self, name: str) -> int:
        """The position of the parameter among the unique ones."""
        return self._index[id(self._all[name])]

    def aliases(self, name: str) -> tuple[str, ...]:
        """Every name of the parameter under ``name``, the canonical one first."""
        return tuple(self._aliases[id(self._all[name])])

    def select(
        self, params: object, parameter: str = "params", among: list[str] | None = None, among_label: str = "the pool"
    ) -> list[str]:
        """Canonical names selected by the selector ``params``, in parameter order.

        ``among`` (canonical names) narrows the pool: a plain name outside it is an error that says so,
        calling the pool ``among_label``.
        """
        pool = set(among) if among is not None else None
        chosen: set[str] = set()
        for item in normalize_selector(params, parameter=parameter):
            if isinstance(item, type):
                chosen.update(self._owned_by(item, parameter, pool))
                continue
            if pool is not None and not item.startswith(REGEX_PREFIX) and item in self._all:
                if self.canonical(self._all[item]) not in pool:
                    raise MaskSpecError(
                        f"{parameter} key {item!r}: that parameter is not among the ones chosen by "
                        f"{among_label} ({', '.join(repr(n) for n in sorted(pool))})"
                    )
            candidates = list(self._all) if pool is None else [n for n in self._all if self.canonical(self._all[n]) in pool]
            chosen.update(self.canonical(self._all[name]) for name in match_parameters(item, candidates, parameter=parameter))
        return [name for name in self._params if name in chosen]

    def _owned_by(self, kind: type[nn.Module], parameter: str, pool: set[str] | None) -> list[str]:
        modules = [m for m in self.module.modules() if isinstance(m, kind)]
        if not modules:
            present = sorted({type(m).__name__ for m in self.module.modules() if m is not self.module})
            raise MaskSpecError(
                f"{parameter}: the model has no module of type {kind.__name__} "
                f"(its modules are: {', '.join(present) or 'none'})"
            )
        names = [self.canonical(p) for m in modules for _, p in m.named_parameters(recurse=False)]
        return [name for name in names if pool is None or name in pool]


def select_parameters(
    module: nn.Module, params: ParamSelector | None, *, parameter: str = "params", among: list[str] | None = None
) -> list[str]:
    """Canonical names of the parameters of ``module`` that ``params`` selects, in parameter order.

    ``params=None`` selects every parameter (or every name of ``among``). ``among`` narrows the pool to
    those canonical names.

    Raises:
        MaskSpecError: an item of the wrong type, a name or pattern matching nothing (the closest names
            are listed), a module type the model does not contain.
    """
    table = ParameterTable(module)
    if params is None:
        return table.names if among is None else [n for n in table.names if n in set(among)]
    return table.select(params, parameter, among)


def _preview(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (", ..." if len(names) > limit else "") if names else "(the model has no parameters)"
