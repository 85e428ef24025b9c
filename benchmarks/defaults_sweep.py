"""Small sweep behind the optimizers' defaults: the example CNN on a Fashion-MNIST subset,
plain PyTorch loop, validation accuracy after a fixed number of epochs.

    python -m benchmarks.defaults_sweep [--subset 10000] [--epochs 2] [--out FILE.csv]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import lightning_grng as lg
from benchmarks.optimizers import grad_norm
from examples.data.datamodules import FashionMNISTDataModule
from examples.models import ImageClassifier


def run(make, loaders, epochs: int, seed: int = 0) -> tuple[float, float, float]:
    """Trains the example CNN; returns (validation accuracy, seconds, mean ‖∇ℓ‖)."""
    torch.manual_seed(seed)
    model = ImageClassifier().net
    opt = make(model.parameters())
    if isinstance(opt, lg.GRNGOptimizer):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lg.attach(model, opt)
    double = isinstance(opt, lg.RENG)
    train, val = loaders
    start = time.perf_counter()
    grad_norms = []
    for _ in range(epochs):
        model.train()
        for x, y in train:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if double:
                lg.regularized_backward(loss, opt)
            else:
                loss.backward()
            norm = None if isinstance(opt, lg.GRNGOptimizer) else grad_norm(model.parameters())
            opt.step()
            grad_norms.append(opt.diagnostics["grad_norm"] if norm is None else norm)
    seconds = time.perf_counter() - start
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in val:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total, seconds, sum(grad_norms) / len(grad_norms)


def grid() -> dict[str, object]:
    configs: dict[str, object] = {}
    for lr in (3e-4, 1e-3, 3e-3):
        configs[f"AdamW lr={lr}"] = lambda p, lr=lr: torch.optim.AdamW(p, lr=lr)
    for lr, damping in itertools.product((0.02, 0.05, 0.1), (0.03, 0.1, 0.3)):
        configs[f"KFAC lr={lr} damping={damping}"] = lambda p, lr=lr, d=damping: lg.KFAC(
            p, lr=lr, damping=d
        )
        configs[f"RING lr={lr} damping={damping}"] = lambda p, lr=lr, d=damping: lg.RING(
            p, lr=lr, damping=d
        )
    for lr in (0.05, 0.1):
        configs[f"RING-newton lr={lr} damping=0.1"] = lambda p, lr=lr: lg.RING(
            p, lr=lr, inverse="newton"
        )
    for kl in (1e-3, 1e-1):
        configs[f"RING lr=0.05 damping=0.1 kl_clip={kl}"] = lambda p, kl=kl: lg.RING(
            p, lr=0.05, kl_clip=kl
        )
    for rho in (0.01, 1.0):
        configs[f"RING lr=0.05 damping=0.1 rho={rho}"] = lambda p, r=rho: lg.RING(p, lr=0.05, rho=r)
    return configs


def finalists() -> dict[str, object]:
    """The candidates for the defaults, compared over several seeds."""
    return {
        "AdamW lr=0.003": lambda p: torch.optim.AdamW(p, lr=3e-3),
        "KFAC lr=0.02": lambda p: lg.KFAC(p, lr=0.02),
        "RING-eigh lr=0.02": lambda p: lg.RING(p, lr=0.02, inverse="eigh"),
        "RING-eigh lr=0.05": lambda p: lg.RING(p, lr=0.05, inverse="eigh"),
        "RING-newton lr=0.02": lambda p: lg.RING(p, lr=0.02, inverse="newton"),
        "RING-newton lr=0.05": lambda p: lg.RING(p, lr=0.05, inverse="newton"),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--subset", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--only", default=None, help="substring filter on config names")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--finalists", action="store_true", help="compare finalists over seeds")
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args()
    dm = FashionMNISTDataModule(batch_size=128, subset=args.subset)
    dm.setup("fit")
    loaders = (dm.train_dataloader(), dm.val_dataloader())
    rows = []
    configs = finalists() if args.finalists else grid()
    for seed in range(args.seeds):
        for name, make in configs.items():
            if args.only and args.only not in name:
                continue
            acc, seconds, norm = run(make, loaders, args.epochs, seed=seed)
            rows.append(dict(config=name, seed=seed, val_acc=round(acc, 4),
                             seconds=round(seconds, 1), mean_grad_norm=round(norm, 4)))  # fmt: skip
            print(f"{name:40} seed={seed} val_acc={acc:.4f} time={seconds:6.1f}s "
                  f"grad_norm={norm:.3f}", flush=True)  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
