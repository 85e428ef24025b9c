"""Per-layer damping against curvature on the Shakespeare benchmark model (issue 11).

Trains the benchmark transformer with one optimizer for ``--steps`` steps (the suite's batches and
schedule), then prints, for every Kronecker block, the largest and the mean eigenvalue of its
A ⊗ G, the damping γ it applied, and γ / mean eigenvalue. Runs on any version of the package
that has ``optimizer.factors(key)`` (so the numbers before and after a change come from one
script): γ is the absolute ``damping`` where the optimizer has no ``damping_mode``.

    python -m benchmarks.damping_ratio --optimizer KFAC --lr 0.1 --steps 200 [--kw damping=0.1]
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch.utils.data import DataLoader

import lightning_grng as lg
from benchmarks import harness
from benchmarks.tasks import TASKS, lr_factor


def _kw(items: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items:
        key, value = item.split("=")
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = None if value == "none" else value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="KFAC", choices=["KFAC", "RING", "RENG"])
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--kw", nargs="*", default=[])
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")

    task = TASKS["shakespeare"]
    train_set, *_, vocab = harness.task_data(task, "full")
    torch.manual_seed(0)
    model = task.model(vocab)
    opt = getattr(lg, args.optimizer)(model.parameters(), lr=args.lr, **_kw(args.kw))
    lg.attach(model, opt)
    loader = DataLoader(
        train_set, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    base = opt.param_groups[0]["lr"]
    batches = iter(loader)
    for step in range(args.steps):
        x, y = next(batches)
        for group in opt.param_groups:
            group["lr"] = base * lr_factor(step, args.steps)
        opt.zero_grad()
        task.loss(model(x), y).backward()
        opt.step()

    mode = getattr(getattr(opt, "damping_mode", None), "value", "absolute (only mode)")
    print(f"{args.optimizer} lr={args.lr} {args.kw} after {args.steps} steps; damping: {mode}")
    print("| layer | λ_max(A⊗G) | mean eig m | γ | γ / m | γ / λ_max |")
    print("|---|---|---|---|---|---|")
    for key, block in opt.blocks.items():
        f = opt.factors(key)
        diagonal = f.A.dim() == 2  # an embedding's A is stored as its diagonal
        eig_a = f.A.double().amax(-1) if diagonal else torch.linalg.eigvalsh(f.A.double())[..., -1]
        eig_g = torch.linalg.eigvalsh(f.G.double())[..., -1]
        top = float((eig_a * eig_g).max())
        diag_a = f.A if diagonal else torch.diagonal(f.A, dim1=-2, dim2=-1)
        mean = float(diag_a.mean(-1).mul(torch.diagonal(f.G, dim1=-2, dim2=-1).mean(-1)).mean())
        ratio = opt.diagnostics.get(f"damping_ratio/{block.name}")
        gamma = float(ratio) * mean if ratio is not None else opt.param_groups[0]["damping"]
        print(
            f"| {block.name} | {top:.2e} | {mean:.2e} | {gamma:.2e} | {gamma / mean:.3g} "
            f"| {gamma / top:.3g} |"
        )


if __name__ == "__main__":
    main()
