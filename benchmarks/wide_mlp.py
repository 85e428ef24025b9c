"""Per-step cost of the wide-input MLP (784-256-128-10, batch 128) relative to AdamW, on CPU.

Interleaved (each round: ``--steps`` steps of every variant in turn, order alternating),
single thread, median over rounds; ``--repeats`` independent runs, median of their ratios
(the machine may be shared). Variants:

* ``KFAC``: defaults (eigh, statistics every 5 steps, staggered inverses every 20);
* ``KFAC wide x4``: ``wide_refresh = (512, 4)``: the 785-wide factor's block refreshes every 80;
* ``RING``: defaults (Newton–Schulz inverses);
* ``floor``: KFAC whose inverses are never refreshed after the first, i.e. the cost of exact
  Kronecker preconditioning plus statistics alone (what amortization can approach).

    python -m benchmarks.wide_mlp [--rounds 6] [--steps 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import lightning_grng as lg


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
        nn.Linear(128, 10),
    )  # fmt: skip


def _kfac(**attrs: object) -> Callable[[nn.Module], torch.optim.Optimizer]:
    def make(model: nn.Module) -> torch.optim.Optimizer:
        opt = lg.KFAC(model.parameters(), lr=0.01)
        for key, value in attrs.items():
            setattr(opt, key, value)
        return opt

    return make


VARIANTS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
    "KFAC": _kfac(),
    "KFAC wide x4": _kfac(wide_refresh=(512, 4)),
    "RING": lambda m: lg.RING(m.parameters(), lr=0.01),
    "floor": _kfac(inverse_every=10**9),
}


def one_run(rounds: int, steps: int, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    base = mlp()
    runs = []
    for name, make in VARIANTS.items():
        model = mlp()
        model.load_state_dict(base.state_dict())
        opt = make(model)
        if isinstance(opt, lg.GRNGOptimizer):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lg.attach(model, opt)
        runs.append((name, model, opt))
    gen = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(128, 784, generator=gen), torch.randint(0, 10, (128,), generator=gen))
               for _ in range(8)]  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(rounds + 1):
        for name, model, opt in runs if r % 2 == 0 else runs[::-1]:
            start = time.perf_counter()
            for i in range(steps):
                x, y = batches[i % len(batches)]
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            if r > 0:  # the first round warms up (and holds every first refresh)
                times[name].append((time.perf_counter() - start) / steps)
    adamw = statistics.median(times["AdamW"])
    return {name: statistics.median(t) / adamw for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/wide_mlp.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = [one_run(args.rounds, args.steps, seed) for seed in range(args.repeats)]
    lines = [
        "# Wide-input MLP (784-256-128-10, batch 128): per-step time relative to AdamW",
        "",
        f"CPU, 1 thread, torch {torch.__version__}; interleaved, {args.rounds} rounds x "
        f"{args.steps} steps after a warm-up round, median over rounds, then the median of "
        f"{args.repeats} independent runs (the machine is shared with other jobs; the runs "
        "column shows the spread). Written by `python -m benchmarks.wide_mlp`.",
        "",
        f"| variant | × AdamW (median of {args.repeats} runs) | runs |",
        "|---|---:|---|",
    ]
    for name in VARIANTS:
        ratios = [r[name] for r in results]
        runs = ", ".join(f"{x:.2f}" for x in ratios)
        lines.append(f"| {name} | {statistics.median(ratios):.2f} | {runs} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
