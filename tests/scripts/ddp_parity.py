"""DDP runs of GRNGDDPStrategy for tests/test_ddp.py: 1 process with global batch 2B, or 2 gloo
processes with batch B each, on the same data (rank r gets the r-th half of each global batch).

One invocation trains every optimizer named in ``--optimizers`` in turn (one process group for
all), for ``--epochs`` epochs of one global batch each, optionally resuming from ``--resume``
(a checkpoint of ``<out>/<name>.ckpt`` written with ``--save``). Rank 0 writes the final
weights ``<out>/<name>_w<devices>.pt``; every rank writes ``<out>/<name>_w<devices>_r<rank>.json``
with its factor bytes and per-step time. Launched with subprocess (Lightning's ``ddp`` launcher
re-executes this command as rank 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader

import lightning_grng as lg

B = 4  # per-rank batch at 2 ranks; the global batch is 2B


def make_optimizer(name: str, params):
    kfac = dict(preconditioner="kfac")  # the paper's route; RING-eigen: the default mode
    if name == "KFAC":
        return lg.KFAC(params, lr=0.1, curvature_every=1, inverse_every=1, inverse="eigh", **kfac)
    if name == "RING":
        return lg.RING(params, lr=0.1, rho=0.1, curvature_every=1, inverse_every=2, **kfac)
    if name == "RENG":
        return lg.RENG(params, lr=0.1, rho=0.1, curvature_every=1, inverse_every=1, **kfac)
    if name == "RING-eigen":  # K-FAC statistics; the second moment lives with the block's owner
        return lg.RING(
            params, lr=0.05, curvature="kfac", momentum_on="direction", curvature_every=1,
            inverse_every=2,
        )  # fmt: skip
    if name == "RING-gradient":  # the defaults: the owner forms gradient statistics from .grad
        return lg.RING(params, lr=0.05, inverse_every=2)
    if name == "RING-one-sided":  # the input side (width + 1) kept as its diagonal
        return lg.RING(params, lr=0.05, inverse_every=2, one_sided="narrower")
    if name == "RKalman":
        # rows >= the global batch: the owner absorbs exactly the rows the 1-process run does.
        return lg.RKalman(
            params, lr=0.5, measurement="rows", measurement_size=4 * B, curvature_every=1
        )
    raise ValueError(name)


class Net(L.LightningModule):
    def __init__(self, name: str, width: int, layers: int, unused_on_rank0: bool):
        super().__init__()
        self.name = name
        self.unused_on_rank0 = unused_on_rank0
        self.body = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        # Only for the guard test: a block used on rank 1 only, owned by rank 0.
        self.extra = nn.Linear(width, width) if unused_on_rank0 else None

    def forward(self, x):
        for i, layer in enumerate(self.body):
            x = layer(x)
            if i + 1 < len(self.body):
                x = torch.tanh(x)
        if self.extra is not None and self.global_rank == 1:
            x = x + 0.1 * self.extra(x)
        return x

    def training_step(self, batch, batch_idx):
        x, y = batch
        return 0.5 * (self(x) - y).pow(2).sum(-1).mean()

    def train_dataloader(self):
        world, rank = self.trainer.world_size, self.trainer.global_rank
        # One global batch per epoch, the same whatever the run length or world size.
        gen = torch.Generator().manual_seed(1000 + self.current_epoch)
        width = self.body[0].in_features
        X = torch.randn(2 * B, width, generator=gen, dtype=torch.float64)
        Y = torch.randn(2 * B, width, generator=gen, dtype=torch.float64)
        per = 2 * B // world
        sl = slice(rank * per, (rank + 1) * per)
        return DataLoader([(X[sl], Y[sl])], batch_size=None)

    def configure_optimizers(self):
        return make_optimizer(self.name, self.parameters())


class StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, *args, **kwargs) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, *args, **kwargs) -> None:
        self.times.append(time.perf_counter() - self._t)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument(
        "--optimizers", default="KFAC,RING,RENG,RKalman,RING-eigen,RING-gradient,RING-one-sided"
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--save", action="store_true", help="write <out>/<name>.ckpt at the end")
    parser.add_argument("--resume", type=Path, default=None, help="folder with <name>.ckpt")
    parser.add_argument("--tag", default="")
    parser.add_argument("--unused-on-rank0", action="store_true")
    parser.add_argument("--static-graph", action="store_true")
    parser.add_argument("--accumulate", type=int, default=1)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    for name in args.optimizers.split(","):
        L.seed_everything(0, verbose=False)
        # The eigen mode's step depends on the basis inside a repeated eigenvalue's eigenspace
        # (docs/algorithms.md §8.4), which rounding picks differently on 1 and 2 processes; with
        # 2B = 8 samples only layers narrower than that have full-rank K-FAC factors. Gradient
        # statistics settle their null space (rank-deficient at the first refresh: a 16 × 17
        # gradient), so they run at the full width.
        width = min(args.width, 3) if name == "RING-eigen" else args.width
        model = Net(name, width, args.layers, args.unused_on_rank0).double()
        timer = StepTimer()
        ddp_kwargs = {"static_graph": True} if args.static_graph else {}
        if args.unused_on_rank0:
            ddp_kwargs["find_unused_parameters"] = True
        trainer = L.Trainer(
            accelerator="cpu",
            devices=args.devices,
            strategy=lg.GRNGDDPStrategy(process_group_backend="gloo", **ddp_kwargs),
            max_epochs=args.epochs,
            accumulate_grad_batches=args.accumulate,
            use_distributed_sampler=False,
            reload_dataloaders_every_n_epochs=1,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer],
        )
        ckpt = None if args.resume is None else args.resume / f"{name}.ckpt"
        trainer.fit(model, ckpt_path=ckpt)
        stem = f"{name}{args.tag}_w{args.devices}"
        if args.save:
            trainer.save_checkpoint(args.out / f"{name}.ckpt")
        opt = trainer.optimizers[0]
        opt = getattr(opt, "optimizer", opt)
        rank = trainer.global_rank
        info = {
            "rank": rank,
            "world": trainer.world_size,
            "factor_bytes": opt.factor_bytes(),
            "owned": sorted(k for k in opt.blocks if opt._owns(k)),
            "with_state": sorted(k for k in opt.blocks if opt._block_state(k)),
            "step_times": timer.times,
            "global_step": trainer.global_step,
            "pid": os.getpid(),
        }
        (args.out / f"{stem}_r{rank}.json").write_text(json.dumps(info))
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(weights, args.out / f"{stem}_r{rank}.pt")


if __name__ == "__main__":
    main()
