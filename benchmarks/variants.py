"""Variants of one GRNG optimizer on a benchmark task, side by side: interleaved per-step time
against AdamW (``harness.step_time``, the suite's protocol) and the validation metric after the
sweep budget with the suite's loop (seed 0), written as a markdown table.

Presets:

* ``reng_routes``: RENG's two routes to ``Hg`` (double backprop, finite differences), in the
  eigen-corrected and the K-FAC mode;
* ``eigen_schedule``: KFAC in the eigen mode at its default statistics/basis schedule
  (every 5 / 20 steps) and sparser ones, the lever on the per-step cost.

    python -m benchmarks.variants --preset reng_routes --task shakespeare --lr 0.03 \\
        --out benchmarks/results/studies/reng_routes_shakespeare.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import lightning_grng as lg
from benchmarks import harness
from benchmarks.optimizers import BY_NAME, OptimizerSpec
from benchmarks.tasks import TASKS

#: The presets reproduce the committed studies: the eigen mode over K-FAC statistics.
EIGEN = dict(preconditioner="eigen", curvature="kfac", momentum_on="direction")
PRESETS: dict[str, dict[str, tuple[type[lg.GRNGOptimizer], dict[str, object]]]] = {
    "reng_routes": {
        "RENG-eigen (double backprop)": (lg.RENG, EIGEN),
        "RENG-eigen (finite difference)": (lg.RENG, {**EIGEN, "gr_mode": "finite_difference"}),
        "RENG (double backprop)": (lg.RENG, dict(preconditioner="kfac")),
        "RENG (finite difference)": (
            lg.RENG,
            dict(preconditioner="kfac", gr_mode="finite_difference"),
        ),
    },
    "eigen_schedule": {
        "KFAC-eigen (5, 20)": (lg.KFAC, EIGEN),
        "KFAC-eigen (10, 50)": (lg.KFAC, {**EIGEN, "curvature_every": 10, "inverse_every": 50}),
        "KFAC-eigen (20, 100)": (lg.KFAC, {**EIGEN, "curvature_every": 20, "inverse_every": 100}),
    },
}


def _register(variants: dict[str, tuple[type[lg.GRNGOptimizer], dict[str, object]]]) -> None:
    for name, (cls, kw) in variants.items():
        BY_NAME[name] = OptimizerSpec(
            name,
            lambda m, lr, cls=cls, kw=kw: cls(m.parameters(), lr=lr, **kw),
            (),
            name,
            "grng",
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(PRESETS), required=True)
    parser.add_argument("--task", choices=list(TASKS), default="shakespeare")
    parser.add_argument("--lr", type=float, nargs="+", default=[0.03], help="eigen-mode rates")
    parser.add_argument("--kfac-lr", type=float, default=0.03)
    parser.add_argument("--adamw-lr", type=float, default=0.03)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--profile", choices=("full", "tiny"), default="full")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    variants = PRESETS[args.preset]
    _register(variants)

    def lr_of(name: str, eigen_lr: float) -> float:
        return eigen_lr if "eigen" in name else args.kfac_lr

    lrs = {"AdamW": args.adamw_lr, **{n: lr_of(n, args.lr[0]) for n in variants}}
    warmup = 10 if args.profile == "full" else 2
    timing = harness.step_time(args.task, args.profile, lrs, args.rounds, warmup=warmup)
    steps = TASKS[args.task].budgets[args.profile].sweep_steps
    quality = []
    for name in variants:
        for lr in args.lr if "eigen" in name else [args.kfac_lr]:
            job = harness.Job("sweep", args.task, args.profile, name, lr, 0, steps, 1)
            row, _ = harness.train(job)
            quality.append((name, lr, row["final_val"], row["train_seconds"]))
            print(quality[-1], flush=True)

    lines = [
        f"# {args.preset} on {args.task}",
        "",
        f"`python -m benchmarks.variants --preset {args.preset} --task {args.task} --lr "
        f"{' '.join(map(str, args.lr))} --rounds {args.rounds}`; one thread, interleaved step "
        f"time over {args.rounds} rounds (mean, ratio to AdamW at lr {args.adamw_lr}); "
        f"validation metric after {steps} steps (the sweep budget), seed 0.",
        "",
        "| optimizer | ms / step | × AdamW |",
        "|---|---|---|",
        *(f"| {r['optimizer']} | {r['ms_per_step']} | {r['ratio_to_adamw']} |" for r in timing),
        "",
        "| variant | lr | validation | train seconds |",
        "|---|---|---|---|",
        *(f"| {n} | {lr} | {val:.4f} | {sec:.1f} |" for n, lr, val, sec in quality),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
