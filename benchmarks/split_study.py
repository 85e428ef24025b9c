"""Quality cost of the per-dimension split of convolution factors (``split_conv``, issue 22):
RING at its defaults with each conv's input factor whole against split into channels ⊗ taps,
on a benchmark task at its full budget, same lr, 3 seeds (the suite's ``final`` runs: test
metric). Resumable: finished rows of ``--out`` are kept.

    python -m benchmarks.split_study --task fashion_mnist --lr 0.03 \\
        --out benchmarks/results/step_cost/split_fashion_mnist.csv
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

import torch

import lightning_grng as lg
from benchmarks import harness
from benchmarks.optimizers import BY_NAME, OptimizerSpec

#: ``split_conv`` per variant: None keeps the default (no conv of the benchmark CNN is wider
#: than 512 columns, so its factors stay whole); 1 splits every convolution.
VARIANTS = {"RING (whole conv factors)": 10**9, "RING (split_conv=1)": 1}
FIELDS = ("variant", "seed", "lr", "final_test", "final_val", "train_seconds")


def _register() -> None:
    for name, cap in VARIANTS.items():
        BY_NAME[name] = OptimizerSpec(
            name,
            lambda m, lr, cap=cap: lg.RING(m.parameters(), lr=lr, split_conv=cap),
            (),
            name,
            "grng",
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="fashion_mnist")
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--profile", choices=("full", "quick", "tiny"), default="full")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    _register()
    done: list[dict[str, str]] = []
    if args.out.exists():
        with args.out.open() as f:
            done = list(csv.DictReader(f))
    have = {(r["variant"], int(r["seed"])) for r in done}
    budget = harness.budget(args.task, args.profile)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for seed in range(args.seeds):
        for name in VARIANTS:
            if (name, seed) in have:
                continue
            job = harness.Job(
                "final", args.task, args.profile, name, args.lr, seed, budget.steps, budget.evals
            )
            row, _ = harness.train(job)
            done.append({k: str(v) for k, v in {
                "variant": name, "seed": seed, "lr": args.lr, "final_test": row["final_test"],
                "final_val": row["final_val"], "train_seconds": row["train_seconds"],
            }.items()})  # fmt: skip
            with args.out.open("w", newline="") as f:
                writer = csv.DictWriter(f, FIELDS)
                writer.writeheader()
                writer.writerows(done)
            print(done[-1], flush=True)
    for name in VARIANTS:
        tests = [float(r["final_test"]) for r in done if r["variant"] == name]
        spread = statistics.stdev(tests) if len(tests) > 1 else float("nan")
        print(f"{name}: test {statistics.mean(tests):.4f} ± {spread:.4f} ({len(tests)} seeds)")


if __name__ == "__main__":
    main()
