"""Per-step cost of the GRNG optimizers against AdamW, SOAP and Muon, side by side in one run.

Every optimizer trains a copy of the same model on the same batches, interleaved step by step
(``harness.step_time``); the ratio is of mean step times, so periodic work (statistics,
eigendecompositions) is amortized. One process, one torch thread unless ``--threads``.

    python -m benchmarks.step_cost --out benchmarks/results/step_cost/after.csv

``--models resnet18_cifar gpt_small`` times the two models of ``benchmarks/models_extra.py``
on random batches (``--full-size``: GPT-2 small's full shape), against AdamW, SOAP-hb, Muon-hb
and the GRNG variants, including the cost options of issue 22 (``refresh="warm"``,
``stagger_first``, ``max_factor``). ``--stages`` also times the GRNG optimizers' template
stages per step (statistics, refresh, read-back, precondition/rotation, elementwise update)
and prints their mean and max per step; ``--warmup 0`` keeps the first step (the first
refresh, usually the worst step) in the max.

    python -m benchmarks.step_cost --models gpt_small --rounds 40 --stages
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

import lightning_grng as lg
from benchmarks import harness
from benchmarks.models_extra import WORKLOADS, Workload, workload
from benchmarks.optimizers import BY_NAME, EIGEN_GRID, KFAC_STATISTICS, OptimizerSpec, runs_on

DEFAULT_OPTIMIZERS = (
    "AdamW", "SOAP", "SOAP-hb", "Muon", "RING-default", "KFAC-eigen", "RING-eigen", "RENG-eigen",
    "RING", "RKalman",
)  # fmt: skip
DEFAULT_TASKS = ("shakespeare", "fashion_mnist", "fashion_mnist_small", "imdb")


def _ring(name: str, what: str, **options: object) -> OptimizerSpec:
    return OptimizerSpec(
        name,
        lambda m, lr: lg.RING(m.parameters(), lr=lr, **options),
        EIGEN_GRID,
        f"RING, eigen mode, {what}",
        "grng",
    )


#: The library's defaults (issue 23: gradient statistics, Adam-order momentum; issue 22: a
#: conv wider than 512 columns split per dimension), and the cost options of issue 22 on
#: RING's eigen mode over K-FAC statistics (the "-eigen" specs' source).
EXTRA_SPECS = {
    spec.name: spec
    for spec in (
        _ring("RING-default", "the library's defaults"),
        _ring("RING-default-compiled", "defaults with compile=True", compile=True),
        _ring("RING-default-batched", "defaults with batch_blocks=True", batch_blocks=True),
        _ring("RING-default-whole", "defaults with every conv factor whole", split_conv=10**9),
        _ring(
            "RING-default-unstaggered",
            "the defaults until 2026-12-07: every first decomposition on the first step",
            stagger_first=10**9,
        ),
        _ring("RING-eigen-warm", "refresh='warm'", refresh="warm", **KFAC_STATISTICS),
        _ring("RING-eigen-spread", "stagger_first=1024", stagger_first=1024, **KFAC_STATISTICS),
        _ring("RING-eigen-cap", "max_factor=2048", max_factor=2048, **KFAC_STATISTICS),
        _ring(
            "RING-eigen-lean",
            "refresh='warm', stagger_first=1024, max_factor=2048",
            refresh="warm",
            stagger_first=1024,
            max_factor=2048,
            **KFAC_STATISTICS,
        ),
    )
}
SPECS = {**BY_NAME, **EXTRA_SPECS}
MODEL_OPTIMIZERS = (
    "AdamW", "SOAP-hb", "Muon-hb", "KFAC-eigen", "RING-eigen", "RENG-eigen",
    *EXTRA_SPECS,
)  # fmt: skip

#: The template stages timed by ``--stages`` (method of the optimizer → label); "update" is
#: the rest of ``step()`` (KL-clip, momentum, weight decay, the fallback update).
STAGES = {
    "_gradients": "gradients",
    "_absorb_statistics": "statistics",
    "_prepare": "refresh",
    "_settle": "readback",
    "_commit": "commit",
    "_directions": "precondition",
}


class StageClock:
    """Per-step wall time of one GRNG optimizer's template stages: the stage methods of the
    instance are wrapped with ``time.perf_counter`` (and a device synchronisation around each
    stage on a GPU, so a stage's device work is charged to it, not to the read-back)."""

    def __init__(self, opt: torch.optim.Optimizer, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        for method, label in STAGES.items():
            self._wrap(opt, method, label)
        self._wrap(opt, "step", "opt.step")

    def _wrap(self, opt: torch.optim.Optimizer, method: str, label: str) -> None:
        inner = getattr(opt, method)

        def timed(*args: object, **kwargs: object) -> object:
            self.sync()
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.sync()
                self.current[label] += time.perf_counter() - start

        setattr(opt, method, timed)

    def close_step(self) -> None:
        step = dict(self.current)
        inner = sum(v for k, v in step.items() if k != "opt.step")
        step["update"] = max(step.get("opt.step", 0.0) - inner, 0.0)
        self.steps.append(step)
        self.current = defaultdict(float)


def time_workload(
    load: Workload,
    lrs: dict[str, float],
    rounds: int,
    warmup: int,
    stages: bool,
    device: str = "cpu",
) -> list[dict[str, object]]:
    """Interleaved per-step times of every optimizer on ``load`` (as ``harness.step_time``:
    each round one full step of each optimizer on the same batch, the order alternating).
    Rows: per optimizer the training step ("step": forward, backward, optimizer step), and
    with ``stages`` each stage of a GRNG optimizer's step; mean and max over the timed
    rounds, the first step's time, the ratio of mean steps to AdamW's and the optimizer's
    state (every tensor of its state dict) as a multiple of the parameters' bytes. The K-FAC
    statistics are gathered by hooks during the backward pass, so their cost shows in
    "forward+backward"; "statistics" is their absorption into the factors."""
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    reference = load.model()
    runners = []
    for name, lr in lrs.items():
        copy = load.model()
        copy.load_state_dict(reference.state_dict())
        opt = SPECS[name].make(copy.to(dev), lr)
        clock = StageClock(opt.opt, sync) if stages and opt.grng else None
        runners.append((name, copy, opt, clock))
    g = torch.Generator().manual_seed(0)
    batches = [tuple(t.to(dev) for t in load.batch(g)) for _ in range(4)]
    times: dict[str, list[float]] = {name: [] for name in lrs}
    firsts: dict[str, float] = {}
    stage_steps: dict[str, list[dict[str, float]]] = {name: [] for name in lrs}
    for r in range(warmup + rounds):
        x, y = batches[r % len(batches)]
        order = runners if r % 2 == 0 else runners[::-1]
        for name, model, opt, clock in order:
            sync()
            start = time.perf_counter()
            opt.step(lambda m=model, x=x, y=y: load.loss(m(x), y))
            sync()
            elapsed = time.perf_counter() - start
            if clock is not None:
                clock.close_step()
                step = clock.steps[-1]
                step["forward+backward"] = max(elapsed - step.get("opt.step", 0.0), 0.0)
            firsts.setdefault(name, elapsed)
            if r >= warmup:
                times[name].append(elapsed)
                if clock is not None:
                    stage_steps[name].append(clock.steps[-1])
    ref = sum(times["AdamW"]) if "AdamW" in times else float("nan")
    param_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
    state = {name: opt.state_bytes() / param_bytes for name, _, opt, _ in runners}
    rows: list[dict[str, object]] = []
    for name, t in times.items():
        row = _row(load.name, name, "step", t, firsts[name], sum(t) / ref, rounds)
        rows.append({**row, "state_x_params": round(state[name], 2)})
        steps = stage_steps[name]
        labels = ["forward+backward", *STAGES.values(), "update", "opt.step"]
        for label in labels if steps else []:
            values = [s.get(label, 0.0) for s in steps]
            if any(values):
                rows.append(_row(load.name, name, label, values, None, None, rounds))
    return rows


def _row(
    task: str,
    optimizer: str,
    stage: str,
    seconds: list[float],
    first: float | None,
    ratio: float | None,
    rounds: int,
) -> dict[str, object]:
    return dict(
        task=task,
        optimizer=optimizer,
        stage=stage,
        mean_ms=round(1000 * statistics.fmean(seconds), 3),
        median_ms=round(1000 * statistics.median(seconds), 3),
        max_ms=round(1000 * max(seconds), 3),
        first_ms="" if first is None else round(1000 * first, 3),
        ratio_to_adamw="" if ratio is None else round(ratio, 3),
        rounds=rounds,
        threads=torch.get_num_threads(),
    )


def _task_workload(name: str) -> Workload:
    """A benchmark task (``benchmarks/tasks.py``) as a workload: its model, its batch size and
    its training data (the quick profile), for ``--stages``."""
    task = harness.TASKS[name]
    train_set, _, _, vocab = harness.task_data(task, "quick")
    x_all, y_all = train_set.tensors
    size = task.batch_size

    def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, len(x_all), (size,), generator=g)
        return x_all[index], y_all[index]

    return Workload(name, task.title, lambda: task.model(vocab), batch)


def _middle_lr(name: str) -> float:
    grid = SPECS[name].lr_grid
    return grid[len(grid) // 2] if grid else 0.01


def _print(rows: list[dict[str, object]]) -> None:
    """One line per optimizer and stage: mean, median and max per step (and the first step)."""
    for row in rows:
        ratio = row["ratio_to_adamw"]
        extra = f" {ratio:6.2f}x AdamW  first {row['first_ms']:9.1f} ms" if ratio != "" else ""
        if "state_x_params" in row:
            extra += f"  state {row['state_x_params']:5.2f}x params"
        print(
            f"{row['task']:20s} {row['optimizer']:18s} {row['stage']:16s} "
            f"mean {row['mean_ms']:9.2f} ms  median {row['median_ms']:9.2f} ms  "
            f"max {row['max_ms']:9.2f} ms{extra}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=None)
    parser.add_argument("--models", nargs="+", default=[], choices=WORKLOADS)
    parser.add_argument("--full-size", action="store_true", help="GPT-2 small's full shape")
    parser.add_argument("--optimizers", nargs="+", default=None)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--stages", action="store_true", help="time the GRNG stages per step")
    parser.add_argument("--device", default="cpu", help="the extra models' device")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="CSV to write")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tasks = args.tasks if args.tasks is not None else ([] if args.models else list(DEFAULT_TASKS))
    rows: list[dict[str, object]] = []
    for task in tasks:
        names = [n for n in args.optimizers or DEFAULT_OPTIMIZERS if runs_on(SPECS[n], task)]
        lrs = {n: _middle_lr(n) for n in names}
        if args.stages:
            new = time_workload(_task_workload(task), lrs, args.rounds, args.warmup, True)
            _print(new)
        else:
            new = harness.step_time(task, "quick", lrs, args.rounds, args.warmup)
            for row in new:
                print(f"{task:20s} {row['optimizer']:12s} {row['ms_per_step']:9.2f} ms "
                      f"{row['ratio_to_adamw']:6.2f}x AdamW", flush=True)  # fmt: skip
        rows += new
    for model in args.models:
        load = workload(model, full=args.full_size)
        lrs = {n: _middle_lr(n) for n in args.optimizers or MODEL_OPTIMIZERS}
        print(f"# {load.description}", flush=True)
        new = time_workload(load, lrs, args.rounds, args.warmup, args.stages, args.device)
        _print(new)
        rows += new
    if args.out is not None and rows:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fields = list(dict.fromkeys(k for row in rows for k in row))
        with args.out.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
