"""Run by tests/test_fsdp2.py: the callbacks together under ModelParallelStrategy (FSDP2), against strategy="ddp".

WeightNoise, GradientNoise, SensitiveColumnBlinding, GradientMask and MaskedL1Mixin in one Trainer
(HessianMonitor refuses FSDP2: tests/ddp/hessian_fsdp2.py).

Usage: python fsdp2_everything.py OUT_DIR [2d]

One launch of 2 gloo processes runs these fits, each from the same seeded start:

* ``ddp``: the reference, strategy="ddp", 4 epochs;
* ``fsdp2``: the same under ``ModelParallelStrategy(data_parallel_size=2)`` with ``fully_shard`` per layer;
* ``fsdp2_dcp`` / ``fsdp2_full``: 2 epochs, a checkpoint (distributed / one full file), then a resume
  with fresh callbacks for 2 more;
* ``ddp_built`` / ``fsdp2_built``: the layers built in ``configure_model`` (on the meta device under FSDP2);
* ``tp``: tensor parallelism instead (``tensor_parallel_size=2``: ``net.0`` column-wise, ``net.2``
  row-wise, ``net.4`` left whole), each rank seeing the whole batch that the two DDP ranks split.

With ``2d``, 4 processes instead: ``ddp4`` (strategy="ddp") and ``fsdp2_tp`` (``data_parallel_size=2,
tensor_parallel_size=2``: tensor parallelism, then ``fully_shard`` over the data-parallel mesh, which
gives the strided shards of FSDP2 over tensor parallelism). Every step sees the same 16 samples in all
fits, split among the data-parallel replicas.

Each fit saves, on every rank, the whole weights at the start and at the end (``full_tensor()``) to
OUT_DIR/<fit>_rank<r>.pt, with the logged metrics the test checks.
"""

import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from lightning_gradmask import GradientMask, GradientNoise, MaskedL1Mixin, SensitiveColumnBlinding, WeightNoise
from lightning_gradmask.functional.sharding import is_sharded, local_part, local_tensor
from lightning_gradmask.mixins.masked_l1 import _state_of

from utils import regression_data, run_distributed

SEVERED = [0, 1]
TRAINABLE = torch.ones(16, 6, dtype=torch.bool)
TRAINABLE[::2, 2:] = False  # half of the rows may not read columns 2..5
HEAD_TRAINABLE = torch.tensor([[True, False, True, False, True]])
# built here, not in configure_model: under FSDP2 that runs on the meta device, where a mask holds no values
L1_MASK = torch.rand(5, 16, generator=torch.Generator().manual_seed(4)) < 0.5


class SeededLinear(nn.Linear):
    """A Linear whose ``reset_parameters`` writes seeded values, whole or into its shard (FSDP2's meta init)."""

    def __init__(self, in_features: int, out_features: int, seed: int) -> None:
        self.seed = seed
        super().__init__(in_features, out_features)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        for param in (self.weight, self.bias):
            whole = torch.randn(tuple(param.shape), generator=generator) / self.in_features**0.5
            local_tensor(param).copy_(local_part(whole, like=param))


def layers() -> nn.Sequential:
    # 5 and 1 output rows: uneven shards, and an empty one on rank 1
    return nn.Sequential(SeededLinear(6, 16, 1), nn.Tanh(), SeededLinear(16, 5, 2), nn.Tanh(), SeededLinear(5, 1, 3))


