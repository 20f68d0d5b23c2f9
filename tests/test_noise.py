"""Seeded noise and std schedules (pure tensor code, no Trainer)."""

import math

import pytest
import torch

from lightning_gradmask.functional.noise import (
    AnnealedStd,
    NoiseStdError,
    check_std,
    make_schedule,
    noise_like,
    noise_seed,
)


def test_noise_is_a_function_of_seed_step_index_and_stream_only():
    w = torch.empty(4, 5)
    reference = noise_like(w, 3, 7, 2)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(noise_like(w, 3, 7, 2), reference)
    for other in (noise_like(w, 4, 7, 2), noise_like(w, 3, 8, 2), noise_like(w, 3, 7, 1), noise_like(w, 3, 7, 2, stream="x")):
        assert not torch.equal(other, reference)
    assert noise_seed(0, 1, 2) != noise_seed(0, 2, 1)  # no symmetric collisions


def test_noise_takes_the_parameter_dtype_and_shape():
    assert noise_like(torch.zeros(3, dtype=torch.float64), 0, 0, 0).dtype == torch.float64
    half = noise_like(torch.zeros(2, 3, dtype=torch.bfloat16), 0, 0, 0)
    assert half.dtype == torch.bfloat16 and half.shape == (2, 3)
    # low precision: the float32 draw, rounded
    assert torch.equal(half, noise_like(torch.zeros(2, 3), 0, 0, 0).to(torch.bfloat16))
    assert noise_like(torch.zeros(()), 0, 0, 0).shape == ()
    with pytest.raises(TypeError, match="floating-point"):
        noise_like(torch.zeros(3, dtype=torch.long), 0, 0, 0)
    with pytest.raises(TypeError, match="step must be an integer"):
        noise_like(torch.zeros(3), 0, 1.5, 0)


def test_noise_is_standard_normal():
    sample = noise_like(torch.empty(200_000), 0, 0, 0)
    assert abs(sample.mean().item()) < 0.01 and abs(sample.std().item() - 1) < 0.01


def test_schedules():
    assert make_schedule(std=0.25)(10**6) == 0.25
    annealed = make_schedule(eta=0.3, gamma=0.55)
    for t in (0, 1, 10, 999):
        assert annealed(t) == pytest.approx(math.sqrt(0.3 / (1 + t) ** 0.55))
    assert isinstance(annealed, AnnealedStd)
    assert make_schedule(std=lambda t: torch.tensor(0.5) / (t + 1))(3) == 0.125
    assert make_schedule(required=False) is None


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(std=-0.1), NoiseStdError, "negative"),
        (dict(std=float("nan")), NoiseStdError, "NaN"),
        (dict(std=float("inf")), NoiseStdError, "infinite"),
        (dict(std=True), NoiseStdError, "real number"),
        (dict(std="0.1"), TypeError, "number or a callable"),
        (dict(eta=-1.0), NoiseStdError, "negative"),
        (dict(eta=0.1, gamma=-0.5), NoiseStdError, "gamma is negative"),
        (dict(std=0.1, eta=0.1), ValueError, "not both"),
        (dict(), ValueError, "give std"),
    ],
)
def test_schedule_validation(kwargs, error, message):
    with pytest.raises(error, match=message):
        make_schedule(owner="X", **kwargs)


def test_a_callable_going_bad_names_the_step():
    schedule = make_schedule(std=lambda t: 0.1 if t < 5 else -1.0)
    assert schedule(4) == 0.1
    with pytest.raises(NoiseStdError, match="at optimizer step 5 is negative"):
        schedule(5)
    with pytest.raises(NoiseStdError, match="raised ZeroDivisionError at optimizer step 0"):
        make_schedule(std=lambda t: 1 / t)(0)
    with pytest.raises(NoiseStdError, match="step 3 must be a real number"):
        check_std(torch.ones(2), step=3)


def test_grouped_draws_are_bit_identical_to_noise_like():
    from lightning_gradmask.functional.noise import draw_dtype, draw_noise_, noise_seeds

    params = [torch.zeros(3, 4), torch.zeros(5, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.bfloat16), torch.zeros(())]
    indices = [0, 7, 3, 12]
    seeds = noise_seeds(5, 9, indices, stream="gradient")
    assert seeds == [noise_seed(5, 9, i, stream="gradient") for i in indices]
    draws = draw_noise_([torch.empty(p.shape, dtype=draw_dtype(p.dtype)) for p in params], seeds)
    for param, index, draw in zip(params, indices, draws):
        assert torch.equal(draw.to(param.dtype), noise_like(param, 5, 9, index, stream="gradient"))
