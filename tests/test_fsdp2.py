"""Every callback together under ModelParallelStrategy (FSDP2, tensor parallel), 2 gloo processes.

GradientMask, SensitiveColumnBlinding, MaskedL1Mixin, GradientNoise and WeightNoise in one Trainer;
HessianMonitor's refusal is tested in test_hessian_monitor.py.

One launch of tests/ddp/fsdp2_everything.py runs every fit (see its docstring); the tests read what
each rank saved.
"""

import csv
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from lightning_gradmask import GradientMask, GradmaskConfigError, SensitiveColumnBlinding, UnsupportedStrategyError

from utils import FSDP2_RUNS_ON_CPU, FSDP2_SKIP_REASON, REPO_ROOT, TinyRegressor, run_script

SCRIPT = REPO_ROOT / "tests" / "ddp" / "fsdp2_everything.py"
SEVERED = [0, 1]
TRAINABLE = torch.ones(16, 6, dtype=torch.bool)
TRAINABLE[::2, 2:] = False
HEAD_TRAINABLE = torch.tensor([[True, False, True, False, True]])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    if not FSDP2_RUNS_ON_CPU:
        pytest.skip(FSDP2_SKIP_REASON)
    out = tmp_path_factory.mktemp("fsdp2")
    run_script(SCRIPT, str(out), timeout=400)
    run_script(SCRIPT, str(out), "2d", timeout=400)  # 4 processes: FSDP2 over tensor parallelism
    return out


def load(out: Path, name: str) -> dict:
    return torch.load(out / f"{name}.pt", weights_only=False)


def metrics(log_dir: str) -> list[dict[str, str]]:
    with open(Path(log_dir) / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize(
    ("fsdp2", "ddp", "first"),
    [
        ("fsdp2", "ddp", "fsdp2"),
        ("fsdp2_built", "ddp_built", "fsdp2_built"),
        ("tp", "ddp", "tp"),
        ("fsdp2_tp", "ddp4", "fsdp2_tp"),
    ],
)
def test_fsdp2_keeps_every_guarantee_and_equals_ddp(runs, fsdp2, ddp, first):
    ranks = [load(runs, f"{fsdp2}_rank{r}") for r in ((0, 1, 2, 3) if fsdp2 == "fsdp2_tp" else (0, 1))]
    start = load(runs, f"{first}_start_rank0")
    final = ranks[0]["final"]
    # ranks hold the same whole model
    for other in ranks[1:]:
        for name, value in final.items():
            assert torch.equal(value, other["final"][name]), name
    # the L1 masks held for the step: placed like their (sharded) parameters, holding only the shard
    for rank in ranks:
        assert rank["l1_masks"] and all(sharded and held == size for sharded, held, size in rank["l1_masks"])

    weight = final["net.0.weight"]
    assert torch.equal(weight[:, SEVERED], torch.zeros(16, 2))  # severed exactly 0
    for rank in ranks:
        assert rank["deviation"] == 0.0
        assert rank["mask"] == ("cpu", (16, 6), "Tensor")  # the whole bool mask, on the CPU
    frozen = ~TRAINABLE
    frozen[:, SEVERED] = False
    assert torch.equal(weight[frozen], start["net.0.weight"][frozen])  # frozen entries bit-identical
    assert torch.equal(final["net.2.bias"], start["net.2.bias"])
    head, head_start = final["net.4.weight"], start["net.4.weight"]
    assert torch.equal(head[~HEAD_TRAINABLE], head_start[~HEAD_TRAINABLE])  # the rank-1 shard of this row is empty
    assert (head[HEAD_TRAINABLE] == 0).any()  # the proximal L1 step reached exact zeros
    trainable = TRAINABLE.clone()
    trainable[:, SEVERED] = False
    assert (weight[trainable] != start["net.0.weight"][trainable]).all()

    reference = load(runs, f"{ddp}_rank0")["final"]
    for name, value in final.items():
        torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(("fsdp2", "ddp"), [("fsdp2", "ddp"), ("tp", "ddp"), ("fsdp2_tp", "ddp4")])
def test_fsdp2_logs_the_global_figures_ddp_logs(runs, fsdp2, ddp):
    sharded = metrics(load(runs, f"{fsdp2}_rank0")["log_dir"])
    reference = metrics(load(runs, f"{ddp}_rank0")["log_dir"])
    keys = ("gradient_mask/frozen_fraction", "gradient_mask/removed_grad_norm", "masked_l1/penalty", "masked_l1/zero_fraction")
    steps = [row for row in sharded if row.get(keys[0])]
    assert len(steps) == 16
    for got, expected in zip(steps, (row for row in reference if row.get(keys[0]))):
        for key in keys:  # the L1 penalty and the removed norm are global, not one shard's part
            assert float(got[key]) == pytest.approx(float(expected[key]), rel=1e-5), key
    deviations = [row for row in sharded if row.get("blinding/net.0/weight_deviation")]
    assert len(deviations) == 4 and all(float(row["blinding/net.0/weight_deviation"]) == 0.0 for row in deviations)


@pytest.mark.parametrize("kind", ["dcp", "full"])
def test_resume_from_either_checkpoint_kind_equals_the_uninterrupted_run(runs, kind):
    uninterrupted = load(runs, "fsdp2_rank0")["final"]
    for rank in (0, 1):
        resumed = load(runs, f"fsdp2_{kind}_rank{rank}")["final"]
        for name, value in uninterrupted.items():
            assert torch.equal(resumed[name], value), name


def test_checkpoints_hold_the_masks(runs):
    full = torch.load(runs / "fsdp2_full_first" / "last.ckpt", weights_only=True)
    distributed = torch.load(runs / "fsdp2_dcp_first" / "last.ckpt" / "meta.pt", weights_only=True)
    for checkpoint in (full, distributed):
        (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("GradientMask")]
        assert torch.equal(state["masks"]["net.0.weight"], TRAINABLE)
        assert torch.equal(state["masks"]["net.4.weight"], HEAD_TRAINABLE)


def test_a_full_fsdp2_checkpoint_loads_into_a_plain_model(runs):
    spec = importlib.util.spec_from_file_location("fsdp2_everything", SCRIPT)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    Model = script.Model

    checkpoint = torch.load(runs / "fsdp2_full_first" / "last.ckpt", weights_only=True)
    model = Model(runs, "plain")
    model.load_state_dict(checkpoint["state_dict"])  # strict: the keys and shapes of the unsharded model
    saved = load(runs, "fsdp2_full_first_rank0")["final"]
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), saved[name]), name


