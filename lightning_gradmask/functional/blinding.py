"""Sensitive-column blinding, as pure tensor and module code (no Lightning import).

A *blinded* column is an input feature (``nn.Linear``) or input channel (``nn.Conv1d``,
``nn.Conv2d``) of one layer that the model must not use. This module holds:

* :func:`find_layer` and :func:`resolve_columns`: turn what a user writes (a layer name, column
  names or indices) into a layer and a tuple of column indices, with every check and a clear
  :class:`ColumnSpecError` for each mistake;
* :func:`plan_blinding`: both of the above, plus the parameter-level mask (``False`` on the
  weights that read the columns: ``weight[:, c]`` for a Linear, ``weight[:, c, ...]`` for a
  convolution), ready for :class:`~lightning_gradmask.functional.frozen.FrozenEntries`;
* :func:`install_input_fill` / :func:`remove_input_fill`: a forward pre-hook on the layer that
  fills the columns of its input with 0 using ``masked_fill``, so ``inf`` or ``NaN`` in a blinded
  column is replaced too (``0 * inf`` would be ``nan``);
* :func:`verify_independence`: a check a user runs on a trained model and data: it perturbs the
  columns (large values, ``inf``, ``NaN``, noise, values of other rows) and reports whether the
  outputs (and gradients) stayed identical.

Example, without Lightning::

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    >>> plan = plan_blinding(net, ["b"], feature_names=["a", "b", "c"])
    >>> plan.layer_name, plan.columns, plan.weight_name
    ('0', (1,), '0.weight')
    >>> with torch.no_grad():
    ...     _ = net[0].weight.masked_fill_(~plan.trainable, 0)
    >>> handle = install_input_fill(plan.module, plan.columns)
    >>> x = torch.randn(5, 3)
    >>> y = x.clone(); y[:, 1] = float("nan")
    >>> bool(torch.equal(net(x), net(y)))
    True
    >>> verify_independence(net, x, ["b"], feature_names=["a", "b", "c"]).independent
    True
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_gradmask.errors import ColumnSpecError, GradmaskConfigError
from lightning_gradmask.functional.selection import closest_names
from lightning_gradmask.functional.sharding import replicated_like

__all__ = [
    "SUPPORTED_LAYERS",
    "BlindingPlan",
    "ColumnSpec",
    "IndependenceReport",
    "check_feature_names",
    "InputFill",
    "PerturbationCheck",
    "column_mask",
    "find_layer",
    "input_fills",
    "install_input_fill",
    "layer_input_size",
    "plan_blinding",
    "remove_input_fill",
    "resolve_columns",
    "sever_mask",
    "verify_independence",
]

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
"""Layer types whose input columns can be blinded (Linear: features; Conv1d/Conv2d: channels)."""

ColumnSpec = Union[int, str, Sequence[Union[int, str]]]
"""Blinded columns: integer indices, or names when ``feature_names`` is given (mixed is allowed)."""


# ---------------------------------------------------------------------------------------------
# layers and columns
# ---------------------------------------------------------------------------------------------
def _kind(module: nn.Module) -> str:
    for cls in SUPPORTED_LAYERS:
        if isinstance(module, cls):
            return cls.__name__
    return type(module).__name__


def _channel_trailing_dims(module: nn.Module) -> int:
    """How many dimensions, counted from the end of the layer's input, start at the column dim."""
    if isinstance(module, nn.Conv2d):
        return 3  # (N, C, H, W) or (C, H, W)
    if isinstance(module, nn.Conv1d):
        return 2  # (N, C, L) or (C, L)
    return 1  # Linear: (..., in_features)


def layer_input_size(module: nn.Module) -> int:
    """Number of columns the layer reads: ``in_features`` (Linear) or ``in_channels`` (Conv)."""
    if isinstance(module, nn.Linear):
        return int(module.in_features)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return int(module.in_channels)
    raise ColumnSpecError(f"{type(module).__name__} is not a supported layer type")


