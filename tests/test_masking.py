"""FrozenEntries, the mask mechanism on its own: exact to the bit, whatever the values."""

import pytest
import torch

from lightning_gradmask import FrozenEntries

SPECIAL = [-0.0, 1.0, float("inf"), float("nan"), 1e-45, -3.5, float("-inf"), 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_restore_is_bit_exact_for_special_values(dtype):
    weight = torch.nn.Parameter(torch.tensor(SPECIAL, dtype=dtype))
    trainable = torch.tensor([False, True, False, False, False, True, False, True])
    frozen = FrozenEntries({"w": (weight, trainable)})
    frozen.capture_()
    start = weight.detach().clone()
    new = torch.tensor([7.0, float("nan"), -0.0, 2.0, float("inf"), -0.0, 1e-45, float("-inf")], dtype=dtype)
    with torch.no_grad():
        weight.copy_(new)
    frozen.restore_()
    assert torch.equal(as_bits(weight.detach())[~trainable], as_bits(start)[~trainable])
    assert torch.equal(as_bits(weight.detach())[trainable], as_bits(new)[trainable])


def as_bits(tensor):
    return tensor.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


def test_gradient_masking_zeroes_frozen_entries_even_when_they_hold_nan():
    weight = torch.nn.Parameter(torch.zeros(2, 3))
    trainable = torch.tensor([[True, False, True], [False, False, True]])
    weight.grad = torch.tensor([[1.0, float("nan"), float("inf")], [float("-inf"), 2.0, -0.0]])
    removed = FrozenEntries({"w": (weight, trainable)}).mask_gradients_(measure=True)
    assert torch.equal(weight.grad[~trainable], torch.zeros(3))
    assert weight.grad[0, 0] == 1.0 and weight.grad[0, 2] == float("inf")
    assert torch.isnan(removed)  # the removed gradient held NaN, and the measurement says so


def test_fully_frozen_and_fully_trainable_parameters():
    frozen_param = torch.nn.Parameter(torch.randn(3))
    free_param = torch.nn.Parameter(torch.randn(3))
    entries = FrozenEntries(
        {"frozen": (frozen_param, torch.zeros(3, dtype=torch.bool)), "free": (free_param, torch.ones(3, dtype=torch.bool))}
    )
    assert entries.names == ["frozen"] and entries.count() == (3, 3)
    entries.capture_()
    start = frozen_param.detach().clone()
    with torch.no_grad():
        frozen_param.add_(1)
    entries.restore_()
    assert torch.equal(frozen_param, start)


def test_restore_before_capture_and_bad_masks_are_errors():
    param = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(RuntimeError, match="before capture_"):
        FrozenEntries({"p": (param, torch.tensor([True, False]))}).restore_()
    with pytest.raises(TypeError, match="must be bool"):
        FrozenEntries({"p": (param, torch.tensor([1, 0]))})
    with pytest.raises(ValueError, match="has shape \\[3\\], parameter has \\[2\\]"):
        FrozenEntries({"p": (param, torch.ones(3, dtype=torch.bool))})


@pytest.mark.parametrize("numel", [6, 70_000])  # the grouped path and the one-pass path
def test_restore_follows_a_parameter_whose_memory_was_replaced(numel):
    param = torch.nn.Parameter(torch.randn(numel))
    trainable = torch.arange(numel) % 2 == 0
    frozen = FrozenEntries({"p": (param, trainable)})
    frozen.capture_()
    start = param.detach().clone()
    frozen.restore_()  # builds and caches the plan on the old memory
    param.data = param.data.clone()  # e.g. a move or a cast done in place of the tensor
    with torch.no_grad():
        param.add_(1.0)
    frozen.restore_()
    assert torch.equal(param.detach()[~trainable], start[~trainable])
    assert torch.equal(param.detach()[trainable], start[trainable] + 1.0)


@pytest.mark.parametrize("sparse_dim", [1, 2], ids=["hybrid-rows", "fully-sparse"])
def test_sparse_coo_gradients_are_coalesced_and_their_frozen_part_zeroed(sparse_dim):
    weight = torch.nn.Parameter(torch.zeros(4, 3))
    trainable = torch.tensor([[True, False, True], [False, False, False], [True, True, True], [False, True, False]])
    dense = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [0.0, 0.0, 0.0], [7.0, 8.0, 9.0]])
    half = dense / 2  # stored twice at every position: uncoalesced duplicates that sum to ``dense``
    uncoalesced = torch.sparse_coo_tensor(
        torch.cat([half.to_sparse(sparse_dim).indices()] * 2, dim=1),
        torch.cat([half.to_sparse(sparse_dim).values()] * 2),
        size=(4, 3),
        check_invariants=True,
    )
    assert not uncoalesced.is_coalesced()
    weight.grad = uncoalesced
    removed = FrozenEntries({"w": (weight, trainable)}).mask_gradients_(measure=True)
    assert weight.grad.layout == torch.sparse_coo and weight.grad.is_coalesced()
    assert torch.equal(weight.grad.to_dense(), dense * trainable)
    assert float(removed) == pytest.approx(float(dense[~trainable].norm()))


def test_sparse_gradient_of_a_fully_frozen_parameter_is_zeroed_and_measured():
    weight = torch.nn.Parameter(torch.zeros(3, 2))
    weight.grad = torch.sparse_coo_tensor([[0, 2, 0]], [[3.0, 0.0], [0.0, 1.0], [1.0, 0.0]], size=(3, 2), check_invariants=True)
    removed = FrozenEntries({"w": (weight, torch.zeros(3, 2, dtype=torch.bool))}).mask_gradients_(measure=True)
    assert torch.equal(weight.grad.to_dense(), torch.zeros(3, 2))
    assert float(removed) == pytest.approx(17**0.5)  # (3 + 1)^2 + 1^2: duplicates summed first


def test_optimizer_param_ids_are_rebuilt_only_when_the_groups_change():
    import gc

    from lightning_gradmask.functional.optimizer_params import OptimizerParamIds

    first, second = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(first.parameters(), lr=0.1)
    ids = OptimizerParamIds()
    seen = ids(optimizer)
    assert seen == {id(p) for p in first.parameters()}
    assert ids(optimizer) is seen  # the same set while nothing changed: no per-step rebuild
    optimizer.add_param_group({"params": list(second.parameters())})  # as BackboneFinetuning does
    assert ids(optimizer) == {id(p) for p in [*first.parameters(), *second.parameters()]}
    del optimizer
    gc.collect()
    assert len(ids._cache) == 0  # optimizers are held weakly


def test_optimizer_param_ids_pickle_empty():
    import pickle

    from lightning_gradmask.functional.optimizer_params import OptimizerParamIds

    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    ids = OptimizerParamIds()
    ids(optimizer)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        copy = pickle.loads(pickle.dumps(ids, protocol=protocol))  # callbacks holding one are pickled by ddp_spawn
        assert len(copy._cache) == 0 and copy(optimizer) == ids(optimizer)


def test_optimizer_param_ids_see_the_compact_swap():
    from lightning_gradmask import CompactEntries
    from lightning_gradmask.functional.optimizer_params import OptimizerParamIds

    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    ids = OptimizerParamIds()
    assert id(layer.weight) in ids(optimizer)
    compact = CompactEntries({"weight": (layer.weight, torch.tensor([[True, False, False], [False, False, True]]))})
    compact.swap_in([optimizer])
    assert id(compact.compact("weight")) in ids(optimizer) and id(layer.weight) not in ids(optimizer)
    compact.swap_out()
    assert id(layer.weight) in ids(optimizer) and id(compact.compact("weight")) not in ids(optimizer)