def test_fsdp1_is_refused_with_a_pointer_to_model_parallel_strategy():
    on_fsdp1 = SimpleNamespace(strategy=FSDPStrategy())
    for callback in (GradientMask({"net.0.weight": False}), SensitiveColumnBlinding(columns=[0])):
        with pytest.raises(UnsupportedStrategyError, match=r"FSDPStrategy.*FSDP1.*Use ModelParallelStrategy"):
            callback.setup(on_fsdp1, TinyRegressor(), "fit")


def test_compact_mode_under_fsdp2_is_refused_at_setup():
    on_fsdp2 = SimpleNamespace(strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1))
    model = TinyRegressor()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(GradmaskConfigError, match=r"compact=True.*ModelParallelStrategy.*compact=False"):
        GradientMask({"net.0.weight": torch.rand(8, 6) < 0.5}, compact=True).setup(on_fsdp2, model, "fit")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("pieces", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [0, 1, 2, 3, 5, 7, 9])
def test_local_shards_are_cut_like_torch_chunk(size, pieces):
    from lightning_gradmask.functional.sharding import _chunk

    whole = torch.arange(size * 3).reshape(size, 3)
    chunks = list(torch.chunk(whole, pieces, dim=0)) if size else []
    for index in range(pieces):
        expected = chunks[index] if index < len(chunks) else whole[:0]  # chunk gives fewer pieces: empty shards
        assert torch.equal(_chunk(whole, 0, pieces, index), expected)


def test_sums_over_shards_add_over_every_cut_mesh_dimension():
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    from lightning_gradmask.functional.sharding import summing_placements

    # FSDP2 over tensor parallelism places a weight as (strided shard over data parallel, shard over tensor parallel)
    placements = [_StridedShard(0, split_factor=2), Shard(1), Replicate()]
    assert [type(p) for p in summing_placements(placements)] == [Partial, Partial, Replicate]


def test_plain_tensors_pass_through_the_sharding_helpers():
    from lightning_gradmask.functional.sharding import local_part, local_tensor, sharded_sum

    whole, param = torch.ones(2, 3), torch.zeros(2, 3)
    assert local_part(whole, like=param) is whole and local_tensor(param) is param
    assert sharded_sum([torch.tensor(2.0), torch.tensor(3.0)], [param, param]) == 5.0
