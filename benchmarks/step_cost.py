"""Per-step cost of the GRNG optimizers against AdamW, SOAP and Muon, side by side in one run.

Every optimizer trains a copy of the same model on the same batches, interleaved step by step
(``harness.step_time``); the ratio is of mean step times, so periodic work (statistics,
eigendecompositions) is amortized. One process, one torch thread unless ``--threads``.

    python -m benchmarks.step_cost --out benchmarks/results/step_cost/after.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.optimizers import BY_NAME, runs_on

DEFAULT_OPTIMIZERS = (
    "AdamW", "SOAP", "Muon", "KFAC-eigen", "RING-eigen", "RENG-eigen", "RING", "RKalman",
)  # fmt: skip
DEFAULT_TASKS = ("shakespeare", "fashion_mnist", "fashion_mnist_small", "imdb")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    parser.add_argument("--optimizers", nargs="+", default=list(DEFAULT_OPTIMIZERS))
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="CSV to write")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for task in args.tasks:
        names = [n for n in args.optimizers if runs_on(BY_NAME[n], task)]
        lrs = {n: (BY_NAME[n].lr_grid[len(BY_NAME[n].lr_grid) // 2] if BY_NAME[n].lr_grid else 0.01)
               for n in names}  # fmt: skip
        rows += harness.step_time(task, "quick", lrs, args.rounds)
        for row in rows[-len(names) :]:
            print(f"{task:20s} {row['optimizer']:12s} {row['ms_per_step']:9.2f} ms "
                  f"{row['ratio_to_adamw']:6.2f}x AdamW", flush=True)  # fmt: skip
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
