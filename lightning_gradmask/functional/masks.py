"""Mask specifications: from what a user writes to one tensor per parameter.

A *spec* maps parameter names (or ``re:`` regular expressions over them) to a
*mask value*. This module turns a spec into ``{parameter name: mask tensor}``
and holds every check a spec must pass. It has no Lightning dependency: a spec
is resolved against any ``nn.Module``.

Accepted mask values, per key:

* a dense tensor of the parameter's shape: ``bool``, or numbers that are all 0
  or 1 (or any finite real numbers where per-entry weights are allowed),
* a ``torch.sparse_coo_tensor`` of the parameter's shape: the entries at its stored
  indices are selected, unless the value stored there is an explicit 0 / ``False``
  (an index stored twice is selected when either value is nonzero; values are never
  summed, and a negative or out-of-range index is an error),
* a list of index tuples (coordinates of the selected entries); for a 1-D
  parameter plain integers are accepted too,
* a Python ``bool``, broadcast to the whole parameter,
* a callable ``(name, param) -> tensor or bool``, whose result is checked like
  any other value.

The whole spec may also be a path to a ``.safetensors`` or ``.pt`` file that
maps names to mask tensors. A ``.pt`` file is read with ``weights_only=True``.

Example:
    >>> import torch
    >>> from torch import nn

    >>> net = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    >>> masks = resolve_masks(
    ...     {"0.weight": [[0, 0], [1, 2]], "re:.*\\\\.bias": False}, net)
    >>> masks["0.weight"]
    tensor([[ True, False, False],
            [False, False,  True]])
    >>> sorted(masks)
    ['0.bias', '0.weight', '2.bias']
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from lightning_gradmask.errors import MaskSpecError
from lightning_gradmask.functional.selection import match_parameters
from lightning_gradmask.functional.sharding import is_sharded

__all__ = [
    "MaskSpec",
    "MaskValue",
    "load_mask_file",
    "mask_from_value",
    "resolve_masks",
]

MaskValue = Union[torch.Tensor, bool, list, tuple, Callable[[str, nn.Parameter], Any]]
"""One parameter's mask, in any of the accepted forms."""

MaskSpec = Union[Mapping[str, MaskValue], str, os.PathLike]
"""A mapping from parameter names or ``re:`` patterns to mask values, or a mask file path."""


