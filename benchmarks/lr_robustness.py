"""Learning-rate robustness of gradient regularization (issue 21): each GR setting and its
ρ = 0 twin swept over the same lr grid on a task, one seed, the suite's sweep budget.

For each (task, optimizer) it reports the best test metric over the grid, and the **width** of
the lr range around the best whose test metric is within 0.5 points (accuracy) or 0.02 nats
(loss) of it, in decades. The test metric (clean labels in the noisy regimes) judges nothing
here: no choice is made from it; the suite's own choices stay on the validation split. A grid
grows by one ×3 step beyond an edge while the best point or the tolerance range reaches it (up
to three times per side), so a width is never cut by the grid unless marked "≥".

It also says whether GR survives tuning: the best over lr of ρ > 0 against the best of its
ρ = 0 twin (each at its own best lr), a question the paired twins of the regimes (same lr) do
not answer. Resumable: finished rows of ``<out>`` are kept.

    python -m benchmarks.lr_robustness --out benchmarks/results/gr/lr_robustness.csv
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from benchmarks import harness
from benchmarks.optimizers import BY_NAME, EIGEN_GRID, runs_on
from benchmarks.report import read_csv
from benchmarks.suite import GRID_STEP, RUN_FIELDS, Pool, _grid_value, _label, _write_csv
from benchmarks.tasks import TASKS

#: Each route's settings by ρ: the ρ = 0 twin, the default (ρ = 0.1; RING only) and the best of
#: the 40 % noise regime. At ρ = 0 RENG and RING are both KFAC (tested equal), so RENG's twin
#: is RING's sweep.
ROUTES: dict[str, dict[float, str]] = {
    "RING": {0.0: "RING-default-rho0", 0.1: "RING-default", 10.0: "RING-default-rho10"},
    "RENG": {0.0: "RING-default-rho0", 3.0: "RENG-default-rho3"},
}
#: RENG costs two to three RING steps: its sweeps run on the 5k task and the noisy regime.
ROUTE_TASKS = {"RENG": ("fashion_mnist_small", "fashion_mnist_noisy40")}
#: The four benchmark tasks and the noisy regime (the large-batch regime's own sweeps cover it).
DEFAULT_TASKS = (
    "fashion_mnist_small",
    "shakespeare",
    "fashion_mnist",
    "imdb",
    "fashion_mnist_noisy40",
)
TOLERANCE = {"accuracy": 0.005, "loss": 0.02}
MAX_EXTENSIONS = 3


def _spec_of(route_of: str) -> str:
    """The swept spec a twin belongs to (a twin is skipped wherever its base is)."""
    return BY_NAME[route_of].twin_of or route_of


def settings(tasks: Sequence[str]) -> list[tuple[str, str]]:
    """(task, optimizer) pairs the study runs: every route's settings where the suite runs
    the route's swept default."""
    pairs = [
        (task, name)
        for task in tasks
        for route, names in ROUTES.items()
        if runs_on(BY_NAME[_spec_of(names[0.0])], task) and task in ROUTE_TASKS.get(route, tasks)
        for name in names.values()
    ]
    return list(dict.fromkeys(pairs))


def _metric(row: dict, higher: bool) -> float:
    """The run's test metric, oriented so that larger is better (NaN if it failed)."""
    if row["diverged"]:
        return math.nan
    return row["final_test"] if higher else -row["final_test"]


def lr_range(rows: list[dict], higher: bool, tolerance: float) -> dict[str, float] | None:
    """Best lr and metric of one optimizer's sweep rows, and the contiguous lr range around it
    within ``tolerance``: ``lo``, ``hi`` (lrs), ``width`` (decades), and whether the range or
    the best reaches the lowest / highest lr tried (``open_lo`` / ``open_hi``, a finished
    run there: the grid cuts it)."""
    runs = sorted(rows, key=lambda r: r["lr"])
    values = [_metric(r, higher) for r in runs]
    if not runs or all(math.isnan(v) for v in values):
        return None
    best = max(range(len(runs)), key=lambda i: -math.inf if math.isnan(values[i]) else values[i])
    ok = [not math.isnan(v) and v >= values[best] - tolerance for v in values]
    lo = hi = best
    while lo > 0 and ok[lo - 1]:
        lo -= 1
    while hi < len(runs) - 1 and ok[hi + 1]:
        hi += 1
    return dict(
        best_lr=runs[best]["lr"],
        best=values[best] if higher else -values[best],
        lo=runs[lo]["lr"],
        hi=runs[hi]["lr"],
        width=math.log10(runs[hi]["lr"] / runs[lo]["lr"]),
        open_lo=lo == 0 and ok[0],
        open_hi=hi == len(runs) - 1 and ok[-1],
    )


