"""Seeded noise and std schedules (pure tensor code, no Trainer)."""

import math

import pytest
import torch

from lightning_gradmask.functional.noise import (
    NOISE_CHUNK,
    AnnealedStd,
    NoiseLayout,
    NoiseStdError,
    check_std,
    make_schedule,
    noise_for,
)


def test_noise_is_a_function_of_seed_step_stream_and_the_targets_only():
    targets = [torch.empty(4, 5), torch.empty(3)]
    reference = noise_for(targets, 3, 7)
    torch.manual_seed(123)  # the global RNG plays no part
    assert all(torch.equal(a, b) for a, b in zip(noise_for(targets, 3, 7), reference))
    for other in (noise_for(targets, 4, 7), noise_for(targets, 3, 8), noise_for(targets, 3, 7, stream="x")):
        assert not torch.equal(other[0], reference[0])
    # the values of the tensors play no part, only their shapes and dtypes
    assert torch.equal(noise_for([torch.ones(4, 5), torch.ones(3)], 3, 7)[1], reference[1])


def test_the_tensors_of_a_dtype_share_one_stream_and_each_dtype_has_its_own():
    flat = noise_for([torch.empty(23)], 1, 2)[0]
    parts = noise_for([torch.empty(4, 5), torch.empty(3)], 1, 2)
    assert torch.equal(torch.cat([p.flatten() for p in parts]), flat)
    # a float64 tensor in between draws from the float64 stream: the float32 noise is unchanged
    mixed = noise_for([torch.empty(4, 5), torch.empty(6, dtype=torch.float64), torch.empty(3)], 1, 2)
    assert torch.equal(mixed[0], parts[0]) and torch.equal(mixed[2], parts[1]) and mixed[1].dtype == torch.float64


def test_noise_takes_the_tensor_dtype_and_shape():
    assert noise_for([torch.zeros(3, dtype=torch.float64)], 0, 0)[0].dtype == torch.float64
    half = noise_for([torch.zeros(2, 3, dtype=torch.bfloat16)], 0, 0)[0]
    assert half.dtype == torch.bfloat16 and half.shape == (2, 3)
    assert noise_for([torch.zeros(())], 0, 0)[0].shape == ()
    assert noise_for([torch.zeros(0, 4)], 0, 0)[0].shape == (0, 4)
    with pytest.raises(TypeError, match="floating-point"):
        noise_for([torch.zeros(3, dtype=torch.long)], 0, 0)
    with pytest.raises(TypeError, match="step must be an integer"):
        noise_for([torch.zeros(3)], 0, 1.5)  # type: ignore[arg-type]


def test_noise_is_standard_normal_across_chunks():
    sample = noise_for([torch.empty(3 * NOISE_CHUNK + 17)], 0, 0)[0]
    assert abs(sample.mean().item()) < 0.01 and abs(sample.std().item() - 1) < 0.01
    chunks = sample[: 3 * NOISE_CHUNK].view(3, NOISE_CHUNK)
    assert not torch.equal(chunks[0], chunks[1])  # each chunk has its own generator seed


def test_a_part_of_a_tensor_gets_the_entries_of_its_whole():
    # rows of a (rows, 300) tensor, as an FSDP2 shard holds them; the parts cross chunk boundaries
    shapes = [(5, 7), (500, 300), (9,)]
    whole = noise_for([torch.empty(s) for s in shapes], 4, 11, stream="gradient")
    for rows in ((0, 250), (250, 500), (219, 220), (500, 500)):
        start, stop = rows[0] * 300, rows[1] * 300
        parts = [(0, 35, (5, 7)), (start, stop, (rows[1] - rows[0], 300)), (3, 9, (6,))]
        layout = NoiseLayout(shapes, [torch.float32] * 3, parts=parts)
        drawn = layout.draw_(4, 11, stream="gradient", scale=0.5)
        assert torch.equal(drawn[0], whole[0] * 0.5)
        assert torch.equal(drawn[1], whole[1][rows[0] : rows[1]] * 0.5)
        assert torch.equal(drawn[2], whole[2][3:] * 0.5)
    with pytest.raises(ValueError, match="does not fit"):
        NoiseLayout([(4,)], [torch.float32], parts=[(2, 6, (4,))])


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


def test_tensors_of_one_span_on_different_devices_each_get_their_own_copy():
    # "meta" stands in for a second device: the noise arrives there with its shape and dtype
    shapes, dtypes = [(3, 4), (5,)], [torch.float16, torch.float16]
    drawn = NoiseLayout(shapes, dtypes, devices=["cpu", "meta"]).draw_(2, 3, scale=2.0)
    reference = noise_for([torch.empty(s, dtype=torch.float16) for s in shapes], 2, 3)
    assert drawn[1].device.type == "meta" and drawn[1].shape == (5,) and drawn[1].dtype == torch.float16
    assert torch.equal(drawn[0], reference[0] * 2.0)
