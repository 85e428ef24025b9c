"""The benchmark suite: learning-rate sweep, final seeds, stability grid, interleaved step time,
then the report.

    python -m benchmarks.suite --profile full  --out benchmarks/results   # make bench
    python -m benchmarks.suite --profile quick --out runs/bench-quick     # make bench-quick

Phases: (1) every optimizer's learning-rate grid on each task, one seed, judged on the
validation split (never test); (2) the chosen rate, 3 seeds; (3) damping × lr grid for KFAC,
RING and RENG on Fashion-MNIST; (4) per-step time of all optimizers interleaved in one process.
Runs execute in ``--workers`` processes of ``--threads`` threads each.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.optimizers import BY_NAME, SPECS, runs_on
from benchmarks.report import read_csv, write_report
from benchmarks.tasks import SCHEDULE, TASKS

RUN_FIELDS = (
    "phase",
    "task",
    "optimizer",
    "lr",
    "damping",
    "seed",
    "steps",
    "train_seconds",
    "final_train_loss",
    "final_val",
    "best_val",
    "final_test",
    "test_loss",
    "mean_grad_norm",
    "peak_rss_mib",
    "state_mib",
    "diverged",
    "train_metric",
    "sharpness",
    "kl_clip_bind_rate",
)
CURVE_FIELDS = (
    "task",
    "optimizer",
    "seed",
    "step",
    "seconds",
    "train_loss",
    "val_metric",
    "test_metric",
)
STABILITY = {
    "task": "fashion_mnist",
    "optimizers": ["KFAC", "RING", "RENG"],
    "dampings": [10.0, 100.0, 1000.0],  # relative damping (docs/algorithms.md §2)
    "lrs": [0.03, 0.1, 0.3],
}
DEFAULT_DAMPING = 100.0  # KFAC's, RING's and RENG's default (asserted in tests)
STEP_TIME_ROUNDS = {"full": 60, "quick": 20, "tiny": 3}
#: `make bench-quick`: what users get (the defaults, the paper's route) against what they use
#: (AdamW, full-strength SOAP and Muon), within about five minutes on 2 cores.
QUICK_OPTIMIZERS = ("AdamW", "SOAP-hb", "Muon-hb", "RING-default", "RENG-default", "RING")
#: `make bench` (the headline, issue 22): what users get, the four optimizers at the library's
#: defaults (GR's ρ = 0 twins beside them, the paper's kfac-mode route), against the baselines
#: at full strength (SOAP at both refresh periods, its quality knob; both Muons, each the best
#: baseline somewhere) and the paper's. The variants of earlier rounds (kfac-mode twins, the
#: K-FAC-statistics eigen mode, SINGD, pytorch-optimizer's SOAP) are in their own reports.
HEADLINE_OPTIMIZERS = (
    "SGD", "SAM", "AdamW", "SOAP-hb", "SOAP-hb-f10", "PSGD-Kron", "Muon-hb", "Muon", "Sophia",
    "KFAC-default", "RING-default", "RENG-default", "RING-default-rho0", "RENG-default-rho0",
    "RING", "RKalman",
)  # fmt: skip
GRID_STEP = 3.0  # a grid grows by one ×3 step beyond the edge its best point sits on
MAX_EXTENSIONS = 3
EDGE_NAMES = {-1: "lower", 0: "", 1: "upper"}
# The expensive optimizers go first so the worker pool ends evenly.
COST = {"RENG": 4, "Sophia": 3, "SINGD": 2}


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


class Pool:
    """Runs jobs in worker processes (or in this process when ``workers == 1``)."""

    def __init__(self, workers: int, threads: int) -> None:
        self.workers, self.threads = workers, threads
        self._pool = None
        if workers > 1:
            self._pool = ProcessPoolExecutor(
                workers,
                mp_context=get_context("spawn"),
                initializer=_init_worker,
                initargs=(threads,),
            )
        else:
            _init_worker(threads)

    def map(self, fn, jobs: Sequence, label=str) -> Iterable:
        """Yields ``(job, result)`` as they finish, printing one line each."""
        start = time.perf_counter()
        if self._pool is None:
            results = ((job, fn(job)) for job in jobs)
        else:
            futures = {self._pool.submit(fn, job): job for job in jobs}
            results = ((futures[f], f.result()) for f in as_completed(futures))
        for i, (job, result) in enumerate(results, 1):
            print(
                f"[{time.perf_counter() - start:7.0f}s] {i:3}/{len(jobs)} {label(job)}", flush=True
            )
            yield job, result

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def _label(job: harness.Job) -> str:
    damping = "" if job.damping is None else f" damping={job.damping:g}"
    return f"{job.phase:9} {job.task:13} {job.optimizer:8} lr={job.lr:g}{damping} seed={job.seed}"


def _ordered(jobs: list[harness.Job]) -> list[harness.Job]:
    return sorted(jobs, key=lambda j: (-COST.get(j.optimizer, 1), -j.steps))


def _chosen(rows: list[dict], task: str, name: str) -> tuple[float, int]:
    """Best final validation metric of the sweep (failed runs excluded), and where it sits in
    the grid that was run: -1 on the lower edge, +1 on the upper edge, 0 inside."""
    task_ = TASKS[task]
    runs = [r for r in rows if r["task"] == task and r["optimizer"] == name]
    ok = [r for r in runs if not r["diverged"]]
    if not ok:
        grid = BY_NAME[name].lr_grid
        return grid[len(grid) // 2], 0
    sign = 1 if task_.higher_is_better else -1
    best = max(ok, key=lambda r: sign * r["final_val"])["lr"]
    tried = [r["lr"] for r in runs]
    return best, (best == max(tried)) - (best == min(tried))


def _grid_value(x: float) -> float:
    return float(f"{x:.3g}")


def _extended(best: float, side: int) -> float:
    """One ×3 step beyond the edge the best point sits on."""
    return _grid_value(best * GRID_STEP**side)


def _best_cell(rows: list[dict], higher: bool) -> dict | None:
    ok = [r for r in rows if not r["diverged"]]
    sign = 1 if higher else -1
    return max(ok, key=lambda r: sign * r["final_val"]) if ok else None


def run_suite(args: argparse.Namespace) -> Path:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    commit = _git_commit()  # at the start: the code that runs is the code of this commit
    clock = time.perf_counter()
    tasks = args.tasks or [name for name, task in TASKS.items() if task.in_benchmark]
    names = args.optimizers or {
        "quick": list(QUICK_OPTIMIZERS),
        "full": list(HEADLINE_OPTIMIZERS),
    }.get(args.profile, [s.name for s in SPECS])
    if "AdamW" not in names:
        names = ["AdamW", *names]  # every ratio is to AdamW
    # A ρ = 0 twin runs at its optimizer's chosen rate, so that optimizer runs too.
    names += [t for n in names if (t := BY_NAME[n].twin_of) and t not in names]
    on = {task: [n for n in names if runs_on(BY_NAME[n], task)] for task in tasks}
    swept = {task: [n for n in on[task] if not BY_NAME[n].twin_of] for task in tasks}
    seeds = range(args.seeds if args.seeds is not None else (3 if args.profile == "full" else 1))
    pool = Pool(args.workers, args.threads)
    rows: list[dict] = []
    curves: list[dict] = []

    previous = _previous_runs(out) if args.resume else {}
    # Runs of the previous attempt not reused yet: written with every save, so an interrupted
    # resumed run never leaves fewer finished runs on disk than it started with.
    unclaimed = dict(previous)

    def save() -> None:
        kept = list(unclaimed.values())
        _write_csv(out / "runs.csv", RUN_FIELDS, rows + [row for row, _ in kept])
        _write_csv(out / "curves.csv", CURVE_FIELDS, curves + [p for _, pts in kept for p in pts])

    def collect(jobs: list[harness.Job]) -> None:
        todo = []
        for job in jobs:
            if _key(job) in previous:  # --resume: this run is already in runs.csv
                row, points = previous[_key(job)]
                unclaimed.pop(_key(job), None)
                rows.append(row)
                curves.extend(points)
            else:
                todo.append(job)
        for _, (row, points) in pool.map(harness.train, _ordered(todo), _label):
            rows.append(row)
            curves.extend(points)
            save()  # after every run, so an interruption loses at most the runs in flight
        save()

    def sweep_job(task: str, name: str, lr: float) -> harness.Job:
        steps = harness.budget(task, args.profile).sweep_steps
        return harness.Job("sweep", task, args.profile, name, lr, 0, steps, 1)

    # (1) sweep and (3) stability are independent of each other: one batch of jobs.
    first = [
        sweep_job(task, name, lr)
        for task in tasks
        if harness.budget(task, args.profile).sweep_steps
        for name in swept[task]
        for lr in BY_NAME[name].lr_grid
    ]
    stability = _stability_jobs(args.profile, tasks, names, STABILITY["dampings"])
    collect(first + [j for j in stability if j.damping != DEFAULT_DAMPING])
    # The default-damping column of the stability grid is the sweep's runs at those rates.
    rows += _default_damping_cells(rows, stability)

    # Grids tuned to the interior: a best point on an edge gets one more ×3 step beyond it,
    # up to MAX_EXTENSIONS times; damping in the stability grid follows the same rule.
    dampings = list(STABILITY["dampings"])
    for _ in range(MAX_EXTENSIONS):
        sweep_rows = [r for r in rows if r["phase"] == "sweep"]
        more = []
        for task in tasks:
            if not harness.budget(task, args.profile).sweep_steps:
                continue
            for name in swept[task]:
                best, side = _chosen(sweep_rows, task, name)
                if side:
                    more.append(sweep_job(task, name, _extended(best, side)))
        more += _damping_extension(rows, args.profile, tasks, names, dampings)
        if not more:
            break
        collect(more)

    sweep_rows = [r for r in rows if r["phase"] == "sweep"]
    placed = {task: {n: _chosen(sweep_rows, task, n) for n in swept[task]} for task in tasks}
    chosen = {
        task: {n: placed[task][BY_NAME[n].twin_of or n][0] for n in on[task]} for task in tasks
    }
    edges = {
        task: {n: EDGE_NAMES[side] for n, (_, side) in placed[task].items() if side}
        for task in tasks
    }

    # (2) final runs.
    collect(
        [
            harness.Job(
                "final",
                task,
                args.profile,
                name,
                chosen[task][name],
                seed,
                harness.budget(task, args.profile).steps,
                harness.budget(task, args.profile).evals,
            )
            for task in tasks
            for name in on[task]
            for seed in seeds
        ]
    )

    # (4) interleaved step time, one task per worker (skipped with --no-step-time: a study that
    # compares quality only; a step_time.csv already there is left as it was).
    timing = []
    rounds = STEP_TIME_ROUNDS[args.profile]
    if args.step_time:
        for _, result in pool.map(
            _step_time,
            [(t, args.profile, chosen[t], rounds) for t in tasks],
            lambda j: f"step time {j[0]}",
        ):
            timing += result
        _write_csv(out / "step_time.csv", tuple(timing[0]), timing)
    pool.close()

    meta = _meta(args, tasks, names, chosen, started, time.perf_counter() - clock)
    meta["git_commit"] = commit
    meta["stability"] = dict(STABILITY, dampings=sorted(dampings)) if stability else None
    meta["lr_edges"] = edges
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return write_report(out)


def _key(job: harness.Job) -> tuple:
    damping = "" if job.damping is None else float(job.damping)
    return (job.phase, job.task, job.optimizer, float(job.lr), damping, int(job.seed))


def _previous_runs(out: Path) -> dict[tuple, tuple[dict, list[dict]]]:
    """Completed runs of an interrupted suite (same code, same budgets), keyed like jobs. A
    final run counts only with its curve."""
    curves = read_csv(out / "curves.csv")
    previous = {}
    for row in read_csv(out / "runs.csv"):
        row |= dict(
            lr=float(row["lr"]),
            seed=int(row["seed"]),
            final_val=float(row["final_val"]),
            diverged=row["diverged"] == "True",
            damping=float(row["damping"]) if row["damping"] else "",
        )
        points = []
        if row["phase"] == "final":  # only final runs have curves
            run = (row["task"], row["optimizer"], str(row["seed"]))
            points = [c for c in curves if (c["task"], c["optimizer"], c["seed"]) == run]
            if not points:
                continue
        key = tuple(row[k] for k in ("phase", "task", "optimizer", "lr", "damping", "seed"))
        previous[key] = (row, points)
    return previous


def _step_time(job: tuple) -> list[dict]:
    return harness.step_time(*job)


def _stability_jobs(
    profile: str, tasks: list[str], names: list[str], dampings: Iterable[float]
) -> list[harness.Job]:
    task = STABILITY["task"]
    if profile == "quick" or task not in tasks:
        return []
    steps = harness.budget(task, profile).sweep_steps
    return [
        harness.Job("stability", task, profile, name, lr, 0, steps, 1, damping=damping)
        for name in STABILITY["optimizers"]
        if name in names
        for damping in dampings
        for lr in STABILITY["lrs"]
    ]


def _default_damping_cells(rows: list[dict], stability: list[harness.Job]) -> list[dict]:
    """Stability cells at the optimizers' default damping: the same computation as the sweep
    run at that rate (the damping keyword passed explicitly changes nothing), so the sweep's
    rows are reused, relabelled."""
    sweep = {(r["task"], r["optimizer"], r["lr"]): r for r in rows if r["phase"] == "sweep"}
    cells = []
    for job in stability:
        row = sweep.get((job.task, job.optimizer, job.lr))
        if job.damping == DEFAULT_DAMPING and row is not None:
            cells.append(dict(row, phase="stability", damping=DEFAULT_DAMPING))
    return cells


def _damping_extension(
    rows: list[dict], profile: str, tasks: list[str], names: list[str], dampings: list[float]
) -> list[harness.Job]:
    """One more damping row (every lr of the grid) beyond the edge where an optimizer's best
    stability cell sits; ``dampings`` grows in place."""
    cells = [r for r in rows if r["phase"] == "stability"]
    higher = TASKS[STABILITY["task"]].higher_is_better
    new = set()
    for name in STABILITY["optimizers"]:
        best = _best_cell([r for r in cells if r["optimizer"] == name], higher)
        if best is None:
            continue
        side = (best["damping"] == max(dampings)) - (best["damping"] == min(dampings))
        if side:
            new.add(_extended(best["damping"], side))
    new -= set(dampings)
    dampings += sorted(new)
    return _stability_jobs(profile, tasks, names, sorted(new))


def _write_csv(path: Path, fields: Sequence[str], rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)


def _machine(args: argparse.Namespace) -> dict[str, object]:
    cpu = platform.processor() or "unknown"
    meminfo = Path("/proc/meminfo")
    memory = None
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    if meminfo.exists():
        memory = round(int(meminfo.read_text().split()[1]) / 2**20, 1)
    return dict(
        cpu=cpu,
        cores=os.cpu_count(),
        memory_gib=memory,
        torch=torch.__version__,
        python=platform.python_version(),
        threads_per_run=args.threads,
        parallel_runs=args.workers,
        os=platform.platform(),
    )


def _git_commit() -> str:
    """HEAD, marked when tracked code differs from it (results and docs do not count)."""
    code = ["lightning_grng", "grng", "benchmarks/*.py", "examples", "pyproject.toml"]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", *code],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+uncommitted code changes" if dirty else "")


def _meta(args, tasks, names, chosen, started, seconds) -> dict[str, object]:
    task_meta = {}
    for name in tasks:
        task, budget = TASKS[name], harness.budget(name, args.profile)
        task_meta[name] = dict(
            title=task.title,
            metric=task.metric,
            higher_is_better=task.higher_is_better,
            model=task.description,
            data="generated (tiny profile)"
            if args.profile == "tiny"
            else f"real; training subset {budget.subset or 'all'}",
            batch_size=task.batch_size,
            steps=budget.steps,
            sweep_steps=budget.sweep_steps,
            evals=budget.evals,
            schedule=SCHEDULE,
            generalization=task.generalization,
        )
    return dict(
        command=args.command or " ".join(["python -m benchmarks.suite", *sys.argv[1:]]),
        profile=args.profile,
        started=started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        finished=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        wall_minutes=round(seconds / 60, 1),
        machine=_machine(args),
        tasks=task_meta,
        optimizers={
            n: dict(
                description=BY_NAME[n].description,
                family=BY_NAME[n].family,
                lr_grid=list(BY_NAME[n].lr_grid),
                twin_of=BY_NAME[n].twin_of,
            )
            for n in names
        },
        chosen_lr=chosen,
    )


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=("full", "quick", "tiny"), default="quick")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=None)
    parser.add_argument("--optimizers", nargs="+", choices=list(BY_NAME), default=None)
    parser.add_argument("--seeds", type=int, default=None, help="default: 3 (full), 1 otherwise")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--command", default=None, help="how the report names this command")
    parser.add_argument(
        "--no-step-time",
        dest="step_time",
        action="store_false",
        help="skip the interleaved per-step timing (phase 4)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the completed runs already in --out (after an interruption)",
    )
    report = run_suite(parser.parse_args(argv))
    print(f"report: {report}")
    return report


if __name__ == "__main__":
    main()
