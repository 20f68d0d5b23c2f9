"""Mask specs resolve to the masks a user means, and every bad spec names what was wrong."""

import re

import pytest
import torch
from torch import nn

from lightning_gradmask import MaskSpecError, resolve_masks
from lightning_gradmask.functional.masks import load_mask_file


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 4))


def test_every_value_form_resolves_to_the_same_bool_mask(net):
    dense = torch.tensor([[True, False, True], [False, False, True]])
    coordinates = [(0, 0), (0, 2), (1, 2)]
    forms = {
        "bool tensor": dense,
        "0/1 floats": dense.float(),
        "0/1 ints": dense.long(),
        "sparse COO": dense.float().to_sparse(),
        "coordinates": coordinates,
        "coordinate lists (YAML)": [list(c) for c in coordinates],
        "callable": lambda name, param: dense,
    }
    for label, value in forms.items():
        masks = resolve_masks({"0.weight": value}, net)
        assert torch.equal(masks["0.weight"], dense), label
        assert masks["0.weight"].dtype == torch.bool, label


def test_bool_broadcasts_and_regex_selects_whole_names(net):
    masks = resolve_masks({"re:.*bias": False, "2.weight": True}, net)
    assert list(masks) == ["0.bias", "2.weight", "2.bias"]  # the module's parameter order
    assert not masks["0.bias"].any() and masks["2.weight"].all()
    assert masks["2.bias"].shape == (4,)


def test_one_dimensional_coordinates_may_be_plain_integers(net):
    masks = resolve_masks({"2.bias": [0, 3]}, net)
    assert masks["2.bias"].tolist() == [True, False, False, True]


def test_sparse_zero_values_are_not_selected(net):
    sparse = torch.sparse_coo_tensor([[0, 1], [1, 2]], [1.0, 0.0], (2, 3), check_invariants=True)
    mask = resolve_masks({"0.weight": sparse}, net)["0.weight"]
    assert mask.sum() == 1 and mask[0, 1]


def test_sparse_stored_indices_count_and_duplicates_are_not_summed_away(net):
    # index (0, 1) stored twice, with 1 and -1: coalesce() would sum them to 0 and freeze it
    sparse = torch.sparse_coo_tensor([[0, 0, 1, 1], [1, 1, 2, 0]], [1.0, -1.0, 0.0, 3.0], (2, 3))
    assert not sparse.is_coalesced()
    mask = resolve_masks({"0.weight": sparse}, net)["0.weight"]
    assert mask.tolist() == [[False, True, False], [True, False, False]]  # explicit 0 at (1, 2) not selected
    both_zero = torch.sparse_coo_tensor([[0, 0], [1, 1]], [0.0, False], (2, 3))
    assert not resolve_masks({"0.weight": both_zero}, net)["0.weight"].any()
    as_bool = torch.sparse_coo_tensor([[1], [2]], torch.tensor([True]), (2, 3))
    assert resolve_masks({"0.weight": as_bool}, net)["0.weight"].tolist() == [[False] * 3, [False, False, True]]


@pytest.mark.parametrize("index, words", [((0, -1), "negative"), ((2, 0), "out of range")])
def test_sparse_indices_outside_the_shape_name_parameter_index_and_shape(net, index, words):
    sparse = torch.sparse_coo_tensor(torch.tensor([[0, index[0]], [0, index[1]]]), [1.0, 1.0], (2, 3), check_invariants=False)
    with pytest.raises(MaskSpecError, match=re.escape("'0.weight'")) as caught:
        resolve_masks({"0.weight": sparse}, net)
    message = str(caught.value)
    assert f"index {index}" in message and "[2, 3]" in message and words in message


def test_lazy_parameters_and_meta_masks_say_what_to_do():
    lazy = nn.Sequential(nn.LazyLinear(2))
    with pytest.raises(MaskSpecError, match=r"'0.weight'.*not initialized yet.*dummy batch.*nn.Linear"):
        resolve_masks({"0.weight": False}, lazy)
    with pytest.raises(MaskSpecError, match=r"'0.weight'.*not initialized yet"):
        resolve_masks({"re:0\\..*": True}, lazy)
    lazy(torch.zeros(1, 3))  # a dummy forward initializes it: then it resolves
    assert resolve_masks({"0.weight": False}, lazy)["0.weight"].shape == (2, 3)
    eager = nn.Linear(3, 2)
    for meta in (torch.ones(2, 3, dtype=torch.bool, device="meta"), torch.sparse_coo_tensor(torch.zeros(2, 1, dtype=torch.long), torch.ones(1), (2, 3), device="meta")):
        with pytest.raises(MaskSpecError, match=r"'weight'.*'meta' device.*build it on the CPU"):
            resolve_masks({"weight": meta}, eager)
    with pytest.raises(MaskSpecError, match=r"'meta' device"):
        resolve_masks({"weight": lambda name, p: torch.ones(2, 3, device="meta")}, eager)


