"""One selector grammar for every `params` argument: names, `re:` patterns, module types, tied once."""

import pytest
from torch import nn

from lightning_gradmask import GradmaskConfigError, MaskSpecError, select_parameters


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.embed.weight  # one tensor, two names


def test_names_patterns_and_module_types_select_in_parameter_order():
    model = Tied()
    assert select_parameters(model, "norm.bias") == ["norm.bias"]
    assert select_parameters(model, "re:norm\\..*") == ["norm.weight", "norm.bias"]
    assert select_parameters(model, [nn.LayerNorm, "embed.weight"]) == ["embed.weight", "norm.weight", "norm.bias"]
    assert select_parameters(model, None) == ["embed.weight", "norm.weight", "norm.bias"]


def test_a_tied_parameter_counts_once_under_its_first_name_and_is_selectable_under_any():
    model = Tied()
    assert select_parameters(model, "head.weight") == ["embed.weight"]
    assert select_parameters(model, [nn.Linear, nn.Embedding]) == ["embed.weight"]


def test_mistakes_name_the_argument_and_the_closest_names():
    model = Tied()
    with pytest.raises(MaskSpecError, match="GradientNoise\\(params=...\\) key 'norm.wieght'.*closest names: 'norm.weight'"):
        select_parameters(model, "norm.wieght", parameter="GradientNoise(params=...)")
    with pytest.raises(MaskSpecError, match="no module of type Conv2d"):
        select_parameters(model, nn.Conv2d)
    with pytest.raises(TypeError, match="an nn.Module subclass") as raised:
        select_parameters(model, [3])
    assert isinstance(raised.value, GradmaskConfigError)
