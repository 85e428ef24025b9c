"""Measurements behind issue 11's defaults: a GRNG optimizer's sweep-budget run on a benchmark
task for a grid of keyword settings (relative damping λ, KL-clip, fallback lr), one seed, the
suite's own loop (``harness.train``), appended to a CSV so an interrupted sweep resumes.

    python -m benchmarks.scale_sweep --task shakespeare --optimizer RING \\
        --lr 0.01 0.03 --grid damping=1e-3,1e-2 kl_clip=1e-2,none --out runs/scale.csv
"""

from __future__ import annotations

import argparse
import csv
import itertools
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.optimizers import BY_NAME, OptimizerSpec
from benchmarks.tasks import TASKS


def _value(text: str) -> object:
    if text.lower() == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(TASKS), required=True)
    parser.add_argument("--optimizer", required=True, choices=["KFAC", "RING", "RENG", "RKalman"])
    parser.add_argument("--lr", type=float, nargs="+", required=True)
    parser.add_argument("--grid", nargs="*", default=[], help="key=v1,v2 ...")
    parser.add_argument("--steps", type=int, default=None, help="default: the sweep budget")
    parser.add_argument("--out", type=Path, default=Path("runs/scale_sweep.csv"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    axes = {k: [_value(v) for v in vs.split(",")] for k, vs in (g.split("=") for g in args.grid)}
    done = set()
    if args.out.exists():
        with args.out.open() as f:
            done = {(r["task"], r["optimizer"], r["lr"], r["settings"]) for r in csv.DictReader(f)}
    budget = TASKS[args.task].budgets["full"]
    steps = args.steps or budget.sweep_steps
    base = BY_NAME[args.optimizer]
    for values in itertools.product(*axes.values()):
        kw = dict(zip(axes, values, strict=True))
        settings = " ".join(f"{k}={v}" for k, v in kw.items())
        for lr in args.lr:
            if (args.task, args.optimizer, str(lr), settings) in done:
                continue
            name = f"{args.optimizer} {settings}"
            BY_NAME[name] = OptimizerSpec(
                name,
                lambda m, lr, kw=kw, **extra: base.build(m, lr, **kw, **extra),
                (),
                settings,
                base.family,
            )
            job = harness.Job("sweep", args.task, "full", name, lr, 0, steps, 1)
            row, _ = harness.train(job)
            out = dict(
                task=args.task,
                optimizer=args.optimizer,
                lr=lr,
                settings=settings,
                val=row["final_val"],
                train_loss=row["final_train_loss"],
                seconds=row["train_seconds"],
                diverged=row["diverged"],
                kl_clip_bind_rate=row["kl_clip_bind_rate"],
            )
            print(out, flush=True)
            new = not args.out.exists()
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(out))
                if new:
                    writer.writeheader()
                writer.writerow(out)


if __name__ == "__main__":
    main()