def find_layer(model: nn.Module, layer: str | None = None, *, parameter: str = "layer") -> tuple[str, nn.Module]:
    """The layer whose input columns are blinded, as ``(name, module)``.

    Args:
        model: the model; names are those of ``model.named_modules()``.
        layer: a module name such as ``"net.0"``. ``None`` picks the first ``nn.Linear``,
            ``nn.Conv1d`` or ``nn.Conv2d`` in ``model.named_modules()`` order (registration order,
            depth first), which is the input layer for the usual ``Sequential`` or
            ``__init__``-ordered model. Pass a name when another layer reads the raw input.
        parameter: how errors name the argument.

    Raises:
        ColumnSpecError: the name does not exist (the closest names are listed), the module's type
            is not supported, a convolution is grouped, a lazy layer is not initialized yet, or
            its weight is reparametrized.
    """
    modules = dict(model.named_modules())
    if layer is None:
        for name, module in modules.items():
            if isinstance(module, SUPPORTED_LAYERS):
                _check_layer(name, module, parameter)
                return name, module
        raise ColumnSpecError(
            f"{parameter}=None: the model has no nn.Linear, nn.Conv1d or nn.Conv2d to blind "
            f"(modules: {_preview([n for n in modules if n])})"
        )
    if not isinstance(layer, str):
        raise ColumnSpecError(f"{parameter} must be a module name (str) or None, got {type(layer).__name__}")
    if layer not in modules:
        close = closest_names(layer, [n for n in modules if n], cutoff=0.4)
        hint = f"; closest: {', '.join(repr(c) for c in close)}" if close else ""
        supported = [n for n, m in modules.items() if isinstance(m, SUPPORTED_LAYERS) and getattr(m, "groups", 1) == 1]
        raise ColumnSpecError(
            f"{parameter}={layer!r} is not a module of {type(model).__name__}{hint}. "
            f"Linear/Conv1d/Conv2d modules: {_preview(supported)}"
        )
    module = modules[layer]
    _check_layer(layer, module, parameter)
    return layer, module


def _check_layer(name: str, module: nn.Module, parameter: str) -> None:
    if not isinstance(module, SUPPORTED_LAYERS):
        raise ColumnSpecError(
            f"{parameter}={name!r} is a {type(module).__name__}; only nn.Linear (columns = input "
            "features), nn.Conv1d and nn.Conv2d (columns = input channels) can be blinded"
        )
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        raise ColumnSpecError(
            f"{parameter}={name!r} is a lazy layer that is not initialized yet; run one forward pass "
            "(or give its input size) before training"
        )
    if torch.nn.utils.parametrize.is_parametrized(module, "weight"):
        raise ColumnSpecError(
            f"{parameter}={name!r} has a parametrized weight (weight_norm, spectral_norm, pruning); "
            "blinding needs `weight` to be a plain parameter"
        )
    groups = getattr(module, "groups", 1)
    if groups != 1:
        raise ColumnSpecError(
            f"{parameter}={name!r} is a grouped convolution (groups={groups}); blinding supports "
            "groups=1 only (a grouped weight does not have one slice per input channel)"
        )


def resolve_columns(
    columns: ColumnSpec,
    size: int,
    feature_names: Sequence[str] | None = None,
    *,
    where: str = "the layer",
    allow_all: bool = False,
) -> tuple[int, ...]:
    """Column indices (sorted) from names and/or integer indices, with every check.

    Args:
        columns: a name, an index, or a sequence of them. Names need ``feature_names``.
        size: how many columns there are (the layer's input size).
        feature_names: the name of each column, in order; its length must equal ``size``.
        where: how errors describe what has ``size`` columns.
        allow_all: accept blinding every column (refused by default: the model could read nothing).

    Raises:
        ColumnSpecError: empty, names without ``feature_names``, an unknown name (the available
            names are listed), an index outside ``[0, size)``, the same column twice (also a name
            and an index meaning the same column), all columns, or ``feature_names`` of the
            wrong length or with repeated names.

    Example::

        >>> resolve_columns(["sex", 0], 4, ["age", "sex", "bmi", "bp"])
        (0, 1)
    """
    check_feature_names(feature_names)
    items = _as_items(columns)
    if not items:
        raise ColumnSpecError("columns is empty: name at least one column to blind")
    names = _checked_names(feature_names, size, where)
    resolved: list[int] = []
    seen: dict[int, Any] = {}
    for item in items:
        index = _column_index(item, names, size, where)
        if index in seen:
            first = seen[index]
            same = f"{first!r} and {item!r} both name" if first != item else f"{item!r} names"
            raise ColumnSpecError(f"duplicate column: {same} column {index}; list each column once")
        seen[index] = item
        resolved.append(index)
    if len(resolved) == size and not allow_all:
        raise ColumnSpecError(
            f"all {size} columns of {where} would be blinded; the model could read nothing from its input"
        )
    return tuple(sorted(resolved))


