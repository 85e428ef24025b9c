"""Trains a small CNN with RING; optionally SIGKILLs itself mid-epoch or resumes from the last
checkpoint. Writes the final weights to ``<out>/final.pt``. Used by tests/test_cli.py."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import lightning_grng as lg
from examples.data.synthetic import RandomImagesDataModule
from examples.models import ImageClassifier


class Model(ImageClassifier):
    def configure_optimizers(self):
        return lg.RING(self.parameters(), lr=0.05, curvature_every=2, inverse_every=3)


class KillAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--kill-at-step", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    L.seed_everything(0)
    torch.use_deterministic_algorithms(True)
    callbacks: list[Callback] = [ModelCheckpoint(dirpath=args.out, save_last=True, save_top_k=-1)]
    if args.kill_at_step is not None:
        callbacks.append(KillAt(args.kill_at_step))
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    model = Model(width=4, hidden=16)
    data = RandomImagesDataModule(num_samples=256, batch_size=32)
    trainer.fit(model, data, ckpt_path=args.out / "last.ckpt" if args.resume else None)
    torch.save(model.state_dict(), args.out / "final.pt")


if __name__ == "__main__":
    main()