def load_mask_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or ``.pt`` file that maps parameter names to mask tensors.

    ``.pt`` files are loaded with ``weights_only=True``, so a mask file can never run code.

    Raises:
        MaskSpecError: the file is missing, has another suffix, cannot be read, or holds
            anything other than a mapping of names to tensors.
    """
    file = Path(path)
    if not file.is_file():
        raise MaskSpecError(f"mask file {str(file)!r} does not exist")
    suffix = file.suffix.lower()
    if suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"reading {str(file)!r} needs the safetensors package: "
                "pip install 'lightning_gradmask[files]'"
            ) from err
        try:
            content: Any = load_file(str(file))
        except Exception as err:
            raise MaskSpecError(f"mask file {str(file)!r} is not a readable safetensors file: {err}") from err
    elif suffix in (".pt", ".pth"):
        try:
            content = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:
            raise MaskSpecError(
                f"mask file {str(file)!r} could not be read with torch.load(weights_only=True): {err}"
            ) from err
    else:
        raise MaskSpecError(
            f"mask file {str(file)!r} has suffix {suffix!r}; expected '.safetensors' or '.pt'"
        )
    if not isinstance(content, Mapping):
        raise MaskSpecError(
            f"mask file {str(file)!r} holds a {type(content).__name__}; "
            "expected a mapping from parameter names to mask tensors"
        )
    for key, value in content.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise MaskSpecError(
                f"mask file {str(file)!r} holds {type(key).__name__} key {key!r} -> "
                f"{type(value).__name__}; expected only parameter names mapped to tensors"
            )
    return dict(content)


def mask_from_value(
    value: Any,
    name: str,
    param: torch.Tensor,
    *,
    key: str | None = None,
    allow_real: bool = False,
) -> torch.Tensor:
    """Turn one mask value into a CPU tensor of ``param``'s shape.

    Returns a ``bool`` tensor, or with ``allow_real=True`` a float32 tensor when the value holds
    numbers other than 0 and 1 (per-entry weights). The result never shares memory with ``value``.
    A sharded (FSDP2 ``DTensor``) parameter has its global shape here, and the mask is whole; a
    ``DTensor`` mask (from a callable given the sharded parameter) is gathered whole.

    Raises:
        MaskSpecError: naming the key and parameter, for a wrong shape, numbers other than 0/1
            (or non-finite numbers), coordinates out of range, or an unsupported type.
    """
    where = f"mask for parameter {name!r}" + (f" (spec key {key!r})" if key is not None and key != name else "")
    if isinstance(param, nn.parameter.UninitializedParameter):
        raise MaskSpecError(
            f"{where}: the parameter is not initialized yet (a lazy module such as nn.LazyLinear), so it has "
            "no shape to mask; run one forward pass with a dummy batch before Trainer.fit (for example at "
            "the end of __init__), or build the layer with its sizes (nn.Linear(in_features, out_features))"
        )
    shape = tuple(param.shape)
    if callable(value) and not isinstance(value, torch.Tensor):
        try:
            produced = value(name, param)
        except Exception as err:
            raise MaskSpecError(f"{where}: the mask callable raised {type(err).__name__}: {err}") from err
        if callable(produced) and not isinstance(produced, torch.Tensor):
            raise MaskSpecError(f"{where}: the mask callable returned another callable")
        return mask_from_value(produced, name, param, key=key, allow_real=allow_real)
    if isinstance(value, bool):
        return torch.full(shape, value, dtype=torch.bool)
    if is_sharded(value):  # a callable's mask computed on a sharded (FSDP2) parameter: gathered whole
        value = value.full_tensor()
    if isinstance(value, torch.Tensor):
        if value.layout == torch.sparse_coo:
            return _from_sparse(value, where, shape)
        if value.layout != torch.strided:
            raise MaskSpecError(f"{where}: tensor layout {value.layout} is not supported; use dense or sparse COO")
        return _from_dense(value, where, shape, allow_real)
    if isinstance(value, (list, tuple)):
        return _from_coordinates(value, where, shape)
    raise MaskSpecError(
        f"{where}: got {type(value).__name__}; expected a tensor, a sparse COO tensor, a list of "
        "index tuples, a bool, or a callable (name, param) -> tensor"
    )


def resolve_masks(
    spec: MaskSpec,
    module: nn.Module,
    *,
    allow_real: bool = False,
    parameter: str = "spec",
) -> dict[str, torch.Tensor]:
    """Resolve a whole spec against ``module.named_parameters()``.

    Args:
        spec: mapping of names / ``re:`` patterns to mask values, or a mask file path.
        module: the module whose parameters the names refer to.
        allow_real: accept real-valued per-entry weights (for penalties) besides 0/1.
        parameter: how error messages name the argument the spec came from.

    Returns:
        ``{parameter name: mask}`` in the module's parameter order, only for named parameters.
        Masks are CPU tensors; the module is never modified.

    Raises:
        MaskSpecError: for any problem; nothing is resolved partially.
    """
    if isinstance(spec, (str, os.PathLike)):
        spec = load_mask_file(spec)
    if not isinstance(spec, Mapping):
        raise MaskSpecError(
            f"{parameter} must be a mapping from parameter names (or 're:' patterns) to masks, "
            f"or a path to a mask file; got {type(spec).__name__}"
        )
    named = dict(module.named_parameters(remove_duplicate=False))
    claimed: dict[int, tuple[str, str]] = {}  # id(param) -> (spec key, name)
    resolved: dict[str, torch.Tensor] = {}
    for key, value in spec.items():
        if not isinstance(key, str):
            raise MaskSpecError(f"{parameter} keys must be parameter names or 're:' patterns; got {key!r}")
        for name in match_parameters(key, named, parameter=parameter):
            param = named[name]
            if id(param) in claimed:
                other_key, other_name = claimed[id(param)]
                same = "" if other_name == name else f" (shared with {other_name!r})"
                raise MaskSpecError(
                    f"{parameter} keys {other_key!r} and {key!r} both claim parameter {name!r}{same}; "
                    "give each parameter exactly one mask"
                )
            claimed[id(param)] = (key, name)
            resolved[name] = mask_from_value(value, name, param, key=key, allow_real=allow_real)
    order = {name: index for index, name in enumerate(named)}
    return dict(sorted(resolved.items(), key=lambda item: order[item[0]]))


# --------------------------------------------------------------------------- helpers


def _check_shape(where: str, got: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if got != expected:
        raise MaskSpecError(f"{where}: mask shape {list(got)} does not match parameter shape {list(expected)}")


def _from_dense(value: torch.Tensor, where: str, shape: tuple[int, ...], allow_real: bool) -> torch.Tensor:
    _check_shape(where, tuple(value.shape), shape)
    _check_not_meta(value, where)
    value = value.detach().to("cpu")
    if value.dtype == torch.bool:
        return value.clone()
    if value.is_complex():
        raise MaskSpecError(f"{where}: complex masks are not supported")
    numbers = value.to(torch.float64)
    if not bool(torch.isfinite(numbers).all()):
        bad = "NaN" if bool(torch.isnan(numbers).any()) else "inf"
        raise MaskSpecError(f"{where}: the mask holds {bad}")
    is_binary = (numbers == 0) | (numbers == 1)
    if bool(is_binary.all()):
        return numbers.ne(0)
    if allow_real:
        return numbers.to(torch.float32)
    offending = numbers[~is_binary].unique()[:5].tolist()
    raise MaskSpecError(
        f"{where}: a numeric mask must hold only 0 and 1; found {', '.join(_fmt(v) for v in offending)}"
    )


def _from_sparse(value: torch.Tensor, where: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The stored indices count, not the coalesced sum: an entry is selected when any value stored
    for it is nonzero (``coalesce()`` would sum a stored 1 and a stored -1 to 0 and drop the entry)."""
    _check_shape(where, tuple(value.shape), shape)
    _check_not_meta(value, where)
    value = value.detach().to("cpu")
    indices, values = value._indices(), value._values()
    if values.dim() != 1 or indices.shape[0] != len(shape):
        raise MaskSpecError(f"{where}: hybrid sparse tensors are not supported")
    if values.is_floating_point() and not bool(torch.isfinite(values).all()):
        raise MaskSpecError(f"{where}: the sparse mask stores non-finite values")
    if indices.numel():
        sizes = torch.tensor(shape, dtype=indices.dtype).unsqueeze(1)
        bad = ((indices < 0) | (indices >= sizes)).any(dim=0).nonzero()
        if bad.numel():
            index = tuple(int(i) for i in indices[:, int(bad[0])].tolist())
            raise MaskSpecError(
                f"{where}: the sparse mask stores index {index}, out of range for parameter shape {list(shape)}"
                f"{' (negative indices do not count from the end)' if min(index) < 0 else ''}"
            )
    keep = values.ne(0)
    mask = torch.zeros(shape, dtype=torch.bool)
    if len(shape) == 0:
        mask.fill_(bool(keep.any()))
    else:
        mask[tuple(indices[:, keep])] = True
    return mask


