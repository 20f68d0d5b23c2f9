"""The Hessian of a scalar loss as a linear operator ``v -> H v``.

The first-order gradient graph is built once, when the operator is made; every product then costs
one further backward pass through that retained graph (double backward). ``p.grad`` is never read
or written.

Example::

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    op = HessianOperator.from_module(model, lambda: F.mse_loss(model(x), y))
    hv = op.matvec(torch.randn(op.dim))          # one Hessian-vector product
    per_param = op.split(hv)                      # {"0.weight": tensor(32,), ...}

Restricting to chosen entries (``masks``): the operator then acts on the flat vector of the
selected entries only, i.e. it is the sub-Hessian ``H[S, S]`` of what can move::

    masks = {"0.weight": model[0].weight.abs() > 0.1}   # other parameters: every entry
    op = HessianOperator.from_module(model, closure, masks=masks)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Literal, Protocol, Union, runtime_checkable

import torch
from torch import Tensor, nn

from lightning_gradmask.errors import NonFiniteLossError

__all__ = [
    "BlockOperator",
    "HessianOperator",
    "LinearOperator",
    "MatrixOperator",
    "NonFiniteLossError",
    "ParamsLike",
    "check_loss",
]

ParamsLike = Union[Mapping[str, Tensor], Iterable[tuple[str, Tensor]], Iterable[Tensor]]
"""Parameters: a ``{name: tensor}`` mapping, ``module.named_parameters()``, or bare tensors."""




@runtime_checkable
class LinearOperator(Protocol):
    """What the algorithms in this package need: a symmetric operator on flat vectors.

    ``matvec`` takes and returns a 1-D tensor of length ``dim`` (dtype ``dtype``, device ``device``)
    and must count itself in ``num_matvecs``. The flat vector is laid out in blocks: ``names[i]``
    owns the next ``sizes[i]`` entries; ``split`` and ``unflatten`` give a flat vector per block (a
    bare matrix is one block, ``"matrix"``).
    """

    dim: int
    num_matvecs: int
    names: list[str]
    sizes: list[int]

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def matvec(self, v: Tensor) -> Tensor: ...

    def split(self, flat: Tensor) -> dict[str, Tensor]: ...

    def unflatten(self, flat: Tensor, fill: float = float("nan")) -> dict[str, Tensor]: ...


class MatrixOperator:
    """A dense symmetric matrix behind the :class:`LinearOperator` interface.

    Used by the exact path and handy in tests::

        A = torch.diag(torch.tensor([3.0, -5.0, 1.0]))
        lanczos(MatrixOperator(A), k=1).eigenvalues   # tensor([3.], dtype=torch.float64)
    """

    def __init__(self, matrix: Tensor, names: Sequence[str] | None = None, sizes: Sequence[int] | None = None):
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square, got shape {tuple(matrix.shape)}")
        self.matrix = matrix
        self.dim = int(matrix.shape[0])
        self.num_matvecs = 0
        self.names = list(names) if names is not None else ["matrix"]
        self.sizes = list(sizes) if sizes is not None else [self.dim]
        if sum(self.sizes) != self.dim or len(self.sizes) != len(self.names):
            raise ValueError("names and sizes must partition the matrix dimension")

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def matvec(self, v: Tensor) -> Tensor:
        self.num_matvecs += 1
        return self.matrix @ v.to(self.matrix.dtype)

    def matmat(self, v: Tensor) -> Tensor:
        """Products with the rows of ``v`` (shape ``(k, dim)``), one matrix product; counts ``k`` matvecs."""
        self.num_matvecs += int(v.shape[0])
        return v.to(self.matrix.dtype) @ self.matrix.T

    def split(self, flat: Tensor) -> dict[str, Tensor]:
        return dict(zip(self.names, torch.split(flat, self.sizes, dim=-1)))

    def unflatten(self, flat: Tensor, fill: float = float("nan")) -> dict[str, Tensor]:
        """The blocks of ``flat``, as :meth:`split` (a matrix has no parameter shapes to restore)."""
        return {name: part.clone() for name, part in self.split(flat).items()}


def _normalize_params(params: ParamsLike) -> tuple[list[str], list[Tensor]]:
    if isinstance(params, Mapping):
        items = list(params.items())
    else:
        items = list(params)  # type: ignore[arg-type]  # a Mapping's items are (name, tensor) pairs
    names: list[str] = []
    tensors: list[Tensor] = []
    for i, item in enumerate(items):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            name, tensor = item
        elif isinstance(item, Tensor):
            name, tensor = f"param{i}", item
        else:
            raise TypeError(f"parameters must be tensors or (name, tensor) pairs, got {type(item).__name__}")
        if not isinstance(tensor, Tensor):
            raise TypeError(f"parameter {name!r} is not a tensor")
        if not tensor.requires_grad:
            raise ValueError(f"parameter {name!r} does not require grad; pass only trainable parameters")
        if not tensor.is_floating_point():
            raise ValueError(f"parameter {name!r} is not floating point ({tensor.dtype})")
        names.append(name)
        tensors.append(tensor)
    if not tensors:
        raise ValueError("no parameters given")
    if len(set(names)) != len(names):
        raise ValueError("parameter names must be unique")
    if len({id(t) for t in tensors}) != len(tensors):
        raise ValueError("the same parameter tensor was given twice")
    return names, tensors


def check_loss(loss: object, index: int) -> Tensor:
    """``loss`` as a 0-d tensor, or a ``ValueError`` saying why it cannot be differentiated twice."""
    where = f"loss_fn #{index}" if index else "loss_fn"
    if not isinstance(loss, Tensor):
        raise ValueError(f"{where} must return a scalar torch.Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"{where} must return a scalar tensor, got shape {tuple(loss.shape)}")
    if not loss.is_floating_point():
        raise ValueError(f"{where} returned a {loss.dtype} tensor; the loss must be floating point")
    if not loss.requires_grad:
        raise ValueError(
            f"{where} returned a loss that does not require grad (no autograd graph): was it computed "
            "under torch.no_grad()/inference_mode, detached, or from frozen parameters only?"
        )
    return loss.reshape(())


class HessianOperator:
    """``v -> H v`` for the Hessian of a scalar loss w.r.t. parameters (optionally masked).

    Args:
        loss_fns: one closure ``() -> scalar tensor`` or several (e.g. one per cached batch). The
            loss the Hessian belongs to is their mean (``combine="mean"``, the default: the Hessian of
            the average loss over the batches) or their sum (``combine="sum"``). All closures run once,
            here, and their graphs are kept together until the operator is released.
        params: the parameters, as ``{name: tensor}``, ``module.named_parameters()`` or bare tensors
            (named ``param0``, ``param1``, ...). Every one must require grad.
        masks: optional ``{name: bool tensor of the parameter's shape}`` (or a list aligned with
            ``params``); ``None`` or a missing name means every entry. The operator acts on the flat
            vector of the selected entries only (parameter order, then row-major order within a
            parameter), i.e. it is the sub-Hessian of the entries that can move. A parameter whose
            mask selects nothing is left out.
        reduce: optional hook applied to every product (a 1-D tensor of length ``dim``, or a
            ``(k, dim)`` stack for a batched product) before it is returned. The Lightning glue
            passes a DDP all-reduce-mean: then the operator is the Hessian of the rank-averaged loss
            with exactly one collective per product call. It is also applied once, at construction,
            to the detached loss value, so that a NaN on any rank is seen on every rank. A hook with
            a ``fail(template, error)`` method (the monitor's, for DDP) is told of local failures
            instead of seeing them raised: when the closures or the gradient graph (at construction)
            or a product raise on this process, the operator calls ``reduce.fail(zeros like the
            payload, error)``, which joins the collective the other processes make and raises there
            and on every process. Inside :meth:`local_products` the failure is deferred to the
            caller's single reduce.
        combine: ``"mean"`` or ``"sum"`` over ``loss_fns``.
        check_finite: raise :class:`NonFiniteLossError` on a non-finite loss or product.
        module: optional module the parameters belong to; used by :func:`exact_diagonal` for its
            fast per-layer path and by ``eval_mode``.
        eval_mode: if ``module`` is given, run the closures with ``module.eval()`` and restore each
            submodule's previous mode afterwards (dropout off, BatchNorm statistics untouched).
        dtype: dtype of the flat vectors ``matvec`` takes and returns (default: the parameters').
            ``torch.float32`` on a half-precision model keeps the algorithms (QR, reorthogonalization)
            in float32 while each product still runs in the model's dtype.

    Raises:
        ValueError: a closure returns a non-tensor, a non-scalar, an integer tensor or a tensor with
            no autograd graph; the loss does not depend on any selected parameter; bad masks.
        NonFiniteLossError: the (reduced) loss is NaN or infinite.

    Attributes:
        dim: number of selected entries (the size of vectors ``matvec`` takes).
        num_matvecs: Hessian-vector products done so far (a batched product of ``k`` counts ``k``).
        names, sizes: the selected parameters and how many entries each contributes to ``dim``.
        loss: the (reduced) loss value, a float.

    Example::

        op = HessianOperator([lambda: loss_on(batch1), lambda: loss_on(batch2)], model.named_parameters())
        hv = op.matvec(v)        # Hessian of (loss1 + loss2) / 2 times v
    """

    def __init__(
        self,
        loss_fns: Callable[[], Tensor] | Sequence[Callable[[], Tensor]],
        params: ParamsLike,
        *,
        masks: Mapping[str, Tensor | None] | Sequence[Tensor | None] | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
        combine: Literal["mean", "sum"] = "mean",
        check_finite: bool = True,
        module: nn.Module | None = None,
        eval_mode: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        if callable(loss_fns):
            loss_fns = [loss_fns]
        self.loss_fns: list[Callable[[], Tensor]] = list(loss_fns)
        if not self.loss_fns:
            raise ValueError("at least one loss_fn is needed")
        if not all(callable(f) for f in self.loss_fns):
            raise TypeError("loss_fns must be callables returning a scalar loss")
        if combine not in ("mean", "sum"):
            raise ValueError(f"combine must be 'mean' or 'sum', got {combine!r}")
        self.combine = combine
        self.reduce = reduce
        self.check_finite = check_finite
        self.module = module
        self.eval_mode = eval_mode
        self.num_matvecs = 0

        all_names, all_params = _normalize_params(params)
        self._select(all_names, all_params, self._normalize_masks(masks, all_names, all_params))
        dtypes = {p.dtype for p in self.params}
        self._dtype = torch.promote_types(*dtypes) if len(dtypes) > 1 else self.params[0].dtype
        if dtype is not None:  # e.g. float32 vectors for a bfloat16 model: products in the model's dtype
            self._dtype = dtype
        self._device = self.params[0].device
        self._build_gradient_graph()

    def _select(self, all_names: list[str], all_params: list[Tensor], mask_list: list[Tensor | None]) -> None:
        """Keep only parameters with at least one selected entry; their flat layout."""
        self.names: list[str] = []
        self.params: list[Tensor] = []
        self._index: list[Tensor | None] = []  # flat indices of selected entries, None = all
        self.masks: list[Tensor | None] = []
        self.sizes: list[int] = []
        for name, p, m in zip(all_names, all_params, mask_list):
            if m is not None:
                count = int(m.sum())
                if count == 0:
                    continue
                if count == p.numel():
                    m = None
            self.names.append(name)
            self.params.append(p)
            self.masks.append(m)
            if m is None:
                self._index.append(None)
                self.sizes.append(p.numel())
            else:
                idx = m.reshape(-1).nonzero().squeeze(1)
                self._index.append(idx)
                self.sizes.append(int(idx.numel()))
        if not self.params:
            raise ValueError("the masks select no entry of any parameter")
        self.dim = int(sum(self.sizes))
        self._offsets = [0]
        for size in self.sizes:
            self._offsets.append(self._offsets[-1] + size)

    def _build_gradient_graph(self) -> None:
        """Run every closure once and keep the first-order gradient graph (checked, reduced loss)."""
        self._deferred: list[Exception] | None = None  # inside local_products with a fail() hook
        with self.autograd_context():
            try:
                losses = [check_loss(fn(), i) for i, fn in enumerate(self.loss_fns)]
                total = torch.stack(losses).sum()
                if self.combine == "mean":
                    total = total / len(losses)
                value = total.detach().reshape(1).to(torch.float64)
                # the graph before the loss's reduce: a failure anywhere here is agreed on at that reduce
                grads = torch.autograd.grad(total, self.params, create_graph=True, allow_unused=True)
                if all(g is None for g in grads):
                    raise ValueError("the loss does not depend on any of the selected parameters")
            except Exception as err:
                self._fail(torch.zeros(1, dtype=torch.float64, device=self._device), err)
            if self.reduce is not None:
                value = self.reduce(value)
            self.loss = float(value.reshape(-1)[0])
            if self.check_finite and not math.isfinite(self.loss):
                raise NonFiniteLossError(f"the loss is not finite ({self.loss}); no Hessian statistics can be computed")
        # Gradients that do not depend on any parameter (loss linear in that parameter, or unused)
        # contribute nothing to H v; keep only those with a graph.
        self._outputs = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self._grads: list[Tensor] | None = [grads[i] for i in self._outputs]

    def _fail(self, template: Tensor, error: Exception) -> Tensor:
        """A local failure: raise it, or tell a ``fail``-aware hook (or defer it to the caller's reduce)."""
        if self._deferred is not None:
            self._deferred.append(error)
            return torch.zeros_like(template)
        fail = getattr(self.reduce, "fail", None)
        if fail is None:
            raise error
        fail(template, error)
        raise error  # a hook's fail() raises; this is for one that returns

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        loss_fns: Callable[[], Tensor] | Sequence[Callable[[], Tensor]],
        *,
        masks: Mapping[str, Tensor | None] | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
        combine: Literal["mean", "sum"] = "mean",
        eval_mode: bool = True,
        check_finite: bool = True,
    ) -> HessianOperator:
        """The Hessian w.r.t. every trainable parameter of ``module`` (``requires_grad=True``).

        Parameter names are those of ``module.named_parameters()``. With ``eval_mode=True`` (the
        default) the closures run in ``eval()`` mode and the previous mode is restored.

        Example::

            op = HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y),
                                             masks={"fc.weight": keep}, reduce=all_reduce_mean)
        """
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        return cls(
            loss_fns,
            named,
            masks=masks,
            reduce=reduce,
            combine=combine,
            check_finite=check_finite,
            module=module,
            eval_mode=eval_mode,
        )

    @staticmethod
    def _normalize_masks(
        masks: Mapping[str, Tensor | None] | Sequence[Tensor | None] | None,
        names: list[str],
        params: list[Tensor],
    ) -> list[Tensor | None]:
        if masks is None:
            return [None] * len(params)
        if isinstance(masks, Mapping):
            unknown = set(masks) - set(names)
            if unknown:
                raise ValueError(f"masks name unknown parameters: {sorted(unknown)}")
            raw = [masks.get(n) for n in names]
        else:
            raw = list(masks)
            if len(raw) != len(params):
                raise ValueError(f"got {len(raw)} masks for {len(params)} parameters")
        out: list[Tensor | None] = []
        for name, p, m in zip(names, params, raw):
            if m is None:
                out.append(None)
                continue
            if not isinstance(m, Tensor) or m.dtype != torch.bool:
                raise ValueError(f"mask for {name!r} must be a bool tensor")
            if m.shape != p.shape:
                raise ValueError(f"mask for {name!r} has shape {tuple(m.shape)}, parameter has {tuple(p.shape)}")
            out.append(m.to(p.device))
        return out

    @contextlib.contextmanager
    def autograd_context(self) -> Iterator[None]:
        """Grad mode on, inference mode off and (if asked) the module in eval mode, then restored.

        Every closure call of the operator (and of :func:`exact_diagonal`) runs inside it.
        """
        modes: list[tuple[nn.Module, bool]] = []
        if self.eval_mode and self.module is not None:
            modes = [(m, m.training) for m in self.module.modules()]
            self.module.eval()
        try:
            with torch.inference_mode(False), torch.enable_grad():
                yield
        finally:
            for m, training in modes:
                m.training = training

    def evaluate_loss(self, index: int) -> Tensor:
        """Run closure ``index`` again and return its checked loss, weighted as in the combined loss.

        The caller must be inside :meth:`autograd_context`. Used by the exact diagonal rules, which
        record what the model computes while the loss is evaluated.
        """
        scale = 1.0 / len(self.loss_fns) if self.combine == "mean" else 1.0
        return check_loss(self.loss_fns[index](), index) * scale

    # ------------------------------------------------------------------ per-parameter access
    def entry_indices(self, k: int) -> Tensor | None:
        """Flat indices of the selected entries of parameter ``k`` (``None``: every entry)."""
        return self._index[k]

    def select_entries(self, k: int, full: Tensor) -> Tensor:
        """The selected entries of a flat tensor with parameter ``k``'s ``numel`` entries."""
        idx = self._index[k]
        flat = full.reshape(-1)
        return flat if idx is None else flat.index_select(0, idx.to(flat.device))

    def gradient(self, k: int) -> Tensor | None:
        """The gradient of the loss w.r.t. parameter ``k`` with its graph; ``None`` when the loss is linear in it."""
        if self._grads is None:
            raise RuntimeError("the operator was released; build a new one")
        return self._grads[self._outputs.index(k)] if k in self._outputs else None

    def block_range(self, k: int) -> tuple[int, int]:
        """Where parameter ``k``'s entries lie in the flat vector: ``(start, stop)``."""
        return self._offsets[k], self._offsets[k + 1]

    # ------------------------------------------------------------------ vector layout
    @property
    def dtype(self) -> torch.dtype:
        """dtype of the flat vectors (the parameters' dtype)."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def split(self, flat: Tensor) -> dict[str, Tensor]:
        """Split a flat vector (or a ``(..., dim)`` stack) into ``{name: selected entries}``."""
        if flat.shape[-1] != self.dim:
            raise ValueError(f"expected last dimension {self.dim}, got {flat.shape[-1]}")
        return dict(zip(self.names, torch.split(flat, self.sizes, dim=-1)))

    def unflatten(self, flat: Tensor, fill: float = float("nan")) -> dict[str, Tensor]:
        """``{name: tensor of the parameter's shape}``; entries outside the mask are ``fill``.

        Example: ``op.unflatten(diagonal)["0.weight"]`` has ``model[0].weight``'s shape.
        """
        out: dict[str, Tensor] = {}
        for name, p, idx, seg in zip(self.names, self.params, self._index, self.split(flat).values()):
            if idx is None:
                out[name] = seg.reshape(p.shape).clone()
            else:
                full = torch.full((p.numel(),), fill, dtype=seg.dtype, device=seg.device)
                full[idx.to(seg.device)] = seg
                out[name] = full.reshape(p.shape)
        return out

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Selected entries of parameter-shaped tensors (aligned with ``names``) as one flat vector."""
        parts = []
        for t, idx in zip(tensors, self._index):
            t = t.reshape(-1)
            parts.append(t if idx is None else t.index_select(0, idx))
        return torch.cat(parts)

    def _scatter(self, v: Tensor) -> list[Tensor]:
        """Flat (selected) vector -> parameter-shaped tensors, zeros outside the mask."""
        out = []
        for k, (p, idx) in enumerate(zip(self.params, self._index)):
            seg = v[self._offsets[k] : self._offsets[k + 1]].to(p.dtype)
            if idx is None:
                out.append(seg.reshape(p.shape))
            else:
                full = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                full.index_copy_(0, idx, seg)
                out.append(full.reshape(p.shape))
        return out

    # ------------------------------------------------------------------ products
    def _raw_products(self, vs: list[Tensor]) -> list[Tensor]:
        if self._grads is None:
            raise RuntimeError("the operator was released; build a new one")
        outputs = [self._grads[j] for j in range(len(self._outputs))]
        grad_outputs = [vs[i] for i in self._outputs]
        if not outputs:  # loss linear in every selected parameter: H = 0
            return [torch.zeros_like(v) for v in vs]
        with torch.inference_mode(False), torch.enable_grad():
            hv = torch.autograd.grad(
                outputs,
                self.params,
                grad_outputs=grad_outputs,
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
        return list(hv)

    def _finish(self, flat: Tensor) -> Tensor:
        if self.reduce is not None:
            flat = self.reduce(flat)
        if self.check_finite and not bool(torch.isfinite(flat).all()):
            raise NonFiniteLossError("a Hessian-vector product is not finite")
        return flat

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for a flat vector ``v`` of length ``dim``; one product, one ``reduce`` call."""
        if v.ndim != 1 or v.shape[0] != self.dim:
            raise ValueError(f"expected a vector of length {self.dim}, got shape {tuple(v.shape)}")
        v = v.to(device=self._device)
        self.num_matvecs += 1
        return self._finish(self._local(lambda: self.flatten(self._raw_products(self._scatter(v))), (self.dim,)))

    __call__ = matvec

    def matmat(self, v: Tensor) -> Tensor:
        """``H`` applied to every row of ``v`` (shape ``(k, dim)``); counts ``k`` matvecs.

        The products run one after the other and ``reduce`` is called once, on the ``(k, dim)``
        result (one collective under DDP instead of ``k``). A vmapped backward was slower per product
        on CPU for most models (figures in ``benchmarks/README.md``), so there is no second code path.
        """
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise ValueError(f"expected shape (k, {self.dim}), got {tuple(v.shape)}")
        v = v.to(device=self._device)
        self.num_matvecs += int(v.shape[0])
        return self._finish(
            self._local(lambda: torch.stack([self.flatten(self._raw_products(self._scatter(r))) for r in v]), tuple(v.shape))
        )

    def _local(self, products: Callable[[], Tensor], shape: tuple[int, ...]) -> Tensor:
        """This process's products in the operator's dtype; a failure goes to :meth:`_fail`."""
        template = torch.zeros(shape, dtype=self._dtype, device=self._device)
        if self._deferred:  # an earlier product of this local run failed: the caller's reduce reports it
            return template
        try:
            return products().to(self._dtype)
        except Exception as err:
            return self._fail(template, err)

    @contextlib.contextmanager
    def local_products(self) -> Iterator[Callable[[Tensor], Tensor] | None]:
        """Products without ``reduce`` and without the finiteness check, for statistics linear in H.

        Yields the ``reduce`` hook (or ``None``): the caller reduces its own result once and checks
        it for finiteness after that, so every rank raises together. Used by :func:`dense_hessian`.
        With a ``fail``-aware hook, a product that raises here returns zeros (later ones are not
        computed) and the yielded hook reports the failure at the caller's reduce.
        """
        reduce, check = self.reduce, self.check_finite
        fail = getattr(reduce, "fail", None)
        deferred: list[Exception] = []

        def reduce_once(tensor: Tensor) -> Tensor:
            if deferred and fail is not None:  # a product failed here: join the others' reduce, flagged
                fail(tensor, deferred[0])
            assert reduce is not None
            return reduce(tensor)

        self.reduce, self.check_finite = None, False
        self._deferred = deferred if fail is not None else None
        try:
            yield None if reduce is None else reduce_once
        finally:
            self.reduce, self.check_finite, self._deferred = reduce, check, None

    def block(self, names: Sequence[str]) -> BlockOperator:
        """The diagonal block ``H[B, B]`` for the selected entries of the named parameters.

        Shares this operator's graph, ``reduce`` hook and product counter; each product costs one
        full product. Example: ``estimate_trace(op.block(["conv1.weight"]), 50)``.
        """
        return BlockOperator(self, names)

    def release(self) -> None:
        """Free the retained gradient graph. The operator cannot be used afterwards."""
        self._grads = None

    def __enter__(self) -> HessianOperator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return (
            f"HessianOperator(dim={self.dim}, parameters={len(self.params)}, batches={len(self.loss_fns)}, "
            f"combine={self.combine!r}, reduce={'yes' if self.reduce else 'no'}, matvecs={self.num_matvecs})"
        )


class BlockOperator:
    """A diagonal block of a :class:`HessianOperator` (see :meth:`HessianOperator.block`)."""

    def __init__(self, parent: HessianOperator, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in parent.names]
        if unknown:
            raise ValueError(f"unknown or unselected parameters: {unknown}")
        if not names:
            raise ValueError("a block needs at least one parameter")
        self.parent = parent
        order = [k for k, n in enumerate(parent.names) if n in set(names)]
        self.names = [parent.names[k] for k in order]
        self.sizes = [parent.sizes[k] for k in order]
        self._ranges = [parent.block_range(k) for k in order]
        self._order = order
        self.dim = int(sum(self.sizes))
        self.loss = parent.loss

    @property
    def num_matvecs(self) -> int:
        return self.parent.num_matvecs

    @num_matvecs.setter
    def num_matvecs(self, value: int) -> None:
        self.parent.num_matvecs = value

    @property
    def dtype(self) -> torch.dtype:
        return self.parent.dtype

    @property
    def device(self) -> torch.device:
        return self.parent.device

    def embed(self, v: Tensor) -> Tensor:
        full = torch.zeros(self.parent.dim, dtype=self.parent.dtype, device=self.parent.device)
        offset = 0
        for a, b in self._ranges:
            full[a:b] = v[offset : offset + b - a]
            offset += b - a
        return full

    def restrict(self, full: Tensor) -> Tensor:
        return torch.cat([full[..., a:b] for a, b in self._ranges], dim=-1)

    def matvec(self, v: Tensor) -> Tensor:
        return self.restrict(self.parent.matvec(self.embed(v.to(self.parent.device, self.parent.dtype))))

    __call__ = matvec

    def split(self, flat: Tensor) -> dict[str, Tensor]:
        return dict(zip(self.names, torch.split(flat, self.sizes, dim=-1)))

    def unflatten(self, flat: Tensor, fill: float = float("nan")) -> dict[str, Tensor]:
        full = torch.full((self.parent.dim,), fill, dtype=flat.dtype, device=flat.device)
        offset = 0
        for a, b in self._ranges:
            full[a:b] = flat[offset : offset + b - a]
            offset += b - a
        everything = self.parent.unflatten(full, fill)
        return {n: everything[n] for n in self.names}
