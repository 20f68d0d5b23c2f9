"""Sparse fine-tuning of a small transformer: 1% of each encoder weight trains, the optimizer holds only those.

A tiny BERT sequence classifier is built from a config (nothing is downloaded), "pre-trained" weights are
whatever its seeded initialisation gives, and a synthetic task (is token 7 in the sequence?) is learned by
training 1% of the entries of every encoder weight matrix plus the classification head, with
``GradientMask(compact=True)``: the optimizer steps compact tensors of the trainable entries only. The
script prints the optimizer's state and gradient sizes against plain AdamW on the whole model, the peak
RSS, the accuracy before and after (the sparse runs take a larger learning rate, as sparse fine-tuning
usually does), and checks every frozen entry bit for bit::

    python examples/sparse_finetune.py
    python examples/sparse_finetune.py --density 0.05 --epochs 6 --dense   # also the dense mask, side by side
"""

from __future__ import annotations

import argparse
import resource
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradmask import GradientMask

warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")

VOCAB, LENGTH, SIGNAL = 200, 16, 7


class Classifier(L.LightningModule):
    """``model``: a 2-layer BERT (hidden 64) with a 2-class head, from ``BertConfig``; AdamW."""

    def __init__(self, lr: float, seed: int = 0) -> None:
        super().__init__()
        self.lr = lr
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(seed)
        config = BertConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
            max_position_embeddings=LENGTH, num_labels=2,
        )
        self.model = BertForSequenceClassification(config)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, labels = batch
        return self.model(input_ids=ids, labels=labels).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)

    @torch.no_grad()
    def accuracy(self, data: TensorDataset) -> float:
        ids, labels = data.tensors
        self.eval()
        predicted = self.model(input_ids=ids).logits.argmax(-1)
        self.train()
        return float((predicted == labels).float().mean())


def task(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, VOCAB, (n, LENGTH), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    where = torch.randint(0, LENGTH, (n,), generator=g)
    ids[labels == 1, where[labels == 1]] = SIGNAL
    return TensorDataset(ids, labels)


def sparse_spec(module: torch.nn.Module, density: float, seed: int = 1) -> dict[str, torch.Tensor]:
    """A random ``density`` of the entries of every encoder weight matrix; the rest of the model is frozen."""
    g = torch.Generator().manual_seed(seed)
    spec: dict[str, Any] = {}
    for name, param in module.named_parameters():
        if name.startswith("model.classifier."):
            continue  # the new head trains whole
        if name.startswith("model.bert.encoder.") and param.dim() == 2:
            spec[name] = torch.rand(param.shape, generator=g) < density
        else:
            spec[name] = False  # embeddings, norms, biases, pooler: frozen whole
    return spec


class Sizes(Callback):
    """What the optimizer holds during training: state entries and gradient entries of its parameters."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.state = sum(v.numel() * v.element_size() for p in params for v in optimizer.state.get(p, {}).values()
                         if torch.is_tensor(v) and v.dim())
        self.peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(spec_density: float | None, compact: bool, args: argparse.Namespace) -> tuple[Classifier, dict[str, Any]]:
    model = Classifier(lr=args.lr if spec_density is None else args.sparse_lr)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    train = task(512, seed=2)
    callbacks: list[Callback] = [sizes := Sizes()]
    spec = None
    if spec_density is not None:
        spec = sparse_spec(model, spec_density)
        callbacks.append(GradientMask(spec, compact=compact))
    before = model.accuracy(task(256, seed=3))
    L.Trainer(
        accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    ).fit(model, DataLoader(train, batch_size=32, shuffle=True))
    result: dict[str, Any] = {"before": before, "after": model.accuracy(task(256, seed=3)), "state": sizes.state,
                              "peak": sizes.peak_mib}
    if spec is not None:
        exact = moved = trainable = 0
        for name, param in model.named_parameters():
            mask = spec.get(name, True)
            mask = torch.full(param.shape, mask) if isinstance(mask, bool) else mask
            exact += int(torch.equal(param.detach()[~mask], initial[name][~mask]))
            moved += int((param.detach()[mask] != initial[name][mask]).sum())
            trainable += int(mask.sum())
        result.update(exact=exact, params=len(initial), moved=moved, trainable=trainable)
    return model, result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--density", type=float, default=0.01, help="trainable share of each encoder weight")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--dense", action="store_true", help="also run the dense mask (compact=False)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate when everything trains")
    parser.add_argument("--sparse-lr", type=float, default=3e-2, help="AdamW learning rate for the sparse runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)

    model, plain = run(None, False, args)
    total = sum(p.numel() for p in model.parameters())
    runs = [(f"plain AdamW (lr {args.lr:g}), everything trains", plain)]
    if args.dense:
        runs.append((f"GradientMask, dense, {args.density:.0%} (lr {args.sparse_lr:g})", run(args.density, False, args)[1]))
    runs.append((f"GradientMask(compact=True), {args.density:.0%} (lr {args.sparse_lr:g})", run(args.density, True, args)[1]))
    print(f"tiny BERT classifier: {total:,} parameters; task: is token {SIGNAL} in the sequence")
    print(f"{'run':50s} {'accuracy before -> after':>25s} {'optimizer state':>16s} {'peak RSS':>10s}")
    for label, result in runs:
        print(f"{label:50s} {result['before']:14.3f} -> {result['after']:.3f} {result['state'] / 1024:12.1f} KiB "
              f"{result['peak']:7.0f} MiB")
    compact = runs[-1][1]
    print(f"trainable entries: {compact['trainable']:,} of {total:,} ({compact['trainable'] / total:.2%}); "
          f"{compact['moved']:,} of them moved")
    print(f"frozen entries bit-identical in {compact['exact']} of {compact['params']} parameters: "
          f"{'EXACT' if compact['exact'] == compact['params'] else 'NOT EXACT'}")
    print("peak RSS is the whole process's (the runs share it); the optimizer state is exact bytes")


if __name__ == "__main__":
    main()