def _check_not_meta(value: torch.Tensor, where: str) -> None:
    if value.device.type == "meta":
        raise MaskSpecError(
            f"{where}: the mask is on the 'meta' device and holds no values; build it on the CPU "
            "(or any real device), e.g. with torch.ones(shape, dtype=torch.bool)"
        )


def _from_coordinates(value: list | tuple, where: str, shape: tuple[int, ...]) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    if len(value) == 0:
        return mask
    rows: list[tuple[int, ...]] = []
    for entry in value:
        if isinstance(entry, torch.Tensor):
            entry = entry.tolist()
        coordinate = (entry,) if isinstance(entry, int) and not isinstance(entry, bool) else entry
        if not isinstance(coordinate, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in coordinate
        ):
            raise MaskSpecError(
                f"{where}: coordinates must be tuples of integers (one per dimension); got {entry!r}"
            )
        if len(coordinate) != len(shape):
            raise MaskSpecError(
                f"{where}: coordinate {tuple(coordinate)} has {len(coordinate)} indices but the parameter "
                f"has shape {list(shape)} ({len(shape)} dimensions)"
            )
        for index, size in zip(coordinate, shape):
            if not 0 <= index < size:
                raise MaskSpecError(
                    f"{where}: coordinate {tuple(coordinate)} is out of range for parameter shape {list(shape)}"
                )
        rows.append(tuple(coordinate))
    mask[tuple(torch.tensor(rows, dtype=torch.long).T)] = True
    return mask


def _fmt(number: float) -> str:
    return str(int(number)) if math.isfinite(number) and number == int(number) else f"{number:g}"