def test_resolving_does_not_touch_the_module_or_share_memory(net):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    dense = torch.ones(2, 3, dtype=torch.bool)
    masks = resolve_masks({"0.weight": dense}, net)
    dense[0, 0] = False
    assert masks["0.weight"].all()
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key])


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_mask_file(tmp_path, net, suffix):
    mask = torch.tensor([[True, False, True], [False, False, True]])
    path = tmp_path / f"masks{suffix}"
    if suffix == ".pt":
        torch.save({"0.weight": mask}, path)
    else:
        from safetensors.torch import save_file

        save_file({"0.weight": mask}, str(path))
    assert torch.equal(resolve_masks(path, net)["0.weight"], mask)
    assert torch.equal(resolve_masks(str(path), net)["0.weight"], mask)


class _Payload:
    """Unpickling this would run code; weights_only must refuse it."""

    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(
    "content, message",
    [
        ([torch.ones(2)], "holds a list"),
        ({"0.weight": [1, 2]}, "expected only parameter names mapped to tensors"),
        ({"0.weight": _Payload()}, "weights_only=True"),
    ],
)
def test_mask_file_with_something_other_than_tensors(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    torch.save(content, path)
    with pytest.raises(MaskSpecError, match=re.escape(message)):
        load_mask_file(path)


def test_missing_file_and_unknown_suffix(tmp_path, net):
    with pytest.raises(MaskSpecError, match="does not exist"):
        resolve_masks(tmp_path / "nope.pt", net)
    other = tmp_path / "masks.npy"
    other.write_bytes(b"x")
    with pytest.raises(MaskSpecError, match="expected '.safetensors' or '.pt'"):
        resolve_masks(other, net)


@pytest.mark.parametrize(
    "spec, pieces",
    [
        ({"0.weight": torch.ones(3, 2, dtype=torch.bool)}, ["'0.weight'", "[3, 2]", "[2, 3]"]),
        ({"0.wieght": True}, ["'0.wieght'", "closest names", "'0.weight'"]),
        ({"re:encoder\\..*": True}, ["'re:encoder\\\\..*'", "matches no parameter"]),
        ({"re:0\\..*": True, "0.bias": False}, ["'re:0\\\\..*'", "'0.bias'", "both claim parameter '0.bias'"]),
        ({"0.weight": torch.tensor([[0, 1, 2], [1, 0, 0.5]])}, ["'0.weight'", "only 0 and 1", "2", "0.5"]),
        ({"0.weight": torch.tensor([[0, 1, float("nan")], [1, 0, 1]])}, ["'0.weight'", "NaN"]),
        ({"0.weight": [(0, 0), (2, 1)]}, ["'0.weight'", "(2, 1)", "out of range", "[2, 3]"]),
        ({"0.weight": [(0, 0, 0)]}, ["'0.weight'", "3 indices"]),
        ({"0.weight": [(-1, 0)]}, ["out of range"]),
        ({"0.weight": "yes"}, ["'0.weight'", "got str"]),
        ({"re:(": True}, ["invalid regular expression"]),
    ],
)
def test_bad_specs_name_the_parameter_and_the_problem(net, spec, pieces):
    with pytest.raises(MaskSpecError) as info:
        resolve_masks(spec, net)
    for piece in pieces:
        assert piece in str(info.value), (piece, str(info.value))


def test_real_valued_masks_only_where_allowed(net):
    weights = torch.tensor([[0.5, 1.0, 0.0], [2.0, 0.0, 1.0]])
    resolved = resolve_masks({"0.weight": weights}, net, allow_real=True)["0.weight"]
    assert resolved.dtype == torch.float32 and torch.equal(resolved, weights)
    with pytest.raises(MaskSpecError, match="only 0 and 1"):
        resolve_masks({"0.weight": weights}, net)
