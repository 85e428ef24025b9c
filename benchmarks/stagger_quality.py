"""What the stand-in first bases of ``stagger_first`` cost in accuracy (issue 22).

The eigen mode's default ``stagger_first = 512`` gives a block that decomposes a factor at
least 512 wide an identity basis (an Adam step in the weight's own coordinates) until its
staggered refresh slot, at most ``inverse_every`` steps. No benchmark model has a factor that
wide, so this check trains one that has: an MLP 784-512-256-10 (A factors 785 and 513 wide) on
the Fashion-MNIST task's data (quick profile), RING at its defaults, 300 steps of batch 128,
validation accuracy, with the option at its default and off (a width above every factor).

    python -m benchmarks.stagger_quality [--seeds 3 4 5 6 7] [--lrs 1e-3 3e-3]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from torch import nn

import lightning_grng as lg
from benchmarks import harness
from benchmarks.suite import _write_csv

OFF = 10**9


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
        nn.Linear(256, 10),
    )  # fmt: skip


def run(seed: int, lr: float, stagger_first: int, steps: int = 300) -> float:
    """Validation accuracy after ``steps`` steps of RING (defaults but lr, stagger_first)."""
    task = harness.TASKS["fashion_mnist"]
    train_set, val_set, _, _ = harness.task_data(task, "quick")
    (x_all, y_all), (x_val, y_val) = train_set.tensors, val_set.tensors
    torch.manual_seed(seed)
    model = _mlp()
    opt = lg.RING(model.parameters(), lr=lr, stagger_first=stagger_first)
    lg.attach(model, opt, report=False)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(x_all), (128,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x_all[index]), y_all[index]).backward()
        opt.step()
    with torch.no_grad():
        return (model(x_val).argmax(1) == y_val).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5, 6, 7])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    parser.add_argument("--out", type=Path, default=None, help="CSV of every run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for lr in args.lrs:
        for width in (512, OFF):
            accs = [run(seed, lr, width) for seed in args.seeds]
            rows += [
                dict(lr=lr, stagger_first=width, seed=s, val_acc=a)
                for s, a in zip(args.seeds, accs, strict=True)
            ]
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            label = "512 (default)" if width == 512 else "off"
            print(
                f"lr {lr:g}  stagger_first {label:14s} "
                f"{100 * statistics.fmean(accs):.2f} ± {100 * spread:.2f}",
                flush=True,
            )
    if args.out is not None:
        _write_csv(args.out, list(rows[0]), rows)


if __name__ == "__main__":
    main()
