"""Embeddings at O(rows touched) (``lazy_rows``, ``optim/lazy_rows.py``), in float64: equal to
the dense update when every row is touched; otherwise the dense definition restricted to the
touched rows, the untouched rows (weights and moments) left exactly as they were."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lightning_grng as lg
from lightning_grng.diagnostics import count_syncs

VOCAB, DIM = 30, 6


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, DIM)
        self.head = nn.Linear(DIM, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(tokens).mean(1))


def _model() -> Bag:
    torch.manual_seed(0)
    return Bag().double()


def _batch(step: int, every_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    if every_row:  # each batch holds every token
        tokens = torch.stack([torch.randperm(VOCAB, generator=g) for _ in range(4)])
    else:  # a varying part of the vocabulary
        high = (8, 30, 15)[step % 3]
        tokens = torch.randint(0, high, (4, 5), generator=g)
    return tokens, torch.randint(0, 3, (4,), generator=g)


def _train(model: Bag, opt: lg.KFAC, steps: range, every_row: bool) -> None:
    for step in steps:
        tokens, labels = _batch(step, every_row)
        opt.zero_grad()
        nn.functional.cross_entropy(model(tokens), labels).backward()
        opt.step()


def _embedding_key(opt: lg.KFAC) -> str:
    return next(key for key, block in opt._blocks.items() if block.diagonal_input)


@pytest.mark.parametrize("gr_form", ["diagonal", "isotropic", "preconditioned"])
def test_lazy_rows_equal_the_dense_update_when_every_row_is_touched(gr_form):
    dense_model, lazy_model = _model(), _model()
    options = dict(lr=0.02, rho=0.5, gr_form=gr_form, inverse_every=3)
    dense = lg.RING(dense_model.parameters(), lazy_rows=False, **options)
    lazy = lg.RING(lazy_model.parameters(), **options)
    assert lazy.lazy_rows  # the eigen mode's default
    for model, opt in ((dense_model, dense), (lazy_model, lazy)):
        lg.attach(model, opt)
        _train(model, opt, range(6), every_row=True)  # refreshes at steps 0 and 3
    # The same arithmetic in another order (γ's block mean from sums): 1e-16 apart until a
    # refresh, whose eigendecomposition grows the rounding (≤ 2e-12 measured); a difference in
    # the math would be O(lr) = 1e-2.
    for a, b in zip(dense_model.parameters(), lazy_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    key = _embedding_key(lazy)
    for name in ("moment", "rotated_first_moment"):
        got, want = getattr(lazy.factors(key), name), getattr(dense.factors(key), name)
        # a refresh carries the moments by the same matmul, transposed: rounding only
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * want.abs().max().item())


@pytest.mark.parametrize("rho", [0.0, 0.5])
def test_lazy_rows_follow_the_dense_definition_on_the_touched_rows(rho):
    """One step against the dense eigen-mode arithmetic (``docs/algorithms.md`` §8, §8.9) on
    the touched rows; the untouched rows keep weights and moments bit for bit."""
    model = _model()
    beta1, beta2, lr, lam = 0.9, 0.95, 0.02, 1e-4
    opt = lg.RING(
        model.parameters(), lr=lr, rho=rho, momentum=beta1, beta2=beta2, damping=lam,
        kl_clip=None, inverse_every=1000,
    )  # fmt: skip
    lg.attach(model, opt)
    _train(model, opt, range(5), every_row=False)  # some rows skipped on some steps
    key = _embedding_key(opt)
    factors = opt.factors(key)
    W, M, F = (t.detach().clone() for t in (model.embedding.weight, factors.moment,
                                            factors.rotated_first_moment))  # fmt: skip
    Q = factors.evec_G[0].clone()
    count, first_count = factors.moment_count + 1, factors.first_count + 1

    tokens, labels = _batch(6, every_row=False)  # tokens 0..7 of 30
    opt.zero_grad()
    nn.functional.cross_entropy(model(tokens), labels).backward()
    grad = model.embedding.weight.grad.detach().clone()
    opt.step()

    touched = grad.ne(0).any(1)
    assert 0 < int(touched.sum()) < VOCAB
    R = (Q.T @ grad.T)[None]  # the rotated gradient, (1, d, rows)
    M_new = torch.where(touched, beta2 * M + (1 - beta2) * R * R, M)
    F_new = torch.where(touched, beta1 * F + (1 - beta1) * R, F)
    D = M_new / (1 - beta2**count)
    curvature = D + lam * D.mean() + rho * R * R
    U = Q @ ((F_new / (1 - beta1**first_count)) * curvature.rsqrt())[0]
    expected = W - lr * torch.where(touched[:, None], U.T, torch.zeros_like(W))

    weight = model.embedding.weight.detach()
    torch.testing.assert_close(weight, expected, rtol=1e-12, atol=1e-14)
    assert torch.equal(weight[~touched], W[~touched])
    torch.testing.assert_close(factors.moment, M_new, rtol=1e-12, atol=0)
    torch.testing.assert_close(factors.rotated_first_moment, F_new, rtol=1e-12, atol=1e-15)
    assert torch.equal(factors.moment[..., ~touched], M[..., ~touched])


def test_lazy_rows_cost_no_host_sync_beyond_the_steps_one():
    model = _model()
    opt = lg.RING(model.parameters(), lr=0.02)
    lg.attach(model, opt)
    _train(model, opt, range(3), every_row=False)
    for step in range(3, 9):
        with count_syncs() as counter:
            _train(model, opt, range(step, step + 1), every_row=False)
        assert counter.total <= 1, counter.by_kind


def test_lazy_rows_resume_from_a_checkpoint_exactly():
    model = _model()
    opt = lg.RING(model.parameters(), lr=0.02, inverse_every=3)
    lg.attach(model, opt)
    _train(model, opt, range(4), every_row=False)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, range(4, 9), every_row=False)

    resumed = _model()
    resumed.load_state_dict(saved_model)
    opt2 = lg.RING(resumed.parameters(), lr=0.02, inverse_every=3)
    lg.attach(resumed, opt2)
    opt2.load_state_dict(saved_opt)
    _train(resumed, opt2, range(4, 9), every_row=False)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_momentum_on_the_direction_moves_every_row():
    """With ``momentum_on="direction"`` the template's momentum (on the whole direction) moves
    the rows a batch skips too; the lazy rows then only save the rotations."""
    model = _model()
    opt = lg.RING(model.parameters(), lr=0.02, momentum_on="direction")
    lg.attach(model, opt)
    _train(model, opt, range(5), every_row=False)
    before = model.embedding.weight.detach().clone()
    _train(model, opt, range(6, 7), every_row=False)  # tokens 0..7 only
    moved = (model.embedding.weight.detach() != before).any(1)
    assert moved[8:].any()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(lazy_rows=True, preconditioner="kfac"), ValueError, "eigen mode's moments"),
        (dict(lazy_rows="yes"), TypeError, "True, False or None"),
    ],
)
def test_invalid_lazy_rows_settings_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        lg.RING(_model().parameters(), **kwargs)