class Model(MaskedL1Mixin, L.LightningModule):
    def __init__(self, out: Path, tag: str, build_in_configure_model: bool = False) -> None:
        super().__init__()
        self.out, self.tag = out, tag
        self.built_late = build_in_configure_model
        if not build_in_configure_model:
            self.net = layers()
            self.register_terms()

    def register_terms(self) -> None:
        self.register_masked_l1("net.0.weight", strength=1e-3)
        self.register_masked_l1("net.2.weight", mask=L1_MASK, strength=5e-3)
        self.register_masked_l1("net.4.weight", strength=2.0, proximal=True)

    def configure_model(self) -> None:
        if self.built_late:
            if hasattr(self, "net"):
                return
            self.net = layers()
            self.register_terms()
        mesh = self.device_mesh
        if mesh is None:  # strategy="ddp"
            return
        if mesh["tensor_parallel"].size() > 1:
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            parallelize_module(self.net, mesh["tensor_parallel"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        if mesh["data_parallel"].size() > 1:
            from torch.distributed.fsdp import fully_shard

            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh["data_parallel"])
            fully_shard(self.net, mesh=mesh["data_parallel"])

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def train_dataloader(self):
        data = regression_data(n=64, seed=2)
        # the data-parallel replicas split each step's 16 samples; tensor-parallel ranks share theirs
        mesh = self.device_mesh
        replicas = self.trainer.world_size if mesh is None else mesh["data_parallel"].size()
        rank = self.global_rank if mesh is None else mesh["data_parallel"].get_local_rank()
        sampler = DistributedSampler(data, num_replicas=replicas, rank=rank, shuffle=False)
        return DataLoader(data, batch_size=16 // replicas, sampler=sampler)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.02, weight_decay=0.1)

    def on_train_start(self):
        if self.trainer.ckpt_path is None:
            torch.save(whole_weights(self), self.out / f"{self.tag}_start_rank{self.global_rank}.pt")


def whole_weights(module: nn.Module) -> dict:
    # full_tensor() is a collective: every rank gathers every parameter, in the same order
    return {name: (p.full_tensor() if is_sharded(p) else p).detach().clone() for name, p in module.named_parameters()}


def callbacks() -> list:
    return [
        WeightNoise(std=1e-2, relative=True, seed=3),
        GradientNoise(std=1e-3, seed=5),
        SensitiveColumnBlinding(columns=SEVERED, layer="net.0"),
        GradientMask({"net.0.weight": TRAINABLE, "net.4.weight": HEAD_TRAINABLE, "net.2.bias": False}),
    ]


def fit(out: Path, tag: str, sharded: bool, epochs: int, *, resume_from=None, checkpoint=None, built=False, dp=2, tp=1):
    sizes = {"data_parallel_size": dp, "tensor_parallel_size": tp}
    strategy = ModelParallelStrategy(**sizes, **({} if checkpoint is None else checkpoint)) if sharded else "ddp"

    extra = [] if resume_from is not None or checkpoint is None else [ModelCheckpoint(dirpath=out / tag, save_last=True)]
    trainer = L.Trainer(
        accelerator="cpu", devices=dp * tp, strategy=strategy, max_epochs=epochs, use_distributed_sampler=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
        enable_checkpointing=bool(extra), logger=CSVLogger(out, name=tag), callbacks=[*callbacks(), *extra],
    )
    torch.manual_seed(0)
    model = Model(out, tag, build_in_configure_model=built)
    trainer.fit(model, ckpt_path=resume_from)
    blinding = next(c for c in trainer.callbacks if isinstance(c, SensitiveColumnBlinding))
    mask = next(c for c in trainer.callbacks if isinstance(c, GradientMask)).masks["net.0.weight"]
    result = {
        "final": whole_weights(model),
        "log_dir": trainer.log_dir,
        "deviation": blinding.weight_deviation(),
        "mask": (mask.device.type, tuple(mask.shape), type(mask).__name__),
        # the L1 masks the mixin holds for the step: (a DTensor?, bytes held, bytes of what it holds)
        "l1_masks": [
            (is_sharded(m), local_tensor(m).untyped_storage().nbytes(), local_tensor(m).numel() * m.element_size())
            for m in _state_of(model)._on_device.values()
            if m is not None
        ],
    }
    torch.save(result, out / f"{tag}_rank{trainer.global_rank}.pt")
    return trainer


def main() -> None:
    out = Path(sys.argv[1])
    if sys.argv[2:] == ["2d"]:
        fit(out, "ddp4", sharded=False, epochs=4, dp=4)
        fit(out, "fsdp2_tp", sharded=True, epochs=4, dp=2, tp=2)
        return
    fit(out, "ddp", sharded=False, epochs=4)
    fit(out, "fsdp2", sharded=True, epochs=4)
    for kind, distributed in (("dcp", True), ("full", False)):
        tag = f"fsdp2_{kind}"
        trainer = fit(out, f"{tag}_first", sharded=True, epochs=2, checkpoint={"save_distributed_checkpoint": distributed})
        last = Path(trainer.strategy.broadcast(str(out / f"{tag}_first" / "last.ckpt")))
        fit(out, tag, sharded=True, epochs=4, resume_from=last, checkpoint={"save_distributed_checkpoint": distributed})
    fit(out, "ddp_built", sharded=False, epochs=4, built=True)
    fit(out, "fsdp2_built", sharded=True, epochs=4, built=True)
    fit(out, "tp", sharded=True, epochs=4, dp=1, tp=2)


if __name__ == "__main__":
    run_distributed(main)
