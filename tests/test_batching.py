"""Same-shaped blocks as one stacked batch (``optim/batching.py``), in float64: the batched
gradient statistics and eigen-mode directions equal the one-block-at-a-time arithmetic, for
every GR form and momentum order, across refreshes; each block's finiteness decisions stay its
own; and the batches do form (fewer matmul calls per step)."""

from __future__ import annotations

import pytest
import torch
from conftest import backward
from torch import nn
from torch.profiler import ProfilerActivity, profile

import lightning_grng as lg
from lightning_grng.optim.batching import same_keys


class Repeated(nn.Module):
    """Three same-shaped hidden layers (one batch), a wider one and a head (alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.hidden = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.wide = nn.Linear(8, 12, bias=False)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.inp(x))
        for layer in self.hidden:
            x = torch.tanh(layer(x))
        return self.head(torch.tanh(self.wide(x)))


def _model() -> Repeated:
    torch.manual_seed(0)
    return Repeated().double()


def _train(model: nn.Module, opt: lg.KFAC, steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(16, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        backward(loss, opt)
        opt.step()


def _pair(cls: type[lg.KFAC], **options: object) -> tuple[list[nn.Module], list[lg.KFAC]]:
    models, opts = [], []
    for batched in (True, False):
        model = _model()
        opt = cls(model.parameters(), batch_blocks=batched, **options)
        lg.attach(model, opt)
        models.append(model)
        opts.append(opt)
    return models, opts


def test_same_keys_groups_equal_keys_and_leaves_the_rest_alone():
    batches, alone = same_keys(["a", None, "b", "a", "c", "a", "b"])
    assert batches == [[0, 3, 5], [2, 6]]
    assert alone == [1, 4]


@pytest.mark.parametrize(
    "cls, options",
    [
        (lg.KFAC, {}),
        # The warm route: its null-space refreshes are full and settled (a warm step there
        # put the two runs 0.7 apart in basis, 5e-6 in weights).
        (lg.KFAC, dict(refresh="warm")),
        (lg.KFAC, dict(curvature="kfac", momentum_on="direction", curvature_every=2)),
        (lg.RING, dict(rho=0.5)),
        (lg.RING, dict(rho=0.5, gr_form="preconditioned", weight_decay=0.1)),
        (lg.RING, dict(rho=0.3, gr_form="unsquared", momentum_on="direction")),
        (lg.RENG, dict(rho=0.3)),
    ],
)
def test_batched_blocks_equal_one_block_at_a_time(cls, options):
    (batched_model, plain_model), (batched, plain) = _pair(cls, lr=0.02, inverse_every=3, **options)
    _train(batched_model, batched, 8)  # refreshes at 0, 3, 6 (staggered per block)
    _train(plain_model, plain, 8)
    # The same arithmetic in batched matmuls: rounding apart (1e-16 per step, grown by the
    # refreshes' eigendecompositions); a difference in the math would be O(lr) = 1e-2.
    for a, b in zip(batched_model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    for key in plain._factors:
        got, want = batched.factors(key), plain.factors(key)
        for name in ("A", "G", "moment", "rotated_first_moment"):
            a, b = getattr(got, name), getattr(want, name)
            if b is None:
                assert a is None
                continue
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12 * b.abs().max().item())
        assert got.updates == want.updates and got.moment_count == want.moment_count


def _bmm_calls(opt: lg.KFAC, model: nn.Module, step: int) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _train(model, opt, 1, start=step)
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::bmm", "aten::mm"))


def test_same_shaped_blocks_share_their_matmuls():
    (batched_model, plain_model), (batched, plain) = _pair(lg.KFAC, inverse_every=50)
    _train(batched_model, batched, 2)
    _train(plain_model, plain, 2)
    # Statistics (2 matmuls per block) and rotations (4 per block): the three hidden layers
    # take one set instead of three, 12 fewer; forward and backward are the same in both.
    assert _bmm_calls(plain, plain_model, 2) - _bmm_calls(batched, batched_model, 2) == 12


def test_each_block_of_a_batch_restarts_alone():
    """A member whose factors went non-finite restarts from its batch statistics, as alone;
    the others of its batch keep their moving averages."""
    (batched_model, plain_model), (batched, plain) = _pair(lg.KFAC, inverse_every=50)
    for model, opt in ((batched_model, batched), (plain_model, plain)):
        _train(model, opt, 2)
        key = next(k for k, b in opt._blocks.items() if b.name == "hidden.1")
        opt.factors(key).A = torch.full_like(opt.factors(key).A, float("nan"))
        _train(model, opt, 1, start=2)
    for key in plain._factors:
        for name in ("A", "G"):
            got, want = getattr(batched.factors(key), name), getattr(plain.factors(key), name)
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_batch_blocks_is_refused_where_it_cannot_act():
    params = _model().parameters()
    with pytest.raises(TypeError, match="batch_blocks must be True or False"):
        lg.RING(params, batch_blocks="yes")
    with pytest.raises(ValueError, match="batch_blocks=True batches the eigen mode"):
        lg.RING(params, preconditioner="kfac", batch_blocks=True)
