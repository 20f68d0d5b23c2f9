"""HessianOperator against torch.func.hessian on tiny models (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_gradmask.curvature import HessianOperator, MatrixOperator, NonFiniteLossError

from reference import cross_entropy_of
from reference import reference_hessian as full_reference

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def tiny_cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)).double()


def data(model: nn.Module, n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    first = next(model.modules().__iter__().__next__().children())
    x = torch.randn(n, 1, 5, 5, generator=g) if isinstance(first, nn.Conv2d) else torch.randn(n, 4, generator=g)
    return x.double(), torch.randint(0, 3, (n,), generator=g)


def reference_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return full_reference(model, cross_entropy_of(x, y))


@pytest.mark.parametrize("make", [tiny_mlp, tiny_cnn])
def test_hvp_matches_torch_func_hessian(make):
    model = make()
    x, y = data(model)
    h = reference_hessian(model, x, y)
    op = HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y))
    assert op.dim == h.shape[0]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(op.dim, generator=g, dtype=torch.float64)
        torch.testing.assert_close(op.matvec(v), h @ v, rtol=1e-10, atol=1e-12)
    assert op.num_matvecs == 3
    rows = torch.randn(4, op.dim, generator=g, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(rows), rows @ h, rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError):  # the vmapped variant is gone: the loop was faster (benchmarks/README.md)
        op.matmat(rows, batched=True)  # type: ignore[call-arg]
    torch.testing.assert_close(op.matmat(rows), rows @ h, rtol=1e-10, atol=1e-12)
    assert op.num_matvecs == 11


def test_masked_operator_is_the_sub_hessian():
    model = tiny_mlp()
    x, y = data(model)
    h = reference_hessian(model, x, y)
    g = torch.Generator().manual_seed(3)
    masks = {
        "0.weight": torch.rand(6, 4, generator=g) > 0.5,
        "0.bias": torch.zeros(6, dtype=torch.bool),  # nothing selected: left out
        "2.bias": torch.tensor([True, False, True]),
    }
    op = HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y), masks=masks)
    keep = torch.cat(
        [
            masks["0.weight"].reshape(-1),
            masks["0.bias"],
            torch.ones(18, dtype=torch.bool),  # 2.weight: no mask, every entry
            masks["2.bias"],
        ]
    )
    sub = h[keep][:, keep]
    assert op.dim == int(keep.sum())
    assert op.names == ["0.weight", "2.weight", "2.bias"]
    v = torch.randn(op.dim, generator=g, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), sub @ v, rtol=1e-10, atol=1e-12)
    # unflatten puts entries back in place, NaN outside the mask
    full = op.unflatten(op.matvec(v))
    assert full["0.weight"].shape == (6, 4)
    assert torch.isnan(full["0.weight"][~masks["0.weight"]]).all()
    assert not torch.isnan(full["0.weight"][masks["0.weight"]]).any()
    parts = op.split(v)
    assert [p.numel() for p in parts.values()] == op.sizes


def test_several_batches_mean_and_sum():
    model = tiny_mlp()
    x, y = data(model, n=12)
    h1 = reference_hessian(model, x[:6], y[:6])
    h2 = reference_hessian(model, x[6:], y[6:])
    fns = [lambda: F.cross_entropy(model(x[:6]), y[:6]), lambda: F.cross_entropy(model(x[6:]), y[6:])]
    v = torch.randn(h1.shape[0], dtype=torch.float64)
    mean_op = HessianOperator.from_module(model, fns)
    sum_op = HessianOperator.from_module(model, fns, combine="sum")
    torch.testing.assert_close(mean_op.matvec(v), (h1 + h2) @ v / 2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sum_op.matvec(v), (h1 + h2) @ v, rtol=1e-10, atol=1e-12)


def test_reduce_called_once_per_product():
    model = tiny_mlp()
    x, y = data(model)
    calls: list[tuple[int, ...]] = []

    def reduce(t: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(t.shape))
        return t * 2.0  # a visible transformation

    plain = HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y))
    op = HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y), reduce=reduce)
    assert calls == [(1,)]  # the loss value, once, so a NaN on any rank is seen by all
    calls.clear()
    v = torch.randn(op.dim, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), 2.0 * plain.matvec(v))
    assert calls == [(op.dim,)]
    op.matmat(torch.randn(3, op.dim, dtype=torch.float64))
    assert calls == [(op.dim,), (3, op.dim)]


def test_p_grad_untouched_and_mode_restored():
    model = tiny_mlp()
    x, y = data(model)
    model.train()
    sentinel = torch.full_like(model[0].weight, 7.0)
    model[0].weight.grad = sentinel.clone()
    op = HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y))
    op.matvec(torch.randn(op.dim, dtype=torch.float64))
    assert torch.equal(model[0].weight.grad, sentinel)
    assert model[2].weight.grad is None
    assert model.training and all(m.training for m in model.modules())


def test_errors_for_bad_losses():
    model = tiny_mlp()
    x, y = data(model)
    with pytest.raises(ValueError, match="scalar"):
        HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y, reduction="none"))
    with pytest.raises(ValueError, match="does not require grad"):
        HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y).detach())
    with pytest.raises(ValueError, match="torch.Tensor"):
        HessianOperator.from_module(model, lambda: 1.0)  # type: ignore[arg-type, return-value]
    with pytest.raises(NonFiniteLossError):
        HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y) * float("nan"))
    with pytest.raises(NonFiniteLossError):
        HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y) + float("inf"))
    assert issubclass(NonFiniteLossError, ValueError)
    with pytest.raises(ValueError, match="unknown parameters"):
        HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y), masks={"nope": None})
    with pytest.raises(ValueError, match="shape"):
        HessianOperator.from_module(
            model, lambda: F.cross_entropy(model(x), y), masks={"0.bias": torch.ones(3, dtype=torch.bool)}
        )
    with pytest.raises(ValueError, match="bool"):
        HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y), masks={"0.bias": torch.ones(6)})


def test_loss_linear_in_a_parameter_and_release():
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    op = HessianOperator(lambda: (w**3).sum() + b.sum(), {"w": w, "b": b})
    v = torch.ones(5, dtype=torch.float64)
    expected = torch.cat([6 * w.detach(), torch.zeros(2, dtype=torch.float64)])
    torch.testing.assert_close(op.matvec(v), expected)
    op.release()
    with pytest.raises(RuntimeError, match="released"):
        op.matvec(v)


def test_works_under_no_grad_and_inference_mode():
    model = tiny_mlp()
    x, y = data(model)
    with torch.no_grad():
        op = HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y))
        assert op.matvec(torch.ones(op.dim, dtype=torch.float64)).isfinite().all()


def test_matrix_operator():
    a = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    op = MatrixOperator(a)
    torch.testing.assert_close(
        op.matvec(torch.ones(3, dtype=torch.float64)), torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    )
    assert op.num_matvecs == 1


class FailAwareReduce:
    """A ``reduce`` hook with ``fail``: records the payload shapes it is asked to join, like the monitor's."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[int, ...], torch.dtype]] = []

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls.append(("reduce", tuple(tensor.shape), tensor.dtype))
        return tensor

    def fail(self, template: torch.Tensor, error: BaseException):
        self.calls.append(("fail", tuple(template.shape), template.dtype))
        assert not template.any()
        raise error


class RaisesInSecondBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return Exploding.apply(grad)


class Exploding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad):
        return grad.clone()

    @staticmethod
    def backward(ctx, grad):
        raise MemoryError("out of memory in a product (simulated)")


def test_a_fail_aware_reduce_hook_joins_the_collective_a_local_failure_would_skip():
    from lightning_gradmask.curvature.exact import dense_hessian

    model = nn.Linear(3, 1)
    x, y = torch.randn(4, 3), torch.randn(4, 1)

    def broken():
        raise ZeroDivisionError("loss on this rank's batch")

    hook = FailAwareReduce()
    with pytest.raises(ZeroDivisionError):
        HessianOperator(broken, model.named_parameters(), reduce=hook)
    assert hook.calls == [("fail", (1,), torch.float64)]  # the loss's reduce, at construction

    def no_second_derivative():
        return F.mse_loss(RaisesInSecondBackward.apply(model(x)) ** 2, y)

    hook = FailAwareReduce()
    op = HessianOperator(no_second_derivative, model.named_parameters(), reduce=hook)
    with pytest.raises(MemoryError):
        op.matvec(torch.ones(op.dim))
    with pytest.raises(MemoryError):
        op.matmat(torch.ones(2, op.dim))
    with pytest.raises(MemoryError):
        dense_hessian(op, chunk_size=1)  # local products: deferred to the single reduce of the whole matrix
    assert hook.calls == [
        ("reduce", (1,), torch.float64),
        ("fail", (op.dim,), op.dtype),
        ("fail", (2, op.dim), op.dtype),
        ("fail", (op.dim, op.dim), torch.float64),
    ]
    # without fail(), errors are raised where they happen, as before
    with pytest.raises(ZeroDivisionError):
        HessianOperator(broken, model.named_parameters(), reduce=lambda t: t)