def _checked_names(feature_names: Sequence[str] | None, size: int, where: str) -> list[str] | None:
    """``feature_names`` as strings: one per column, none repeated."""
    if feature_names is None:
        return None
    names = [str(n) for n in feature_names]
    if len(names) != size:
        raise ColumnSpecError(
            f"feature_names has {len(names)} names but {where} reads {size} columns; "
            "give one name per input column, in order"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ColumnSpecError(f"feature_names repeats {', '.join(repr(n) for n in repeated)}; names must be unique")
    return names


def _column_index(item: Any, names: list[str] | None, size: int, where: str) -> int:
    """The index of one column given by name or index."""
    if isinstance(item, str):
        if names is None:
            raise ColumnSpecError(
                f"column {item!r} is a name but no feature_names were given; pass "
                f"feature_names=[...] ({size} names) or use integer indices 0..{size - 1}"
            )
        if item not in names:
            close = difflib.get_close_matches(item, names, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ColumnSpecError(f"unknown column {item!r}{hint}; available names: {', '.join(names)}")
        return names.index(item)
    if isinstance(item, int) and not isinstance(item, bool):
        if not 0 <= item < size:
            raise ColumnSpecError(
                f"column index {item} is out of range: {where} reads {size} columns (valid: 0..{size - 1})"
            )
        return int(item)
    raise ColumnSpecError(f"columns must be names (str) or indices (int); got {item!r} ({type(item).__name__})")


def check_feature_names(feature_names: Any, *, parameter: str = "feature_names") -> None:
    """Refuse ``feature_names`` that is not a sequence of names (a plain string would be split into letters).

    Raises:
        ColumnSpecError: a string, or something that is not a list/tuple of names.
    """
    if feature_names is None:
        return
    if isinstance(feature_names, (str, bytes)):
        raise ColumnSpecError(
            f"{parameter} must be a list of column names, one per input column; got the string "
            f"{feature_names!r} (write [{feature_names!r}] if it is a single name)"
        )
    if isinstance(feature_names, torch.Tensor) or not isinstance(feature_names, Iterable):
        raise ColumnSpecError(
            f"{parameter} must be a list of column names, one per input column; got {type(feature_names).__name__}"
        )


def _as_items(columns: Any) -> list[Any]:
    if isinstance(columns, (str, int)) and not isinstance(columns, bool):
        return [columns]
    if isinstance(columns, torch.Tensor):
        return [int(v) for v in columns.reshape(-1).tolist()]
    if isinstance(columns, Iterable):
        out = []
        for item in columns:
            # numpy integers and strings arrive here from user data
            if hasattr(item, "item") and not isinstance(item, (str, int)):
                item = item.item()
            out.append(item)
        return out
    raise ColumnSpecError(f"columns must be a name, an index or a list of them; got {type(columns).__name__}")


def column_mask(size: int, columns: Iterable[int]) -> torch.Tensor:
    """A ``bool`` vector of length ``size``, ``True`` at the blinded columns."""
    mask = torch.zeros(size, dtype=torch.bool)
    mask[list(columns)] = True
    return mask


def sever_mask(module: nn.Module, columns: Iterable[int]) -> torch.Tensor:
    """The layer weight's trainable mask: ``False`` on the weights that read ``columns``.

    ``weight[:, c]`` for a Linear, ``weight[:, c, ...]`` for a Conv1d/Conv2d (``groups == 1``).
    """
    weight = module.weight
    trainable = torch.ones(weight.shape, dtype=torch.bool)  # type: ignore[arg-type]  # module.weight is a Tensor on the layers a plan accepts
    trainable[:, list(columns)] = False
    return trainable


@dataclass(frozen=True)
class BlindingPlan:
    """What blinding a model means, resolved: the layer, the columns and the weight mask."""

    layer_name: str
    module: nn.Module = field(repr=False)
    columns: tuple[int, ...]
    column_names: tuple[str, ...] | None
    input_size: int
    weight_name: str
    trainable: torch.Tensor = field(repr=False)  # bool, weight's shape, False on the blinded weights
    chosen_by_default: bool = False

    @property
    def kind(self) -> str:
        return _kind(self.module)

    def describe(self) -> str:
        labels = self.column_names or tuple(str(c) for c in self.columns)
        unit = "input features" if isinstance(self.module, nn.Linear) else "input channels"
        text = f"columns {', '.join(labels)} of layer {self.layer_name!r} ({self.kind}, {self.input_size} {unit})"
        if self.chosen_by_default:
            text += " [layer=None: the first Linear/Conv1d/Conv2d in named_modules() order]"
        return text


def plan_blinding(
    model: nn.Module,
    columns: ColumnSpec,
    feature_names: Sequence[str] | None = None,
    layer: str | None = None,
) -> BlindingPlan:
    """Resolve and check everything; change nothing on ``model``.

    Raises:
        ColumnSpecError: any problem with ``layer``, ``columns`` or ``feature_names``.
    """
    name, module = find_layer(model, layer)
    size = layer_input_size(module)
    where = f"layer {name!r} ({_kind(module)})"
    indices = resolve_columns(columns, size, feature_names, where=where)
    names = None if feature_names is None else tuple(str(feature_names[i]) for i in indices)
    weight_name = f"{name}.weight" if name else "weight"
    return BlindingPlan(
        layer_name=name,
        module=module,
        columns=indices,
        column_names=names,
        input_size=size,
        weight_name=weight_name,
        trainable=sever_mask(module, indices),
        chosen_by_default=layer is None,
    )


# ---------------------------------------------------------------------------------------------
# the input fill
# ---------------------------------------------------------------------------------------------
class InputFill:
    """Forward pre-hook that fills the blinded columns of a layer's input with 0.

    ``masked_fill`` replaces whatever the column holds (also ``inf`` and ``NaN``); multiplying by a
    0/1 mask would turn ``inf`` into ``nan``. The hook is a plain picklable object, so
    ``copy.deepcopy(model)`` and ``torch.save(model)`` keep it; a ``state_dict`` does not.
    """

    def __init__(self, size: int, columns: Iterable[int], trailing_dims: int, layer_name: str = "") -> None:
        self.size = int(size)
        self.columns = tuple(int(c) for c in columns)
        self.trailing_dims = int(trailing_dims)
        self.layer_name = layer_name
        self._mask = column_mask(self.size, self.columns).reshape((self.size,) + (1,) * (self.trailing_dims - 1))
        self._on_device: dict[torch.device, torch.Tensor] = {}
        #: the handle of this hook on its module; copied with the module (``deepcopy``, ``torch.save``),
        #: where it then points at the copy's hooks, so removal never edits torch's hook dicts by hand
        self.handle: RemovableHandle | None = None

    def fill(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with the blinded columns set to 0 (a new tensor; ``x`` is not modified)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"blinded layer {self.layer_name!r} got a {type(x).__name__} input, expected a tensor")
        dim = x.dim() - self.trailing_dims
        if dim < 0 or x.shape[dim] != self.size:
            raise ValueError(
                f"blinded layer {self.layer_name!r} expects {self.size} columns at dimension {dim} of its "
                f"input, got shape {list(x.shape)}"
            )
        mask = self._on_device.get(x.device)
        if mask is None:
            mask = self._mask.to(x.device)
            self._on_device[x.device] = mask
        # a DTensor input (tensor parallelism): the mask replicated on its mesh
        return x.masked_fill(replicated_like(mask, like=x), 0)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args:
            return (self.fill(args[0]), *args[1:]), kwargs
        if "input" in kwargs:
            kwargs = dict(kwargs)
            kwargs["input"] = self.fill(kwargs["input"])
            return args, kwargs
        return None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_on_device"] = {}
        return state

    def __repr__(self) -> str:
        return f"InputFill(layer={self.layer_name!r}, columns={list(self.columns)}, size={self.size})"


def install_input_fill(module: nn.Module, columns: Iterable[int], *, layer_name: str = "") -> RemovableHandle:
    """Install an :class:`InputFill` on ``module`` (Linear/Conv1d/Conv2d); returns its handle.

    The hook runs before every forward of ``module`` and fills the columns of its first
    argument with 0. ``handle.remove()`` (or :func:`remove_input_fill`) takes it off.
    """
    _check_layer(layer_name or type(module).__name__, module, "layer")
    size = layer_input_size(module)
    cols = tuple(columns)
    bad = [c for c in cols if not 0 <= c < size]
    if bad:
        raise ColumnSpecError(f"column index {bad[0]} is out of range for a layer with {size} input columns")
    hook = InputFill(size, cols, _channel_trailing_dims(module), layer_name)
    hook.handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    return hook.handle


def input_fills(model: nn.Module) -> dict[str, list[InputFill]]:
    """Every :class:`InputFill` installed on ``model`` or its submodules, by module name."""
    found: dict[str, list[InputFill]] = {}
    for name, module in model.named_modules():
        hooks = [h for h in module._forward_pre_hooks.values() if isinstance(h, InputFill)]
        if hooks:
            found[name] = hooks
    return found


def remove_input_fill(model: nn.Module) -> int:
    """Remove every :class:`InputFill` from ``model`` and its submodules; returns how many.

    After this the model reads the blinded columns again through whatever weights they have
    (0 after ``mode="sever"``, so finite values still have no effect; ``inf``/``NaN`` do).
    """
    removed = 0
    for fills in input_fills(model).values():
        for fill in fills:
            if fill.handle is not None:
                fill.handle.remove()
                removed += 1
    return removed


# ---------------------------------------------------------------------------------------------
# verify_independence
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PerturbationCheck:
    """One perturbation of the blinded columns and what it changed."""

    name: str
    outputs_identical: bool
    max_abs_difference: float  # largest |output change|; inf where a non-finite value appeared
    gradients_identical: bool | None  # None when gradients were not checked

    @property
    def passed(self) -> bool:
        return self.outputs_identical and self.gradients_identical is not False


@dataclass(frozen=True)
class IndependenceReport:
    """Result of :func:`verify_independence`; true in a boolean context when every check passed."""

    columns: tuple[int, ...]
    column_names: tuple[str, ...] | None
    samples: int
    checks: tuple[PerturbationCheck, ...]

    @property
    def independent(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failures(self) -> tuple[PerturbationCheck, ...]:
        return tuple(check for check in self.checks if not check.passed)

    def __bool__(self) -> bool:
        return self.independent

    def summary(self) -> str:
        """One line: the columns, the sample count and the verdict."""
        labels = self.column_names or tuple(str(c) for c in self.columns)
        if self.independent:
            verdict = f"INDEPENDENT ({len(self.checks)} perturbations, outputs identical)"
        else:
            verdict = f"NOT independent ({len(self.failures)} of {len(self.checks)} perturbations changed something)"
        return f"columns {', '.join(labels)} on {self.samples} samples: {verdict}"

    def __str__(self) -> str:
        lines = [self.summary()]
        for check in self.checks:
            grads = "" if check.gradients_identical is None else (
                ", gradients identical" if check.gradients_identical else ", gradients CHANGED"
            )
            outs = "outputs identical" if check.outputs_identical else f"outputs CHANGED (max |diff| {check.max_abs_difference:.3g})"
            lines.append(f"  {check.name:>6} {_DESCRIPTIONS.get(check.name, ''):<22} {outs}{grads}")
        return "\n".join(lines)


_DESCRIPTIONS = {
    "zeros": "(set to 0)",
    "large": "(set to 1e6)",
    "-large": "(set to -1e6)",
    "max": "(set to dtype max)",
    "inf": "(set to inf)",
    "-inf": "(set to -inf)",
    "nan": "(set to NaN)",
    "noise": "(noise, std 1e3)",
    "rows": "(other rows' values)",
}


def _default_perturbations(dtype: torch.dtype) -> dict[str, Any]:
    big = torch.finfo(dtype).max
    return {
        "zeros": 0.0,
        "large": 1e6,
        "-large": -1e6,
        "max": big,
        "inf": math.inf,
        "-inf": -math.inf,
        "nan": math.nan,
        "noise": "noise",  # normal noise with standard deviation 1e3, seeded
        "rows": "rows",  # the columns' values of other rows (a realistic change)
    }


def verify_independence(
    model: nn.Module,
    inputs: torch.Tensor,
    columns: ColumnSpec,
    *,
    feature_names: Sequence[str] | None = None,
    dim: int = 1,
    perturbations: Sequence[str] | None = None,
    check_gradients: bool = True,
    seed: int = 0,
    forward: Callable[[torch.Tensor], Any] | None = None,
) -> IndependenceReport:
    """Perturb the ``columns`` of ``inputs`` and report whether ``model(inputs)`` stayed identical.

    The model runs in ``eval()`` mode (dropout would make two runs differ; the mode is restored).
    Outputs are compared exactly, ``NaN`` equal to ``NaN``. With ``check_gradients`` the gradients
    of ``sum(outputs)`` with respect to every trainable parameter are compared exactly too.

    Args:
        model: any module called as ``model(inputs)``, returning a tensor or a tuple/list/dict of
            tensors.
        inputs: a floating-point batch, e.g. ``(N, features)`` or ``(N, channels, ...)``.
        columns: names (with ``feature_names``) or indices along ``dim``.
        dim: the dimension holding the columns: 1 for ``(N, features)`` and ``(N, C, ...)``.
        perturbations: a subset of ``zeros, large, -large, max, inf, -inf, nan, noise, rows``
            (default: all; ``rows`` permutes the columns' values between rows, needs N > 1).
        check_gradients: also compare parameter gradients.
        seed: seed of ``noise`` and ``rows``.
        forward: how to call the model, ``forward(inputs) -> outputs`` (default ``model(inputs)``);
            for models that take more than the feature tensor.

    Example::

        report = verify_independence(model, x_test, ["age", "sex"], feature_names=names)
        print(report)          # one line per perturbation
        assert report.independent
    """
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        raise TypeError("verify_independence needs a floating-point tensor of inputs (inf/NaN must be representable)")
    if inputs.dim() < 1:
        raise ValueError("inputs must have at least one dimension")
    dim = dim % inputs.dim()
    size = int(inputs.shape[dim])
    indices = resolve_columns(columns, size, feature_names, where=f"inputs (dimension {dim})", allow_all=True)
    names = None if feature_names is None else tuple(str(feature_names[i]) for i in indices)
    table = _default_perturbations(inputs.dtype)
    chosen = list(table) if perturbations is None else list(perturbations)
    unknown = [p for p in chosen if p not in table]
    if unknown:
        raise GradmaskConfigError(f"unknown perturbation {unknown[0]!r}; choose from {', '.join(table)}")
    if "rows" in chosen and (dim == 0 or inputs.shape[0] < 2):
        chosen.remove("rows")
    params: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad] if check_gradients else []
    index = torch.tensor(indices, device=inputs.device)
    generator = torch.Generator().manual_seed(seed)

    call = model if forward is None else forward
    was_training = model.training
    model.eval()
    try:
        base_out, base_grads = _run(call, inputs, params)
        checks = []
        for name in chosen:
            perturbed = _perturb(inputs, dim, index, table[name], generator)
            out, grads = _run(call, perturbed, params)
            same, diff = _compare(base_out, out)
            grads_same = None
            if params:
                grads_same = all(_compare([a], [b])[0] for a, b in zip(base_grads, grads))
            checks.append(PerturbationCheck(name, same, diff, grads_same))
    finally:
        model.train(was_training)
    return IndependenceReport(indices, names, int(inputs.shape[0]), tuple(checks))


def _perturb(x: torch.Tensor, dim: int, index: torch.Tensor, how: Any, generator: torch.Generator) -> torch.Tensor:
    out = x.clone()
    if how == "noise":
        shape = list(x.shape)
        shape[dim] = index.numel()
        values = torch.randn(shape, generator=generator, dtype=torch.float32).mul_(1e3)
        return out.index_copy_(dim, index, values.to(device=x.device, dtype=x.dtype))
    if how == "rows":
        order = torch.randperm(x.shape[0], generator=generator)
        if torch.equal(order, torch.arange(x.shape[0])):
            order = order.roll(1)
        source = x.index_select(0, order.to(x.device)).index_select(dim, index)
        return out.index_copy_(dim, index, source)
    return out.index_fill_(dim, index, float(how))


def _run(model: Callable[[torch.Tensor], Any], x: torch.Tensor, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    if not params:
        with torch.no_grad():
            return _tensors(model(x)), []
    with torch.enable_grad():
        outs = _tensors(model(x))
        total = sum(o.float().sum() for o in outs if o.is_floating_point() and o.requires_grad)
        if not isinstance(total, torch.Tensor):
            return [o.detach() for o in outs], []
        grads = torch.autograd.grad(total, params, allow_unused=True)
    zero = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return [o.detach() for o in outs], zero


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for key in sorted(value, key=str) for t in _tensors(value[key])]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _compare(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[bool, float]:
    """Exact comparison (NaN equals NaN) and the largest absolute difference."""
    if len(a) != len(b):
        return False, math.inf
    same, worst = True, 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False, math.inf
        if x.is_floating_point() or x.is_complex():
            equal = (x == y) | (x.isnan() & y.isnan())
        else:
            equal = x == y
        if bool(equal.all()):
            continue
        same = False
        diff = (x.double() - y.double()).abs().masked_fill(equal, 0)
        worst = max(worst, float(diff.nan_to_num(nan=math.inf).max()))
    return same, worst


def _preview(names: list[str], limit: int = 8) -> str:
    if not names:
        return "none"
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