def _typed(row: dict) -> dict:
    """A runs.csv row as read back (strings) in the types :func:`harness.train` returns."""
    diverged = row["diverged"]
    return dict(
        row,
        lr=float(row["lr"]),
        final_test=float(row["final_test"]),
        final_val=float(row["final_val"]),
        diverged=diverged if isinstance(diverged, bool) else diverged == "True",
    )


def _grouped(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        if row["phase"] == "sweep":
            out[row["task"], row["optimizer"]].append(row)
    return out


def _extensions(rows: list[dict], pairs: list[tuple[str, str]]) -> list[tuple[str, str, float]]:
    """One ×3 step beyond each edge that the best point or its tolerance range reaches."""
    grouped = _grouped(rows)
    more = []
    for task, name in pairs:
        runs = grouped[task, name]
        found = lr_range(runs, TASKS[task].higher_is_better, TOLERANCE[TASKS[task].metric])
        if found is None:
            continue
        tried = sorted(r["lr"] for r in runs)
        edges = ((-1, tried[0], found["open_lo"]), (1, tried[-1], found["open_hi"]))
        for side, edge, open_ in edges:
            # Points already added beyond the base grid on this side.
            beyond = sum(side * (lr - (max if side > 0 else min)(EIGEN_GRID)) > 0 for lr in tried)
            if open_ and beyond < MAX_EXTENSIONS:
                more.append((task, name, _grid_value(edge * GRID_STEP**side)))
    return more


def run(out: Path, tasks: Sequence[str], profile: str, workers: int) -> list[dict]:
    rows = [_typed(r) for r in read_csv(out)]
    done = {(r["task"], r["optimizer"], float(r["lr"])) for r in rows}
    pairs = settings(tasks)
    todo = [(task, name, lr) for task, name in pairs for lr in EIGEN_GRID]
    pool = Pool(workers, 1)
    while todo:
        jobs = [
            harness.Job(
                "sweep", task, profile, name, lr, 0, harness.budget(task, profile).sweep_steps, 1
            )
            for task, name, lr in todo
            if (task, name, lr) not in done
        ]
        for job, (row, _) in pool.map(harness.train, jobs, _label):
            rows.append(_typed(row))
            done.add((job.task, job.optimizer, float(job.lr)))
            _write_csv(out, RUN_FIELDS, rows)  # every run: an interruption loses those in flight
        todo = [t for t in _extensions(rows, pairs) if t not in done]
    pool.close()
    return rows


def summary_lines(rows: list[dict]) -> list[str]:
    """The markdown table of widths and tuned bests, one row per (task, route, ρ)."""
    grouped = _grouped(rows)
    lines = [
        "| task | route | ρ | best lr | best test | lr range within tolerance | width (decades) "
        "| tuned best against ρ = 0's (+: better) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task in dict.fromkeys(r["task"] for r in rows):
        higher = TASKS[task].higher_is_better
        scale = 100.0 if higher else 1.0
        for route, names in ROUTES.items():
            found = {
                rho: lr_range(grouped[task, name], higher, TOLERANCE[TASKS[task].metric])
                for rho, name in names.items()
                if grouped.get((task, name))
            }
            base = found.get(0.0)
            for rho, f in found.items():
                if f is None:
                    continue
                sign = 1.0 if higher else -1.0
                gain = (
                    "–"
                    if rho == 0.0 or base is None
                    else f"{scale * sign * (f['best'] - base['best']):+.2f}"
                )
                width = f"{'≥ ' if f['open_lo'] or f['open_hi'] else ''}{f['width']:.2f}"
                lines.append(
                    f"| {task} | {route} | {rho:g} | {f['best_lr']:g} | {scale * f['best']:.2f} "
                    f"| {f['lo']:g} – {f['hi']:g} | {width} | {gain} |"
                )
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(DEFAULT_TASKS))
    parser.add_argument("--profile", choices=("full", "quick", "tiny"), default="full")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = run(args.out, args.tasks, args.profile, args.workers)
    print("\n".join(summary_lines(rows)))


if __name__ == "__main__":
    main()
