"""Host synchronisations per step: at most one, for every optimizer, on regular steps and on
steps that absorb statistics or refresh inverses (counted, not timed)."""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch
from torch import nn

import lightning_grng as lg
from lightning_grng.diagnostics import SyncCounter, count_syncs

# The paper's K-FAC route: these tests check its math (the eigen mode: test_eigen.py).
KFAC_K = partial(lg.KFAC, preconditioner="kfac")
RING_K = partial(lg.RING, preconditioner="kfac")
RENG_K = partial(lg.RENG, preconditioner="kfac")

SCHEDULE = dict(curvature_every=2)
OPTIMIZERS = {
    "KFAC-eigh": lambda p: KFAC_K(p, inverse="eigh", inverse_every=3, **SCHEDULE),
    "KFAC-newton": lambda p: KFAC_K(p, inverse="newton", inverse_every=3, **SCHEDULE),
    "RING-eigh": lambda p: RING_K(p, inverse="eigh", inverse_every=3, **SCHEDULE),
    "RING-newton": lambda p: RING_K(p, inverse="newton", inverse_every=3, **SCHEDULE),
    "RENG": lambda p: RENG_K(p, inverse_every=3, **SCHEDULE),
    "KFAC-eigen": lambda p: lg.KFAC(p, inverse_every=3, **SCHEDULE),
    "RING-eigen": lambda p: lg.RING(p, inverse_every=3, **SCHEDULE),
    "RING-gradient-adam": lambda p: lg.RING(
        p, inverse_every=3, curvature="gradient", momentum_on="gradient", **SCHEDULE
    ),
    "RING-warm": lambda p: lg.RING(p, inverse_every=3, refresh="warm", **SCHEDULE),
    "RENG-newton": lambda p: RENG_K(p, inverse="newton", inverse_every=3, **SCHEDULE),
    "RKalman": lambda p: lg.RKalman(p, **SCHEDULE),
    "RKalman-noise": lambda p: lg.RKalman(p, rho_mode="noise", measurement="rows", **SCHEDULE),
}


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16),
        nn.Tanh(), nn.Linear(16, 5),
    )  # fmt: skip
    cnn = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 5),
    )  # fmt: skip
    return {"mlp": mlp, "cnn": cnn}


def _inputs(kind: str) -> torch.Tensor:
    return torch.randn(16, 12) if kind == "mlp" else torch.randn(16, 1, 6, 6)


def _syncs_per_step(name: str, kind: str, steps: int = 7, backward: str = "plain") -> list[int]:
    model = _models()[kind]
    opt = OPTIMIZERS[name](model.parameters())
    lg.attach(model, opt)
    counts = []
    for _ in range(steps):
        x, y = _inputs(kind), torch.randint(0, 5, (16,))
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if backward == "regularized":
            lg.regularized_backward(loss, opt)
        else:
            loss.backward(create_graph=isinstance(opt, lg.RENG))
        with SyncCounter() as counter:
            opt.step()
        counts.append(counter.total)
    return counts


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_at_most_one_host_sync_per_step(name, kind):
    counts = _syncs_per_step(name, kind)
    # Steps 0, 2, 4, ... absorb statistics; with inverse_every=3 and staggering, refreshes fall
    # on every step: the budget holds on regular, curvature and refresh steps alike.
    assert max(counts) <= 1, counts


def test_reng_regularized_backward_keeps_the_budget():
    assert max(_syncs_per_step("RENG", "mlp", backward="regularized")) <= 1


def test_failure_steps_keep_the_budget():
    """A skipped step (non-finite gradient) and a failed refresh also read back once."""
    model = _models()["mlp"]
    opt = KFAC_K(model.parameters(), curvature_every=1, inverse_every=1)
    lg.attach(model, opt)
    x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.factors("0").A[0, 0, 0] = float("nan")
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    model[2].weight.grad[0, 0] = float("inf")
    with warnings.catch_warnings(), SyncCounter() as counter:
        warnings.simplefilter("ignore")
        opt.step()
    assert counter.total <= 1 and opt.skipped_steps == 1
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    with SyncCounter() as counter:
        opt.step()
    assert counter.total <= 1
    assert opt.inverse_failures == 0  # the curvature step restarted the NaN factor first


def test_counter_sees_every_kind_of_read_back():
    t = torch.ones(3)
    with count_syncs() as counter:
        t.sum().item()
        bool(t.all())
        float(t[0])
        int(t[1])
        t.tolist()
        t.nonzero()
        torch.nonzero(t)
        _ = t[t > 0]
        torch.equal(t, t)
        f"{t.sum():.1f}"
        t.mul(2).add_(1)  # not a sync
    assert counter.total == 10, dict(counter.by_kind)


class _TinyEncoderLM(nn.Module):
    """Embedding, MultiheadAttention (through nn.TransformerEncoderLayer), LayerNorm (Adam
    fallback) and a head: every block type of a transformer, and the tying check."""

    def __init__(self, vocab: int = 13, dim: int = 8) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim, padding_idx=0)
        layer = nn.TransformerEncoderLayer(dim, 2, 16, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.tok(ids)))


@pytest.mark.parametrize("name", ["KFAC-eigh", "KFAC-newton", "RING-newton", "RENG", "RING-eigen"])
def test_transformer_blocks_and_adam_fallback_keep_the_budget(name):
    torch.manual_seed(0)
    model = _TinyEncoderLM()
    opt = OPTIMIZERS[name](model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the LayerNorms' fallback is named in a warning
        lg.attach(model, opt)
    counts = []
    for _ in range(7):
        ids = torch.randint(0, 13, (4, 6))
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(ids).reshape(-1, 13), ids.reshape(-1))
        loss.backward(create_graph=isinstance(opt, lg.RENG))
        with SyncCounter() as counter:
            opt.step()
        counts.append(counter.total)
    assert max(counts) <= 1, counts
