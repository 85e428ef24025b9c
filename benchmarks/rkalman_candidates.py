"""RKalman: the measurements behind its default formulation (docs/algorithms.md §7).

Three parts, all on CPU in one process:

* ``candidates``: candidate formulations of RKalman (measurement compression, where ρ enters
  the filter, filter frequency, sketch size) trained on a Fashion-MNIST subset with a small CNN
  in a plain PyTorch loop, with RING / KFAC / AdamW at their defaults for reference. Reported:
  validation accuracy, wall time, mean ‖∇ℓ‖ over training.
* ``steptime``: per-step time of RKalman against KFAC and AdamW on a small MLP and a small CNN,
  interleaved (every round times one full step of each optimizer, alternating the order), many
  rounds, medians and the median of the per-round ratios.
* ``micro``: the measurement step's two evaluations (sequential Sherman–Morrison loop vs the
  blocked form) and the floor series, per factor size: time and float32 accuracy.

    python -m benchmarks.rkalman_candidates [--part all|candidates|steptime|micro]
        [--subset 10000] [--epochs 2] [--seeds 0] [--rounds 60] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import lightning_grng as lg
from benchmarks import defaults_sweep
from lightning_grng.curvature.inverse import symmetrize
from lightning_grng.curvature.kalman_identities import (
    add_floor,
    floor_terms,
    sherman_morrison_update,
    woodbury_update,
)

Factory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


# ---------------------------------------------------------------------------- models
def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
        nn.Linear(128, 10),
    )  # fmt: skip


def cnn() -> nn.Module:
    """The example CNN (conv 1→32, conv 32→64, 3×3 pooled, fc 576→128→10)."""
    from examples.models import ImageClassifier

    return ImageClassifier().net


MODELS = {"mlp": mlp, "cnn": cnn}


def _attach(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    if isinstance(opt, lg.GRNGOptimizer):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lg.attach(model, opt)


# ---------------------------------------------------------------------------- candidates
def candidates() -> dict[str, Factory]:
    """The formulations compared; all but the reference optimizers are RKalman (lr=1,
    forgetting=0.95, curvature_every=5, KL-clip 1e-2 unless named). ρ = 0.1 is RING's scale."""
    rk = lg.RKalman
    return {
        "RKalman sketch k=16, rho=0.1 damping": lambda p: rk(p, rho=0.1),
        "RKalman rows k=16, rho=0.1 damping": lambda p: rk(p, rho=0.1, measurement="rows"),
        "RKalman rows k=128, rho=0.1 damping": lambda p: rk(
            p, rho=0.1, measurement="rows", measurement_size=128
        ),
        "RKalman sketch k=64, rho=0.1 damping": lambda p: rk(p, rho=0.1, measurement_size=64),
        "RKalman sketch k=4, rho=0.1 damping": lambda p: rk(p, rho=0.1, measurement_size=4),
        "RKalman sketch k=16, rho=0.1 noise": lambda p: rk(p, rho=0.1, rho_mode="noise"),
        "RKalman sketch k=16, rho=1 noise": lambda p: rk(p, rho=1.0, rho_mode="noise"),
        "RKalman sketch k=16, rho=0": lambda p: rk(p, rho=0.0),
        "RKalman default (sketch k=16, rho=0.01 damping)": lambda p: rk(p),
        "RKalman every step (forgetting 0.99, lr=5), rho=0.1": lambda p: rk(
            p, rho=0.1, curvature_every=1, forgetting=0.99, lr=5.0
        ),
        "RKalman lr=0.5, rho=0.1": lambda p: rk(p, rho=0.1, lr=0.5),
        "RKalman lr=2, rho=0.1": lambda p: rk(p, rho=0.1, lr=2.0),
        "RING (defaults)": lambda p: lg.RING(p),
        "KFAC (defaults)": lambda p: lg.KFAC(p),
        "AdamW lr=1e-3": lambda p: torch.optim.AdamW(p, lr=1e-3),
    }


def train_and_validate(make: Factory, loaders, epochs: int, seed: int) -> dict[str, float]:
    acc, seconds, norm = defaults_sweep.run(make, loaders, epochs, seed)
    return dict(val_acc=acc, seconds=seconds, mean_grad_norm=norm)


def run_candidates(subset: int, epochs: int, seeds: list[int], only: str | None) -> list[dict]:
    from examples.data.datamodules import FashionMNISTDataModule

    dm = FashionMNISTDataModule(batch_size=128, subset=subset)
    dm.setup("fit")
    loaders = (dm.train_dataloader(), dm.val_dataloader())
    rows = []
    for name, make in candidates().items():
        if only and only not in name:
            continue
        for seed in seeds:
            res = train_and_validate(make, loaders, epochs, seed)
            row = dict(config=name, seed=seed, **{k: round(v, 4) for k, v in res.items()})
            rows.append(row)
            print(
                f"{name:52} seed={seed} val_acc={res['val_acc']:.4f} "
                f"time={res['seconds']:6.1f}s grad_norm={res['mean_grad_norm']:.3f}",
                flush=True,
            )
    return rows


