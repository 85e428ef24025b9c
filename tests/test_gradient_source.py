"""curvature='gradient': Shampoo/SOAP statistics in the eigen route, against dense math."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lightning_grng as lg
from tests.conftest import classification_batch, mlp

F64 = torch.float64
ONE_STEP = dict(
    lr=1.0, momentum=0.0, kl_clip=None, curvature_every=1, inverse_every=1, curvature="gradient"
)


def _grad_matrices(model: nn.Sequential, x, y) -> list[torch.Tensor]:
    """Each Linear's gradient as ``[W | b]`` ``(n_out, n_in + 1)``, computed without hooks."""
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return [
        torch.cat([m.weight.grad, m.bias.grad[:, None]], 1).clone()
        for m in model
        if isinstance(m, nn.Linear)
    ]


def _step(opt, model, x, y):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _eigen_step(V: torch.Tensor, lam: float, rho: float = 0.0) -> torch.Tensor:
    """The eigen step of one gradient with factors V Vᵀ, Vᵀ V (first step: D = R∘R)."""
    _, Q_G = torch.linalg.eigh(V @ V.T)
    _, Q_A = torch.linalg.eigh(V.T @ V)
    R = Q_G.T @ V @ Q_A
    D = R * R
    return Q_G @ (R / torch.sqrt(D + lam * D.mean() + rho * R * R)) @ Q_A.T


@pytest.mark.parametrize(("cls", "rho"), [(lg.KFAC, None), (lg.RING, 0.5)])
def test_first_step_is_the_eigen_step_in_the_gradient_factors_basis(cls, rho):
    model = mlp()
    x, y = classification_batch()
    refs = _grad_matrices(model, x, y)
    before = [torch.cat([m.weight, m.bias[:, None]], 1).detach().clone() for m in model[::2]]
    kw = {} if rho is None else {"rho": rho}
    opt = cls(model.parameters(), damping=1e-3, **ONE_STEP, **kw)
    lg.attach(model, opt, report=False)
    _step(opt, model, x, y)
    after = [torch.cat([m.weight, m.bias[:, None]], 1).detach() for m in model[::2]]
    for V, w0, w1 in zip(refs, before, after, strict=True):
        expected = _eigen_step(V, 1e-3, rho or 0.0)
        torch.testing.assert_close(w0 - w1, expected, rtol=1e-9, atol=1e-12)


def test_factors_are_moving_averages_of_the_gradient_products():
    model = mlp()
    opt = lg.KFAC(model.parameters(), **{**ONE_STEP, "lr": 0.01}, ema_decay=0.8)
    lg.attach(model, opt, report=False)
    g = torch.Generator().manual_seed(5)
    expected_A = expected_G = None
    for _ in range(3):
        x = torch.randn(8, 5, generator=g, dtype=F64)
        y = torch.randint(0, 3, (8,), generator=g)
        V = _grad_matrices(model, x, y)[0]
        A, G = V.T @ V, V @ V.T
        if expected_A is None:
            expected_A, expected_G = A, G
        else:
            expected_A, expected_G = 0.8 * expected_A + 0.2 * A, 0.8 * expected_G + 0.2 * G
        _step(opt, model, x, y)
    key = next(k for k, b in opt.blocks.items() if b.name == "0")
    torch.testing.assert_close(opt.factors(key).A[0], expected_A, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(opt.factors(key).G[0], expected_G, rtol=1e-12, atol=1e-14)


def test_no_hooks_and_any_weight_qualifies():
    """A layer called functionally (hooks never see it) still gets its factors."""

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            return nn.functional.linear(x, self.fc.weight, self.fc.bias)

    model = Functional().double()
    opt = lg.RING(model.parameters(), curvature="gradient", curvature_every=1)
    lg.attach(model, opt, report=False)
    x, y = classification_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "hooks never fired"
        for _ in range(3):
            _step(opt, model, x, y)
    assert opt.factors("0").ready and not model._forward_hooks


def test_embeddings_keep_a_diagonal_vocabulary_side():
    model = nn.Sequential(nn.Embedding(7, 3), nn.Flatten(), nn.Linear(6, 2)).double()
    opt = lg.KFAC(model.parameters(), curvature="gradient", curvature_every=1)
    lg.attach(model, opt, report=False)
    x, y = torch.randint(0, 7, (4, 2)), torch.randint(0, 2, (4,))
    _step(opt, model, x, y)
    emb = next(k for k, b in opt.blocks.items() if b.name == "0")
    V = model[0].weight.grad.T  # (n_out = 3, n_in = vocab 7)
    torch.testing.assert_close(opt.factors(emb).A[0], (V * V).sum(0))
    assert opt.factors(emb).G.shape == (1, 3, 3)


def test_gradient_source_needs_the_eigen_mode():
    with pytest.raises(ValueError, match=r"curvature='gradient' .* preconditioner='eigen'"):
        lg.RING(nn.Linear(2, 2).parameters(), curvature="gradient", preconditioner="kfac")
    with pytest.raises(ValueError, match=r"invalid curvature='shampoo'"):
        lg.KFAC(nn.Linear(2, 2).parameters(), curvature="shampoo")


def test_momentum_on_gradient_is_adam_in_the_eigenbasis():
    """momentum_on='gradient' (SOAP's order): the bias-corrected first moment of the gradient,
    rotated and divided by sqrt(D + γ); no momentum on the direction afterwards."""
    model = mlp()
    beta1, beta2, lam = 0.9, 0.95, 1e-3
    opt = lg.KFAC(
        model.parameters(),
        **{**ONE_STEP, "inverse_every": 100, "momentum": beta1},
        beta2=beta2,
        damping=lam,
        momentum_on="gradient",
    )
    lg.attach(model, opt, report=False)
    g = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(8, 5, generator=g, dtype=F64), torch.randint(0, 3, (8,), generator=g))
        for _ in range(2)
    ]
    grads = []
    for x, y in batches:
        grads.append(_grad_matrices(model, x, y)[0])
        before = torch.cat([model[0].weight, model[0].bias[:, None]], 1).detach().clone()
        _step(opt, model, x, y)
    after = torch.cat([model[0].weight, model[0].bias[:, None]], 1).detach()
    V1, V2 = grads
    _, Q_G = torch.linalg.eigh(V1 @ V1.T)  # the basis of the first step's factors
    _, Q_A = torch.linalg.eigh(V1.T @ V1)
    R1, R2 = (Q_G.T @ V @ Q_A for V in (V1, V2))
    m = (beta1 * (1 - beta1) * V1 + (1 - beta1) * V2) / (1 - beta1**2)
    D = (beta2 * (1 - beta2) * R1**2 + (1 - beta2) * R2**2) / (1 - beta2**2)
    expected = Q_G @ ((Q_G.T @ m @ Q_A) / torch.sqrt(D + lam * D.mean())) @ Q_A.T
    torch.testing.assert_close(before - after, expected, rtol=1e-9, atol=1e-12)
    assert "momentum_buffer" not in opt.state[model[0].weight]


def test_momentum_on_gradient_needs_the_eigen_mode():
    with pytest.raises(ValueError, match=r"momentum_on='gradient' .* preconditioner='eigen'"):
        lg.KFAC(nn.Linear(2, 2).parameters(), preconditioner="kfac", momentum_on="gradient")
