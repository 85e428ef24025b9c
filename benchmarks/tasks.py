"""The benchmark tasks: real data, a model sized for a 2-core CPU, a loss and a metric.

Each task has three sizes ("profiles"): ``full`` (``make bench``), ``quick`` (``make
bench-quick``: a training subset, fewer steps) and ``tiny`` (the CI smoke test: generated data
of the same shapes, a handful of steps, no dataset files needed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from examples.models import CharTransformer, ImageClassifier

PROFILES = ("full", "quick", "tiny")


@dataclass(frozen=True)
class Budget:
    """Training length of one profile: steps of a final run and of a sweep run."""

    steps: int
    sweep_steps: int
    evals: int  # evaluation points of a final run after step 0
    subset: int | None = None  # cap on training samples (None: all)


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    metric: str  # "accuracy" or "loss" (cross-entropy, nats per token)
    batch_size: int
    budgets: dict[str, Budget]
    model: Callable[[int], nn.Module]  # vocabulary/classes → model
    load: Callable[[str, Budget], tuple[TensorDataset, TensorDataset, TensorDataset, int]]
    description: str
    generalization: bool = False  # trained until it fits: also train metric and sharpness
    in_benchmark: bool = True  # run by `make bench` (the GR study's tasks are not)

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        data: TensorDataset,
        metric: str | None = None,
        batch_size: int = 1000,
    ) -> float:
        """The task's metric (or ``metric``): accuracy, or the mean per-token cross-entropy
        ("loss"), over the whole split."""
        model.eval()
        total, count = 0.0, 0
        x_all, y_all = data.tensors
        for start in range(0, len(x_all), batch_size):
            x, y = x_all[start : start + batch_size], y_all[start : start + batch_size]
            out = model(x)
            if (metric or self.metric) == "accuracy":
                total += float((out.argmax(-1) == y).sum())
            else:
                total += float(self.loss(out, y)) * y.numel()
            count += y.numel()
        model.train()
        return total / count


# ---------------------------------------------------------------------------- IMDB model
class BagOfEmbeddings(nn.Module):
    """Mean of the word embeddings of a review (padding excluded), then a small MLP.

    ``nn.Embedding`` rather than ``nn.EmbeddingBag``: the latter has no double backward, which
    RENG and Sophia need. The embedding gets each optimizer's fallback update (no Kronecker
    block); the two Linear layers are preconditioned.
    """

    def __init__(self, vocab_size: int, dim: int = 64, hidden: int = 64, classes: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, ids: Tensor) -> Tensor:
        mask = (ids != 0).unsqueeze(-1).to(self.embed.weight.dtype)
        pooled = (self.embed(ids) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.mlp(pooled)


# ---------------------------------------------------------------------------- data
def _generated(kind: str, n: int, seed: int = 0) -> TensorDataset:
    """Data of a task's shapes for the tiny profile: labels from a fixed random teacher so
    there is something to learn."""
    g = torch.Generator().manual_seed(seed)
    if kind == "images":
        x = torch.randn(n, 1, 28, 28, generator=g)
        w = torch.randn(784, 10, generator=torch.Generator().manual_seed(99))
        return TensorDataset(x, (x.flatten(1) @ w).argmax(1))
    if kind == "chars":
        ids = torch.randint(0, 16, (n, 33), generator=g)
        return TensorDataset(ids[:, :-1], ids[:, 1:])
    ids = torch.randint(2, 64, (n, 32), generator=g)
    return TensorDataset(ids, (ids % 2).sum(1).remainder(2))


def _fashion_mnist(profile: str, budget: Budget):
    if profile == "tiny":
        return (*(_generated("images", n, s) for s, n in enumerate((256, 128, 128))), 10)
    from examples.data.datamodules import FashionMNISTDataModule

    dm = FashionMNISTDataModule(subset=budget.subset)
    dm.setup("fit")
    return dm.train_set, dm.val_set, dm.test_set, 10


#: Seed of the label noise: the same corrupted labels for every optimizer, lr and seed.
NOISE_SEED = 1234


def symmetric_noise(labels: Tensor, rate: float, classes: int, seed: int = NOISE_SEED) -> Tensor:
    """``labels`` with a seeded ``rate`` fraction replaced by a different class, uniformly
    (symmetric label noise: every wrong class equally likely)."""
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(labels), generator=g) < rate
    shift = torch.randint(1, classes, (len(labels),), generator=g)
    return torch.where(flip, (labels + shift) % classes, labels)


def _noisy_fashion_mnist(rate: float) -> Callable[[str, Budget], tuple]:
    """The 5k Fashion-MNIST subset with symmetric noise on the training and validation labels
    (what a user holds); the test labels stay clean."""

    def load(profile: str, budget: Budget):
        train, val, test, classes = _fashion_mnist(profile, budget)
        noisy = [
            TensorDataset(d.tensors[0], symmetric_noise(d.tensors[1], rate, classes, seed))
            for seed, d in enumerate((train, val), start=NOISE_SEED)
        ]
        return noisy[0], noisy[1], test, classes

    return load


def _shakespeare(profile: str, budget: Budget):
    if profile == "tiny":
        return (*(_generated("chars", n, s) for s, n in enumerate((256, 64, 64))), 16)
    from examples.data.datamodules import ShakespeareDataModule

    dm = ShakespeareDataModule(seq_len=64, subset=budget.subset)
    dm.setup("fit")
    # Evaluate on every 8th window of the 5 % validation/test ranges (~31k characters each):
    # the same characters for every optimizer, at an eighth of the evaluation cost.
    val, test = (TensorDataset(*(t[::8] for t in d.tensors)) for d in (dm.val_set, dm.test_set))
    return dm.train_set, val, test, dm.vocab_size


def _imdb(profile: str, budget: Budget):
    if profile == "tiny":
        return (*(_generated("tokens", n, s) for s, n in enumerate((256, 128, 128))), 64)
    from examples.data.datamodules import IMDBDataModule

    dm = IMDBDataModule(vocab_size=20000, max_len=256, subset=budget.subset)
    dm.setup("fit")
    return dm.train_set, dm.val_set, dm.test_set, dm.vocab_size


#: The 5k-subset tasks (the generalization task and the GR study's noisy ones): 5k training
#: images / 128 = 39 steps per epoch, 30 epochs (the sweep: 10).
SMALL_BUDGETS = {
    "full": Budget(steps=1170, sweep_steps=390, evals=6, subset=5000),
    "quick": Budget(steps=80, sweep_steps=0, evals=2, subset=1000),
    "tiny": Budget(steps=6, sweep_steps=4, evals=2),
}


#: The large-batch regime of the GR study: the 5k task at 8× its batch (1024), same 30 epochs,
#: so 8× fewer steps (4 per epoch with the last partial batch dropped, as every task does).
LARGE_BATCH_BUDGETS = {
    "full": Budget(steps=146, sweep_steps=49, evals=6, subset=5000),
    "quick": Budget(steps=10, sweep_steps=0, evals=2, subset=1000),
    "tiny": Budget(steps=4, sweep_steps=2, evals=2),
}


def _cnn(classes: int) -> nn.Module:
    """The Fashion-MNIST CNN of every image task."""
    return ImageClassifier(classes, width=16, hidden=64).net


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            name="fashion_mnist",
            title="Fashion-MNIST, small CNN",
            metric="accuracy",
            batch_size=128,
            # 55k training images / 128 = 429 steps per epoch.
            budgets={
                "full": Budget(steps=858, sweep_steps=429, evals=8),
                "quick": Budget(steps=60, sweep_steps=0, evals=2, subset=5000),
                "tiny": Budget(steps=6, sweep_steps=4, evals=2),
            },
            model=_cnn,
            load=_fashion_mnist,
            description="CNN conv 1→16→32 (3×3, max-pool), fc 288→64→10 (≈25k parameters); "
            "55k train / 5k validation (seeded split of the 60k) / official 10k test",
        ),
        Task(
            name="fashion_mnist_small",
            title="Fashion-MNIST 5k subset, trained to fit (generalization)",
            metric="accuracy",
            batch_size=128,
            budgets=SMALL_BUDGETS,
            model=_cnn,
            load=_fashion_mnist,
            description="the Fashion-MNIST CNN on a seeded 5k-image training subset, 30 epochs "
            "(train accuracy near 100 %); same 5k validation / official 10k test",
            generalization=True,
        ),
        *(
            Task(
                name=f"fashion_mnist_noisy{round(100 * rate)}",
                title=f"Fashion-MNIST 5k, {round(100 * rate)} % symmetric label noise, "
                "trained to fit (GR study)",
                metric="accuracy",
                batch_size=128,
                budgets=SMALL_BUDGETS,
                model=_cnn,
                load=_noisy_fashion_mnist(rate),
                description="the 5k-subset CNN task with a seeded share of the training and "
                "validation labels replaced by another class (uniformly); clean 10k test set",
                generalization=True,
                in_benchmark=False,
            )
            for rate in (0.2, 0.4)
        ),
        Task(
            name="fashion_mnist_large_batch",
            title="Fashion-MNIST 5k, batch 1024 (8×), trained to fit (GR study)",
            metric="accuracy",
            batch_size=1024,
            budgets=LARGE_BATCH_BUDGETS,
            model=_cnn,
            load=_fashion_mnist,
            description="the 5k-subset CNN task at 8× its batch for the same 30 epochs "
            "(146 steps); clean labels",
            generalization=True,
            in_benchmark=False,
        ),
        Task(
            name="shakespeare",
            title="Shakespeare characters, causal transformer",
            metric="loss",
            batch_size=32,
            budgets={
                "full": Budget(steps=600, sweep_steps=300, evals=6),
                "quick": Budget(steps=50, sweep_steps=0, evals=2),
                "tiny": Budget(steps=6, sweep_steps=4, evals=2),
            },
            model=lambda vocab: CharTransformer(vocab, seq_len=64, dim=64, depth=2, heads=4),
            load=_shakespeare,
            description="2 blocks, width 64, 4 heads, context 64 (≈110k parameters); "
            "contiguous 90/5/5 % character split of 38 plays (~4.8M characters)",
        ),
        Task(
            name="imdb",
            title="IMDB reviews, bag of embeddings",
            metric="accuracy",
            batch_size=64,
            # 22.5k training reviews / 64 = 351 steps per epoch.
            budgets={
                "full": Budget(steps=1053, sweep_steps=351, evals=6),
                "quick": Budget(steps=60, sweep_steps=0, evals=2, subset=5000),
                "tiny": Budget(steps=6, sweep_steps=4, evals=2),
            },
            model=lambda vocab: BagOfEmbeddings(vocab),
            load=_imdb,
            description="mean of 64-d word embeddings (20k words, first 256 tokens), MLP "
            "64→64→2 (≈1.3M parameters, 1.28M of them in the embedding); 22.5k train / "
            "2.5k validation / official 25k test",
        ),
    )
}


def lr_factor(step: int, total: int, warmup_fraction: float = 0.05) -> float:
    """The shared schedule: linear warm-up from 10 % over the first 5 % of steps, then cosine
    decay to zero."""
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        return 0.1 + 0.9 * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


SCHEDULE = "linear warm-up from 10 % over 5 % of the steps, then cosine decay to 0"
