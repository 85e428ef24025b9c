"""Generated data for smoke tests and CI: no files, same interface as the real datamodules."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset


class EpochSeededSampler(Sampler[int]):
    """A shuffle that depends only on ``(seed, epoch)``: a run resumed at an epoch boundary
    sees exactly the batches the uninterrupted run saw (Lightning calls ``set_epoch``)."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=g).tolist())

    def __len__(self) -> int:
        return self.size


class RandomImagesDataModule(L.LightningDataModule):
    """Images ``(1, size, size)`` labelled by a fixed random linear teacher, so the task is
    learnable and a falling loss means something.

    Args:
        num_samples: training samples (validation and test get a quarter each).
        size: image side length.
        num_classes: number of classes.
        batch_size: batch size.
        seed: seed of the data and of the per-epoch shuffle.
    """

    def __init__(
        self,
        num_samples: int = 512,
        size: int = 28,
        num_classes: int = 10,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.num_samples, self.size, self.num_classes = num_samples, size, num_classes
        self.batch_size, self.seed = batch_size, seed

    def setup(self, stage: str | None = None) -> None:
        g = torch.Generator().manual_seed(self.seed)
        n = self.num_samples + 2 * (self.num_samples // 4)
        x = torch.randn(n, 1, self.size, self.size, generator=g)
        teacher = torch.randn(self.size * self.size, self.num_classes, generator=g)
        y = (x.flatten(1) @ teacher).argmax(1)
        a, b = self.num_samples, self.num_samples + self.num_samples // 4
        self.train_set = TensorDataset(x[:a], y[:a])
        self.val_set = TensorDataset(x[a:b], y[a:b])
        self.test_set = TensorDataset(x[b:], y[b:])

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSeededSampler(len(self.train_set), self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.batch_size)
