"""Summary of the full-strength study (issue 23): per task, every optimizer's final test metric
(mean ± std over seeds, at its chosen lr), the strongest baseline, the best GRNG variant and
whether it leads by more than one standard deviation; the ρ = 0 twins beside their variants.

    python -m benchmarks.strength benchmarks/results/strength
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

from benchmarks.optimizers import BY_NAME
from benchmarks.tasks import TASKS


def summarize(task_dir: Path) -> tuple[str, list[str]]:
    task = TASKS[task_dir.name]
    rows = [r for r in csv.DictReader((task_dir / "runs.csv").open()) if r["phase"] == "final"]
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["optimizer"], []).append(r)
    scale = 100.0 if task.metric == "accuracy" else 1.0
    stats = {}
    for name, runs in by.items():
        values = [float(r["final_test"]) * scale for r in runs]
        seconds = statistics.fmean(float(r["train_seconds"]) for r in runs)
        sd = statistics.stdev(values) if len(values) > 1 else float("nan")
        stats[name] = (statistics.fmean(values), sd, len(values), float(runs[0]["lr"]), seconds)
    better = max if task.higher_is_better else min
    family = {n: BY_NAME[n].family for n in stats}
    baselines = [n for n in stats if family[n] == "baseline"]
    ours = [n for n in stats if family[n] in ("grng", "kfac")]
    best_base = better(baselines, key=lambda n: stats[n][0])
    best_ours = better(ours, key=lambda n: stats[n][0])
    unit = "test accuracy %" if task.metric == "accuracy" else "test loss"
    lines = [f"### {task.title} ({unit}, {stats[best_base][2]} seeds)", ""]
    lines += ["| optimizer | lr | mean ± std | train s |", "|---|---|---|---|"]
    order = sorted(stats, key=lambda n: stats[n][0], reverse=task.higher_is_better)
    for n in order:
        m, sd, _, lr, sec = stats[n]
        mark = " **(best baseline)**" if n == best_base else " **(best GRNG)**" * (n == best_ours)
        lines.append(f"| {n}{mark} | {lr:g} | {m:.4f} ± {sd:.4f} | {sec:.1f} |")
    lead = stats[best_ours][0] - stats[best_base][0]
    lead = lead if task.higher_is_better else -lead
    sd = max(stats[best_ours][1], stats[best_base][1])
    verdict = "PASS" if lead > sd else "MISS"
    summary = (
        f"| {task.title} | {best_base} {stats[best_base][0]:.4f} ± {stats[best_base][1]:.4f} | "
        f"{best_ours} {stats[best_ours][0]:.4f} ± {stats[best_ours][1]:.4f} | {lead:+.4f} "
        f"(1 std = {sd:.4f}) | {verdict} |"
    )
    return summary, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    args = parser.parse_args()
    head = [
        "| task | strongest baseline | best GRNG | lead | > 1 std |",
        "|---|---|---|---|---|",
    ]
    body: list[str] = []
    for task_dir in sorted(p for p in args.root.iterdir() if (p / "runs.csv").exists()):
        rows = list(csv.DictReader((task_dir / "runs.csv").open()))
        if not any(r["phase"] == "final" for r in rows):
            continue
        summary, lines = summarize(task_dir)
        head.append(summary)
        body += ["", *lines]
    print("\n".join(head + body))


if __name__ == "__main__":
    main()
