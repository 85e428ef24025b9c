"""LightningDataModules for the cached example datasets (see ``examples.data.fetch``).

The datamodules never download: ``prepare_data`` only checks that the cache is complete and
otherwise raises a FileNotFoundError naming the fetch command.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from functools import cached_property
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from examples.data.fetch import FASHION_MNIST_MEAN, FASHION_MNIST_STD, require, resolve_data_dir

PAD, UNK = 0, 1


class _CachedDataModule(L.LightningDataModule):
    """Shared cache check, train/val/test storage and dataloaders."""

    dataset_name: str

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None,
        batch_size: int,
        num_workers: int,
        seed: int,
        subset: int | None,
    ) -> None:
        super().__init__()
        if subset is not None and subset < 1:
            raise ValueError(f"subset must be a positive number of samples, got {subset}")
        self.data_dir = resolve_data_dir(data_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.subset = subset
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def _cache(self) -> Path:
        return require(self.dataset_name, self.data_dir)

    def _split(self, n: int, val_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Seeded random (train, val) indices of n training samples; train is not capped."""
        if not 0 <= val_size < n:
            raise ValueError(f"val_size must be in [0, {n}), got {val_size}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        return perm[val_size:], perm[:val_size]

    def prepare_data(self) -> None:
        """Check that the dataset is in the cache; nothing is downloaded."""
        self._cache()

    def setup(self, stage: str | None = None) -> None:
        """Load all three splits once (they are small enough to build together)."""
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = self._build()

    def _build(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        raise NotImplementedError

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order."""
        return self._loader(self.test_set, shuffle=False)


class FashionMNISTDataModule(_CachedDataModule):
    """Fashion-MNIST, 10 classes of 28x28 grey images.

    Batches are ``(images, labels)``: float32 ``(B, 1, 28, 28)`` normalized with the training
    mean/std 0.2860/0.3530, and int64 ``(B,)``. The validation set is a seeded random part of
    the 60k training images; the test set is the official 10k.

    Args:
        data_dir: Cache directory; defaults to ``$GRNG_DATA_DIR`` or ``<repo>/.data``.
        batch_size: Samples per batch.
        val_size: Training images held out for validation.
        num_workers: DataLoader worker processes.
        seed: Seed of the train/validation split.
        subset: Cap on the number of training images, for quick runs.
    """

    dataset_name = "fashion-mnist"
    num_classes = 10
    dims = (1, 28, 28)

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        val_size: int = 5000,
        num_workers: int = 0,
        seed: int = 0,
        subset: int | None = None,
    ) -> None:
        super().__init__(data_dir, batch_size, num_workers, seed, subset)
        self.val_size = val_size
        self.save_hyperparameters()

    @staticmethod
    def _normalize(images: torch.Tensor) -> torch.Tensor:
        return ((images.float() / 255 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD).unsqueeze(1)

    def _build(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        cache = self._cache()
        train = torch.load(cache / "train.pt", weights_only=True)
        test = torch.load(cache / "test.pt", weights_only=True)
        train_idx, val_idx = self._split(len(train["labels"]), self.val_size)
        train_idx = train_idx[: self.subset]

        def dataset(
            split: dict[str, torch.Tensor], idx: torch.Tensor | None = None
        ) -> TensorDataset:
            images, labels = (split["images"], split["labels"])
            if idx is not None:
                images, labels = images[idx], labels[idx]
            return TensorDataset(self._normalize(images), labels.long())

        return dataset(train, train_idx), dataset(train, val_idx), dataset(test)


class ShakespeareDataModule(_CachedDataModule):
    """Character-level Shakespeare (38 plays) for next-character prediction.

    The text is split into contiguous 90/5/5 % character ranges for train/val/test. Samples are
    ``(x, y)`` int64 windows of ``seq_len`` characters with ``y`` being ``x`` shifted by one.
    The vocabulary is every character of the text, sorted, so ``vocab_size`` is known as soon
    as the text is cached.

    Args:
        data_dir: Cache directory; defaults to ``$GRNG_DATA_DIR`` or ``<repo>/.data``.
        seq_len: Characters per sample.
        batch_size: Samples per batch.
        stride: Offset between consecutive training windows (default ``seq_len``, i.e.
            non-overlapping); validation and test windows never overlap.
        num_workers: DataLoader worker processes.
        seed: Unused (the split is by position); kept for a uniform interface.
        subset: Cap on the number of training windows (the first ones), for quick runs.
    """

    dataset_name = "shakespeare"
    fractions = (0.9, 0.05, 0.05)

    def __init__(
        self,
        data_dir: str | None = None,
        seq_len: int = 128,
        batch_size: int = 64,
        stride: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        subset: int | None = None,
    ) -> None:
        super().__init__(data_dir, batch_size, num_workers, seed, subset)
        self.seq_len = seq_len
        self.stride = stride or seq_len
        self.save_hyperparameters()

    @cached_property
    def text(self) -> str:
        """The whole cached text (read on first use)."""
        return (self._cache() / "shakespeare.txt").read_text(encoding="utf-8")

    @cached_property
    def vocab(self) -> list[str]:
        """Index-to-character table."""
        return sorted(set(self.text))

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters."""
        return len(self.vocab)

    def encode(self, text: str) -> torch.Tensor:
        """Map a string to int64 character ids."""
        stoi = {c: i for i, c in enumerate(self.vocab)}
        return torch.tensor([stoi[c] for c in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Map character ids back to a string."""
        vocab = self.vocab
        return "".join(vocab[i] for i in torch.as_tensor(ids).tolist())

    def _windows(self, ids: torch.Tensor, stride: int) -> TensorDataset:
        if len(ids) <= self.seq_len:
            raise ValueError(f"seq_len={self.seq_len} is longer than a split ({len(ids)} chars)")
        # unfold gives overlapping views, so a small stride costs no extra memory.
        x = ids[:-1].unfold(0, self.seq_len, stride)
        y = ids[1:].unfold(0, self.seq_len, stride)
        return TensorDataset(x, y)

    def _build(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        ids = self.encode(self.text)
        n_train = int(len(ids) * self.fractions[0])
        n_val = int(len(ids) * self.fractions[1])
        train = self._windows(ids[:n_train], self.stride)
        if self.subset is not None:
            train = TensorDataset(*(t[: self.subset] for t in train.tensors))
        val = self._windows(ids[n_train : n_train + n_val], self.seq_len)
        test = self._windows(ids[n_train + n_val :], self.seq_len)
        return train, val, test


_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")


def tokenize(text: str) -> list[str]:
    """Lowercase word split; IMDB's ``<br />`` line breaks count as spaces."""
    return _WORD.findall(text.lower().replace("<br />", " "))


class IMDBDataModule(_CachedDataModule):
    """IMDB movie reviews, binary sentiment (0 negative, 1 positive), official 25k/25k split.

    Reviews are tokenized with :func:`tokenize`, truncated to their first ``max_len`` words and
    right-padded with id 0. Id 1 is the unknown word; ids 2.. are the most frequent words of
    the training reviews (validation and test reviews are never counted). Batches are
    ``(tokens, labels)``: int64 ``(B, max_len)`` and int64 ``(B,)``.

    Args:
        data_dir: Cache directory; defaults to ``$GRNG_DATA_DIR`` or ``<repo>/.data``.
        vocab_size: Size of the id space including padding and unknown; all ids are below it.
        max_len: Tokens per review after truncation/padding.
        batch_size: Samples per batch.
        val_size: Training reviews held out for validation.
        num_workers: DataLoader worker processes.
        seed: Seed of the train/validation split.
        subset: Cap on the number of training reviews, for quick runs (the vocabulary still
            comes from all training reviews).
    """

    dataset_name = "imdb"
    num_classes = 2

    def __init__(
        self,
        data_dir: str | None = None,
        vocab_size: int = 20000,
        max_len: int = 256,
        batch_size: int = 64,
        val_size: int = 2500,
        num_workers: int = 0,
        seed: int = 0,
        subset: int | None = None,
    ) -> None:
        super().__init__(data_dir, batch_size, num_workers, seed, subset)
        if vocab_size < 3:
            raise ValueError(f"vocab_size must leave room for a word besides pad/unk: {vocab_size}")
        self.vocab_size = vocab_size
        self.max_len = max_len
        self.val_size = val_size
        self.vocab: list[str] = []
        self.save_hyperparameters()

    def _encode(self, docs: list[list[str]]) -> torch.Tensor:
        stoi = {w: i for i, w in enumerate(self.vocab)}
        out = torch.full((len(docs), self.max_len), PAD, dtype=torch.long)
        for row, words in zip(out, docs, strict=True):
            ids = [stoi.get(w, UNK) for w in words[: self.max_len]]
            row[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def _build(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        cache = self._cache()
        splits = {}
        for split in ("train", "test"):
            data = json.loads((cache / f"{split}.json").read_text(encoding="utf-8"))
            splits[split] = ([tokenize(t) for t in data["text"]], torch.tensor(data["label"]))
        docs, labels = splits["train"]
        train_idx, val_idx = self._split(len(docs), self.val_size)
        counts: Counter[str] = Counter()
        for i in train_idx.tolist():
            counts.update(docs[i])
        train_idx = train_idx[: self.subset]
        # Sort ties alphabetically so the vocabulary does not depend on dict order.
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        self.vocab = ["<pad>", "<unk>"] + [w for w, _ in ranked[: self.vocab_size - 2]]

        def dataset(
            docs: list[list[str]], labels: torch.Tensor, idx: torch.Tensor | None = None
        ) -> TensorDataset:
            if idx is not None:
                docs, labels = [docs[i] for i in idx.tolist()], labels[idx]
            return TensorDataset(self._encode(docs), labels.long())

        return (
            dataset(docs, labels, train_idx),
            dataset(docs, labels, val_idx),
            dataset(*splits["test"]),
        )
