"""Golden trajectories: every optimizer × preconditioner route, 30 steps in float64.

Recorded once, before the optimizer core was restructured (issue 20), by

    python -m tests.golden.trajectories --record

``tests/test_golden.py`` replays each run and requires the same weights within 1e-12: a
refactor of the core must not change a single step.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import lightning_grng as lg

PATH = Path(__file__).with_name("trajectories.pt")
STEPS = 30

#: name -> (optimizer class name, keyword arguments, per-group overrides of the last group)
CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "KFAC-eigen": ("KFAC", {}, {}),
    "KFAC-eigen-busy": ("KFAC", dict(curvature_every=1, inverse_every=3, weight_decay=0.1), {}),
    "KFAC-kfac": ("KFAC", dict(preconditioner="kfac", lr=0.05), {}),
    "KFAC-kfac-busy": (
        "KFAC",
        dict(preconditioner="kfac", lr=0.05, curvature_every=1, inverse_every=2),
        {},
    ),
    "RING-eigen": ("RING", dict(rho=0.5), {"rho": 0.1, "lr": 0.01}),
    "RING-eigen-busy": ("RING", dict(rho=0.5, curvature_every=1, inverse_every=3), {}),
    "RING-kfac-newton": ("RING", dict(preconditioner="kfac", lr=0.05), {"rho": 2.0}),
    "RING-kfac-eigh": (
        "RING",
        dict(preconditioner="kfac", inverse="eigh", lr=0.05, curvature_every=2, inverse_every=3),
        {},
    ),
    "RING-kfac-absolute": (
        "RING",
        dict(
            preconditioner="kfac",
            inverse="eigh",
            damping_mode="absolute",
            damping=1e-2,
            rho=0.1,
            lr=0.05,
        ),
        {},
    ),
    "RENG-eigen": ("RENG", dict(rho=0.3), {"rho": 0.0}),
    "RENG-eigen-busy": ("RENG", dict(rho=0.3, curvature_every=1, inverse_every=3), {}),
    "RENG-kfac": ("RENG", dict(preconditioner="kfac", lr=0.05, rho=0.3), {}),
    "RENG-fd": ("RENG", dict(rho=0.3, gr_mode="finite_difference"), {}),
    "RKalman": ("RKalman", dict(lr=0.5), {"rho": 0.1}),
    "RKalman-noise-rows": (
        "RKalman",
        dict(lr=0.5, rho=0.05, rho_mode="noise", measurement="rows", curvature_every=1),
        {},
    ),
}


class Net(nn.Module):
    """One block of each kind: Embedding (diagonal A), Conv1d, MultiheadAttention, Linear; a
    LayerNorm for the fallback. Tanh keeps every second derivative alive for RENG."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(13, 6)
        self.conv = nn.Conv1d(6, 6, 3, padding=1)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.norm = nn.LayerNorm(6)
        self.fc1 = nn.Linear(6, 7)
        self.fc2 = nn.Linear(7, 4)

    def forward(self, tokens: Tensor) -> Tensor:
        h = torch.tanh(self.conv(self.emb(tokens).transpose(1, 2))).transpose(1, 2)
        h = self.norm(h + self.attn(h, h, h)[0])
        return self.fc2(torch.tanh(self.fc1(h)).mean(1))


def batches() -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randint(0, 13, (8, 5), generator=g), torch.randint(0, 4, (8,), generator=g))
        for _ in range(STEPS)
    ]


def run(name: str) -> list[Tensor]:
    """The weights after :data:`STEPS` steps of case ``name``, on one thread (a matmul's
    rounding depends on how it is split over threads, and the kfac-mode cases amplify it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(name)
    finally:
        torch.set_num_threads(threads)


#: The defaults of KFAC, RING and RENG when the trajectories were recorded (the eigen mode's
#: defaults moved to gradient statistics with Adam-order momentum since, issue 23, and an
#: embedding's rows to the lazy update, issue 22: ``tests/test_lazy_rows.py``).
RECORDED_DEFAULTS = dict(curvature="kfac", momentum_on="direction", lazy_rows=False)


def _run(name: str) -> list[Tensor]:
    cls_name, kwargs, last_group = CASES[name]
    if cls_name != "RKalman":
        kwargs = {**RECORDED_DEFAULTS, **kwargs}
    torch.manual_seed(0)
    model = Net().double()
    params = list(model.parameters())
    groups = [{"params": params[:-2]}, {"params": params[-2:], **last_group}]
    opt = getattr(lg, cls_name)(groups, **kwargs)
    logging.getLogger("lightning_grng").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = lg.attach(model, opt)
    fd = getattr(opt, "gr_mode", None) is not None and opt.gr_mode.value == "finite_difference"
    double = cls_name == "RENG" and not fd
    loss_fn = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x, y in batches():

            def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward(create_graph=double)
                return loss

            if fd:
                opt.step(closure)
            else:
                closure()
                opt.step()
    handle.remove()
    return [p.detach().clone() for p in model.parameters()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--record", action="store_true", help="(re)write trajectories.pt")
    args = parser.parse_args()
    results = {name: run(name) for name in CASES}
    if args.record:
        torch.save(results, PATH)
        print(f"wrote {PATH} ({len(results)} cases)")
    else:
        golden = torch.load(PATH)
        for name, weights in results.items():
            err = max(
                (a - b).abs().max().item() for a, b in zip(weights, golden[name], strict=True)
            )
            print(f"{name:22s} max |Δ| = {err:.3g}")


if __name__ == "__main__":
    main()
