"""Per-step time of each optimizer as a ratio to AdamW, measured interleaved in one process.

Every optimizer trains its own copy of the same model on the same batches; one round times one
full step (forward, backward, optimizer step) of each optimizer in turn, so drifts of the shared
machine hit all of them alike. Reported: median milliseconds per step and the ratio to AdamW.

    python -m benchmarks.step_time [--rounds 200] [--models mlp cnn] [--out FILE.csv]
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import lightning_grng as lg

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def default_optimizers() -> dict[str, OptimizerFactory]:
    optimizers: dict[str, OptimizerFactory] = {
        "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-3),
        "SGD": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        "KFAC": lambda p: lg.KFAC(p),
        "RING": lambda p: lg.RING(p),
        "RING-newton": lambda p: lg.RING(p, inverse="newton"),
        "RENG": lambda p: lg.RENG(p),
        "RENG-fd": lambda p: lg.RENG(p, gr_mode="finite_difference"),
    }
    if hasattr(lg, "RKalman"):
        optimizers["RKalman"] = lambda p: lg.RKalman(p)
    return optimizers


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
        nn.Linear(128, 10),
    )  # fmt: skip


def cnn() -> nn.Module:
    from examples.models import ImageClassifier

    return ImageClassifier().net


MODELS = {"mlp": mlp, "cnn": cnn}


class Runner:
    """One optimizer training its own copy of the model."""

    def __init__(self, name: str, make: OptimizerFactory, model: nn.Module) -> None:
        self.name = name
        self.model = copy.deepcopy(model)
        self.opt = make(list(self.model.parameters()))
        self.grng = isinstance(self.opt, lg.GRNGOptimizer)
        if self.grng:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lg.attach(self.model, self.opt)
        self.double = isinstance(self.opt, lg.RENG) and self.opt.gr_mode.value == "double_backprop"
        self.times: list[float] = []

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        start = time.perf_counter()

        def closure() -> torch.Tensor:
            self.opt.zero_grad()
            loss = nn.functional.cross_entropy(self.model(x), y)
            if self.double:
                lg.regularized_backward(loss, self.opt)
            else:
                loss.backward()
            return loss

        loss = self.opt.step(closure)
        self.times.append(time.perf_counter() - start)
        return float(loss.detach())


def measure(
    model_name: str,
    optimizers: dict[str, OptimizerFactory],
    rounds: int,
    batch_size: int = 128,
    warmup: int = 20,
) -> list[dict[str, object]]:
    torch.manual_seed(0)
    model = MODELS[model_name]()
    runners = [Runner(name, make, model) for name, make in optimizers.items()]
    g = torch.Generator().manual_seed(0)
    data = [
        (
            torch.randn(batch_size, 1, 28, 28, generator=g),
            torch.randint(0, 10, (batch_size,), generator=g),
        )
        for _ in range(16)
    ]
    for r in range(warmup + rounds):
        x, y = data[r % len(data)]
        for runner in runners if r % 2 == 0 else reversed(runners):
            runner.step(x, y)
    rows = []
    base = statistics.median(runners[0].times[warmup:])
    for runner in runners:
        median = statistics.median(runner.times[warmup:])
        rows.append(
            dict(
                model=model_name,
                optimizer=runner.name,
                ms_per_step=round(1000 * median, 3),
                ratio_to_adamw=round(median / base, 3),
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--optimizers", nargs="+", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    optimizers = default_optimizers()
    if args.optimizers:
        optimizers = {"AdamW": optimizers["AdamW"]} | {k: optimizers[k] for k in args.optimizers}
    rows = [row for m in args.models for row in measure(m, optimizers, args.rounds)]
    print(f"{'model':6} {'optimizer':12} {'ms/step':>9} {'x AdamW':>8}")
    for row in rows:
        print(
            f"{row['model']:6} {row['optimizer']:12} {row['ms_per_step']:9.2f} "
            f"{row['ratio_to_adamw']:8.2f}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
