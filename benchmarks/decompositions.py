"""Cost of refreshing one Kronecker factor's inverse representation, by route and size.

Compares, for an EMA factor one step after its last refresh (``F' = 0.95·F + 0.05·S``):

* ``eigh``: ``torch.linalg.eigh`` (the KFAC/RING/RENG "eigh" route);
* ``qr-power``: a warm-started basis refresh as in SOAP, one power iteration
  ``Q ← qr(F'·Q)`` plus the Rayleigh quotients ``diag(QᵀF'Q)`` as eigenvalues;
* ``ns-warm``: :data:`~lightning_grng.curvature.inverse.WARM_NEWTON_ITERS` Newton–Schulz
  steps from the previous inverse, plus the spectral-radius check of the warm start;
* ``ns-cold``: 30 Newton–Schulz steps from ``I/‖F‖_F`` (the first refresh);

and the Newton–Schulz steps a warm start actually needs to reach ``‖I − XF‖_F <= 1e-4``
(float32), the measurement behind the fixed warm count. Single thread, float32, median of
``--repeats`` runs. Writes a markdown table to ``benchmarks/results/decompositions.md``; with
``--device cuda`` it times on the GPU (synchronized) and adds the 1024 and 2048 widths of the
device check's 512-wide transformer.

    python -m benchmarks.decompositions [--repeats 5] [--device cpu|cuda] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from lightning_grng.curvature.inverse import (
    WARM_NEWTON_ITERS,
    newton_schulz_cold_start,
    newton_schulz_steps,
    spd_eigh,
    spectral_radius_mask,
)

SIZES = (64, 128, 256, 512, 785)


def ema_factors(n: int, damping: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F, F')``: a damped covariance of 2n rows and the same after one EMA step."""
    gen = torch.Generator().manual_seed(n)
    rows = torch.randn(2 * n, n, generator=gen) * torch.linspace(0.05, 2.0, n)
    F = rows.T @ rows / (2 * n) + damping * torch.eye(n)
    batch = torch.randn(n // 2, n, generator=gen) * torch.linspace(0.05, 2.0, n)
    return F, 0.95 * F + 0.05 * (batch.T @ batch / (n // 2) + damping * torch.eye(n))


CPU = torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device: torch.device = CPU) -> float:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        runs.append(time.perf_counter() - start)
    return 1000 * statistics.median(runs)


def qr_power(F: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    Q, _ = torch.linalg.qr(F @ Q)
    return (Q.T @ F @ Q).diagonal(), Q


def warm_ns(F: torch.Tensor, X0: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(F.shape[-1], device=F.device)
    ok = spectral_radius_mask(eye - X0 @ F)
    X0 = torch.where(ok, X0, newton_schulz_cold_start(F))
    return newton_schulz_steps(F, X0, WARM_NEWTON_ITERS)[0]


def warm_iterations_needed(F: torch.Tensor, X0: torch.Tensor, tol: float = 1e-4) -> int:
    for k in range(1, 31):
        if float(newton_schulz_steps(F, X0, k)[1]) <= tol:
            return k
    return 31


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decompositions.md"))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dev = torch.device(args.device)
    where = (
        f"{torch.cuda.get_device_name(dev)} (synchronized)"
        if dev.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}), 1 thread"
    )
    lines = [
        "# Refreshing one Kronecker factor: eigh vs warm QR/power iteration vs Newton–Schulz",
        "",
        f"{where}, float32, torch "
        f"{torch.__version__}; median of {args.repeats} runs, in ms; written by "
        "`python -m benchmarks.decompositions`. The machine is shared with other jobs, so "
        "single numbers can be noisy; ratios between columns are the stable part.",
        "",
        "| n | eigh | qr-power (1 it.) | ns-warm (check + "
        f"{WARM_NEWTON_ITERS} it.) | ns-cold (30 it.) | NS it. a warm start needs (tol 1e-4) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n in SIZES + ((1024, 2048) if dev.type == "cuda" else ()):
        F, F_next = (t.to(dev) for t in ema_factors(n))
        _, Q = spd_eigh(F)
        X0 = newton_schulz_steps(F, newton_schulz_cold_start(F), 40)[0]
        row = [
            timed(lambda F=F_next: spd_eigh(F), args.repeats, dev),
            timed(lambda F=F_next, Q=Q: qr_power(F, Q), args.repeats, dev),
            timed(lambda F=F_next, X0=X0: warm_ns(F, X0), args.repeats, dev),
            timed(lambda F=F_next: newton_schulz_steps(F, newton_schulz_cold_start(F), 30), 2, dev),
        ]
        need = warm_iterations_needed(F_next, X0)
        lines.append(
            f"| {n} | {row[0]:.1f} | {row[1]:.1f} | {row[2]:.1f} | {row[3]:.1f} | {need} |"
        )
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