# ---------------------------------------------------------------------------- step time
def step_time_optimizers() -> dict[str, Factory]:
    return {
        "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-3),
        "KFAC": lambda p: lg.KFAC(p),
        "RKalman": lambda p: lg.RKalman(p),
        "RKalman floor_tol=1e-3": lambda p: lg.RKalman(p, floor_tol=1e-3),
        "RKalman rows": lambda p: lg.RKalman(p, measurement="rows"),
        "RKalman every step": lambda p: lg.RKalman(p, curvature_every=1, forgetting=0.99),
    }


def run_step_time(model_name: str, rounds: int, warmup: int = 20, window: int = 20) -> list[dict]:
    """Interleaved per-step times. Curvature steps (every 5) and KFAC's eigendecompositions
    (every 20) make single steps uneven, so steps are summed over windows of 20 rounds (one
    full cycle of every schedule); reported are the median per-step time over windows and the
    median over windows of the per-window time ratios."""
    torch.manual_seed(0)
    base = MODELS[model_name]()
    runners = []
    for name, make in step_time_optimizers().items():
        model = copy.deepcopy(base)
        opt = make(list(model.parameters()))
        _attach(model, opt)
        runners.append((name, model, opt, []))
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g))
        for _ in range(8)
    ]
    rounds = max(window, rounds - rounds % window)
    for r in range(warmup + rounds):
        x, y = data[r % len(data)]
        order = runners if r % 2 == 0 else list(reversed(runners))
        for _, model, opt, times in order:
            start = time.perf_counter()
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            times.append(time.perf_counter() - start)
    windows = {
        name: [sum(times[i : i + window]) for i in range(warmup, warmup + rounds, window)]
        for name, _, _, times in runners
    }
    rows = []
    for name, totals in windows.items():
        ratio = {
            ref: statistics.median(a / b for a, b in zip(totals, windows[ref], strict=True))
            for ref in ("KFAC", "AdamW")
        }
        rows.append(
            dict(
                model=model_name,
                optimizer=name,
                median_ms_per_step=round(1000 * statistics.median(totals) / window, 2),
                ratio_to_kfac=round(ratio["KFAC"], 3),
                ratio_to_adamw=round(ratio["AdamW"], 3),
                windows=len(totals),
            )
        )
        print(rows[-1], flush=True)
    return rows


# ---------------------------------------------------------------------------- micro
def _median_time(fn: Callable[[], object], repeat: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_micro(sizes: tuple[int, ...] = (64, 289, 577, 785), k: int = 16) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for n in sizes:
        X = torch.randn(1, n, n, generator=g)
        L = X @ X.mT / n + 0.1 * torch.eye(n)
        P = symmetrize(torch.linalg.inv(L.double())).float()
        U = torch.randn(1, n, k, generator=g) / n**0.5

        def sequential(P=P, U=U):
            Q = P
            for j in range(k):
                Q = sherman_morrison_update(Q, U[..., j], 20.0)
            return Q

        def blocked(P=P, U=U):
            return woodbury_update(P, U, 20.0)

        exact = torch.linalg.inv(L.double() + U.double() @ U.double().mT / 20.0)
        err_seq = float((sequential().double() - exact).norm() / exact.norm())
        err_blk = float((blocked().double() - exact).norm() / exact.norm())
        c = 0.05 * 0.1
        ratio = c * float(torch.linalg.matrix_norm(P.double(), 2).max())
        terms = {tol: floor_terms(ratio, tol) for tol in (0.1, 1e-3)}
        row = dict(
            n=n,
            k=k,
            sequential_sm_ms=round(1000 * _median_time(sequential), 3),
            blocked_ms=round(1000 * _median_time(blocked), 3),
            rel_err_sequential=f"{err_seq:.1e}",
            rel_err_blocked=f"{err_blk:.1e}",
            **{
                f"floor_ms_tol{tol:g}_K{t}": round(
                    1000 * _median_time(lambda P=P, t=t, c=c: add_floor(P, c, t)), 3
                )
                for tol, t in terms.items()
            },
            matmul_ms=round(1000 * _median_time(lambda P=P: P @ P), 3),
        )
        rows.append(row)
        print(row, flush=True)
    return rows


# ---------------------------------------------------------------------------- main
def _write(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", default="all", choices=["all", "candidates", "steptime", "micro"])
    parser.add_argument("--subset", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", default=None, help="substring filter on candidate names")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=None, help="directory for CSV results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part in ("all", "micro"):
        rows = run_micro()
        if args.out:
            _write(rows, args.out / "rkalman_micro.csv")
    if args.part in ("all", "steptime"):
        rows = run_step_time("mlp", args.rounds) + run_step_time("cnn", args.rounds)
        if args.out:
            _write(rows, args.out / "rkalman_step_time.csv")
    if args.part in ("all", "candidates"):
        rows = run_candidates(args.subset, args.epochs, args.seeds, args.only)
        if args.out:
            _write(rows, args.out / "rkalman_candidates.csv")


if __name__ == "__main__":
    main()
