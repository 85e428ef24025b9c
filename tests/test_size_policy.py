"""Issue 22, item 1: the factor-size policy ``max_factor``. A factor wider than the cap is kept
as its diagonal (eigenbasis the identity, like an embedding's A), on the input and the output
side; a factor under the cap is untouched, bit for bit. Float64 against dense references.
"""

from __future__ import annotations

import pytest
import torch
from conftest import dense_eigen_steps, dense_kfac_update
from torch import Tensor, nn

import lightning_grng as lg

F64 = torch.float64
EIGEN = dict(kl_clip=None, momentum=0.0, curvature_every=1, lr=0.05, damping=1e-2, beta2=0.9)
EIGEN |= dict(curvature="kfac", momentum_on="direction")  # the dense references use A, G


def _one_layer() -> nn.Sequential:
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(5, 3)).double()  # A: 6 wide (bias), G: 3 wide


def _batches(steps: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(11)
    return [
        (torch.randn(8, 5, generator=g, dtype=F64), torch.randint(0, 3, (8,), generator=g))
        for _ in range(steps)
    ]


def _weights(model: nn.Module) -> Tensor:
    lin = model[0]
    return torch.cat([lin.weight.detach(), lin.bias.detach()[:, None]], 1)


def _run(model: nn.Module, steps: int = 5, **kw):
    """Trains ``model``; returns the optimizer, the gradients and the weights after each step."""
    opt = lg.KFAC(model.parameters(), **kw)
    lg.attach(model, opt, report=False)
    grads, weights = [], [_weights(model)]
    for x, y in _batches(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        lin = model[0]
        grads.append(torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1).clone())
        opt.step()
        weights.append(_weights(model))
    return opt, grads, weights


@pytest.mark.parametrize("cap", [6, 100])
@pytest.mark.parametrize("refresh", ["eigh", "warm"])
def test_a_factor_under_the_cap_is_unchanged_bit_for_bit(cap, refresh):
    """A cap at (not below) the widest factor, or far above it, changes nothing."""
    _, _, plain = _run(_one_layer(), refresh=refresh, inverse_every=2, **EIGEN)
    opt, _, capped = _run(_one_layer(), refresh=refresh, inverse_every=2, max_factor=cap, **EIGEN)
    assert opt.factors("0").A.dim() == 3 and opt.factors("0").G.dim() == 3
    for a, b in zip(capped, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(("cap", "diagonal"), [(5, "A"), (2, "AG")])
def test_a_factor_over_the_cap_is_diagonal_and_the_step_is_the_dense_one(cap, diagonal):
    """Cap 5: A (6 wide) is diagonal; cap 2: G (3 wide) too. Basis fixed after step 0: every
    step is the dense eigen step with Q = eigenbasis of the diagonal factor (the identity)."""
    kw = dict(EIGEN, inverse_every=1000)
    opt, grads, weights = _run(_one_layer(), max_factor=cap, **kw)
    f = opt.factors("0")
    assert (f.A.dim(), f.G.dim()) == (2 if "A" in diagonal else 3, 2 if "G" in diagonal else 3)
    assert f.evec_A is None and (f.evec_G is None) == ("G" in diagonal)
    # The stored diagonal is the diagonal of the factor the uncapped run holds (same EMA).
    plain, _, _ = _run(_one_layer(), **kw)
    torch.testing.assert_close(f.A, torch.diagonal(plain.factors("0").A, dim1=-2, dim2=-1))
    # The basis is the step-0 one: recompute the step-0 G from a one-step run.
    first, _, _ = _run(_one_layer(), steps=1, **kw)
    G0 = first.factors("0").G[0]
    QG = torch.eye(3, dtype=F64) if "G" in diagonal else torch.linalg.eigh(G0)[1]
    dense = dense_eigen_steps(torch.eye(6, dtype=F64), QG, grads, 0.05, 0.9, 1e-2)
    for t, step in enumerate(dense):
        torch.testing.assert_close(weights[t + 1] - weights[t], step, rtol=1e-9, atol=1e-12)


def test_the_kfac_mode_eigh_route_takes_the_diagonal_factors():
    """preconditioner='kfac', inverse='eigh', absolute damping: the first step is
    ``−lr (diag(A) ⊗ diag(G) + γI)⁻¹ g`` with the dense Kronecker product."""
    gamma, lr = 0.3, 0.1
    kw = dict(
        preconditioner="kfac", inverse="eigh", damping_mode="absolute", damping=gamma,
        kl_clip=None, momentum=0.0, lr=lr, curvature_every=1, max_factor=2,
    )  # fmt: skip
    opt, grads, weights = _run(_one_layer(), steps=1, **kw)
    f = opt.factors("0")
    expected = -lr * dense_kfac_update(torch.diag(f.A[0]), torch.diag(f.G[0]), grads[0], gamma)
    torch.testing.assert_close(weights[1] - weights[0], expected, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("curvature", ["kfac", "gradient"])
def test_conv_and_gradient_statistics_follow_the_cap(curvature):
    """A conv's 37-wide patch factor and a 129-wide input factor are diagonal, with K-FAC's
    statistics and with the gradient source's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    opt = lg.RING(model.parameters(), max_factor=32, curvature=curvature, curvature_every=1)
    lg.attach(model, opt, report=False)
    for _ in range(2):
        opt.zero_grad()
        x, y = torch.randn(6, 4, 6, 6), torch.randint(0, 3, (6,))
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    conv, head = opt.factors("0"), opt.factors("2")
    assert conv.A.shape == (1, 37) and conv.G.shape == (1, 8, 8)
    assert head.A.shape == (1, 129) and head.G.shape == (1, 3, 3)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_capped_checkpoint_round_trips():
    kw = dict(EIGEN, inverse_every=2, max_factor=2)
    opt, _, _ = _run(_one_layer(), steps=3, **kw)
    saved = opt.state_dict()
    model = _one_layer()
    fresh = lg.KFAC(model.parameters(), **kw)
    fresh.load_state_dict(saved)
    lg.attach(model, fresh, report=False)
    assert fresh.factors("0").G.shape == (1, 3)
    other = _one_layer()
    uncapped = lg.KFAC(other.parameters(), **EIGEN)
    lg.attach(other, uncapped, report=False)
    with pytest.raises(ValueError, match="shape"):
        uncapped.load_state_dict(saved)


@pytest.mark.parametrize("option", [dict(max_factor=64), dict(stagger_first=64)])
def test_the_newton_route_refuses_the_basis_options(option):
    with pytest.raises(ValueError, match="Newton–Schulz route does not keep"):
        lg.RING(nn.Linear(2, 2).parameters(), preconditioner="kfac", **option)
    with pytest.raises(ValueError, match="an integer >= 1"):
        lg.KFAC(nn.Linear(2, 2).parameters(), **{k: 0 for k in option})


def test_eigen_mode_keeps_factors_over_2048_diagonal_by_default():
    """An LM head's vocabulary side (here 2049 wide) is diagonal unless max_factor says
    otherwise; the kfac mode has no cap."""
    assert lg.RING(nn.Linear(2, 2).parameters()).max_factor == 2048
    assert lg.RING(nn.Linear(2, 2).parameters(), preconditioner="kfac").max_factor is None
    head = nn.Linear(4, 2049, bias=False)
    opt = lg.KFAC(head.parameters(), curvature_every=1, inverse_every=1)
    lg.attach(head, opt, report=False)
    opt.zero_grad()
    head(torch.randn(3, 4)).pow(2).sum().backward()
    opt.step()
    factors = opt.factors(next(iter(opt.blocks)))
    assert factors.G.shape == (1, 2049) and factors.evec_G is None
    assert factors.A.shape == (1, 4, 4)
