"""curvature='gradient': Shampoo/SOAP statistics in the eigen route, against dense math."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lightning_grng as lg
from lightning_grng.curvature.inverse import settle_null_space
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


def _basis(M: torch.Tensor, rank: int) -> torch.Tensor:
    """The optimizer's eigenbasis of a factor of rank ≤ ``rank``: eigh, null space settled."""
    evals, evecs = torch.linalg.eigh(M)
    return settle_null_space(evals, evecs, rank)


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
    # The basis of the first step's factors: V1 is 4 × 6, so Vᵀ V has a null space, whose
    # basis the optimizer settles (settle_null_space; tested below).
    Q_G, Q_A = _basis(V1 @ V1.T, rank=4), _basis(V1.T @ V1, rank=4)
    R1, R2 = (Q_G.T @ V @ Q_A for V in (V1, V2))
    m = (beta1 * (1 - beta1) * V1 + (1 - beta1) * V2) / (1 - beta1**2)
    D = (beta2 * (1 - beta2) * R1**2 + (1 - beta2) * R2**2) / (1 - beta2**2)
    expected = Q_G @ ((Q_G.T @ m @ Q_A) / torch.sqrt(D + lam * D.mean())) @ Q_A.T
    torch.testing.assert_close(before - after, expected, rtol=1e-9, atol=1e-12)
    assert "momentum_buffer" not in opt.state[model[0].weight]


def test_momentum_on_gradient_needs_the_eigen_mode():
    with pytest.raises(ValueError, match=r"momentum_on='gradient' .* preconditioner='eigen'"):
        lg.KFAC(nn.Linear(2, 2).parameters(), preconditioner="kfac", momentum_on="gradient")


@pytest.mark.parametrize("cls", [lg.KFAC, lg.RING, lg.RENG])
def test_eigen_mode_defaults_to_gradient_statistics_and_adam_order(cls):
    """The eigen mode's defaults (docs/defaults.md); the kfac mode and a Monte-Carlo Fisher
    keep K-FAC statistics; gradient statistics with fisher='mc' are refused."""
    params = nn.Linear(2, 2).parameters
    opt = cls(params())
    assert (opt.curvature.value, opt.momentum_on.value) == ("gradient", "gradient")
    opt = cls(params(), preconditioner="kfac")
    assert (opt.curvature.value, opt.momentum_on.value) == ("kfac", "direction")
    assert cls(params(), fisher="mc").curvature.value == "kfac"
    with pytest.raises(ValueError, match=r"fisher='mc' .* curvature='kfac'"):
        cls(params(), curvature="gradient", fisher="mc")


def _settled(M: torch.Tensor, rank: int) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(M)
    return settle_null_space(evals, evecs, rank)


def test_settled_null_space_is_an_orthonormal_completion_fixed_by_the_null_space_alone():
    """Range columns unchanged, the rest an orthonormal basis of the null space; the same
    basis (up to signs) for another scale, for a rounding-level perturbation, and whatever
    basis of the null space eigh returned."""
    g = torch.Generator().manual_seed(0)
    V = torch.randn(3, 7, generator=g, dtype=F64)  # rank 3 in a 7-wide factor
    M = V.T @ V
    evals, evecs = torch.linalg.eigh(M)
    Q = settle_null_space(evals, evecs, rank_bound=3)
    torch.testing.assert_close(Q.T @ Q, torch.eye(7, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(Q[:, 4:], evecs[:, 4:])  # the range: the 3 largest
    torch.testing.assert_close(M @ Q[:, :4], torch.zeros(7, 4, dtype=F64), atol=1e-12, rtol=0)

    def same_up_to_signs(P):
        overlap = (P[:, :4].T @ Q[:, :4]).abs()
        torch.testing.assert_close(overlap, torch.eye(4, dtype=F64), atol=1e-9, rtol=0)

    same_up_to_signs(_settled(1e6 * M, rank=3))
    same_up_to_signs(_settled(M + 1e-15 * torch.randn(7, 7, generator=g, dtype=F64), rank=3))
    rotation = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=F64)).Q
    rotated = evecs.clone()
    rotated[:, :4] = evecs[:, :4] @ rotation  # another valid eigh of M
    same_up_to_signs(settle_null_space(evals, rotated, rank_bound=3))
    # Without the bound, eigenvalues at rounding level count as null too.
    same_up_to_signs(settle_null_space(evals, evecs, rank_bound=7))


@pytest.mark.parametrize("refresh", ["eigh", "warm"])
def test_default_step_is_invariant_to_the_loss_scale_from_a_rank_deficient_start(refresh):
    """Loss × 1000 at the defaults: D scales by 10⁶, the rotated moments by 10³, and the
    first refresh's null-space basis is the same, so every step is unchanged (without the
    settled basis the runs drifted apart by 2e-2). The warm route too: while a factor may be
    rank-deficient its refreshes are full and settled (a case where a warm step there moves
    the basis with rounding is in tests/test_batching.py)."""
    g = torch.Generator().manual_seed(11)
    batches = [(torch.randn(8, 5, generator=g, dtype=F64), torch.randint(0, 3, (8,), generator=g))
               for _ in range(6)]  # fmt: skip
    weights = []
    for scale in (1.0, 1000.0):
        model = mlp()
        opt = lg.RING(model.parameters(), lr=0.05, kl_clip=None, inverse_every=2, refresh=refresh)
        lg.attach(model, opt, report=False)
        for x, y in batches:
            opt.zero_grad()
            (scale * nn.functional.cross_entropy(model(x), y)).backward()
            opt.step()
        weights.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*weights, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_reng_gradient_statistics_are_those_of_the_gradient_it_preconditions():
    """With gradient statistics RENG's factors are built from g + ρHg (SOAP's statistics of
    the regularized loss): on the strategy's single-backward path the plain g is never
    materialized apart from it."""
    model = mlp()
    x, y = classification_batch()
    rho = 2.0
    params = list(model.parameters())
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    hvps = torch.autograd.grad(0.5 * sum(g.pow(2).sum() for g in grads), params)
    regularized = [(g + rho * h).detach() for g, h in zip(grads, hvps, strict=True)]
    V = torch.cat([regularized[0], regularized[1][:, None]], 1)
    opt = lg.RENG(model.parameters(), rho=rho, **{**ONE_STEP, "lr": 0.0})
    lg.attach(model, opt, report=False)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward(create_graph=True)
    opt.step()
    key = next(k for k, b in opt.blocks.items() if b.name == "0")
    torch.testing.assert_close(opt.factors(key).G[0], V @ V.T, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(opt.factors(key).A[0], V.T @ V, rtol=1e-10, atol=1e-13)


def test_rotated_first_moment_is_the_gradients_average_in_the_current_basis():
    """The first moment lives in the eigenbasis and is mapped exactly at every refresh: after
    steps that each refresh the basis, it equals Q_Gᵀ m Q_A for m the plain EMA of the
    gradients and Q the current bases (to rounding)."""
    model = mlp()
    beta1 = 0.9
    opt = lg.RING(model.parameters(), **{**ONE_STEP, "lr": 0.01, "momentum": beta1})
    lg.attach(model, opt, report=False)
    g = torch.Generator().manual_seed(6)
    m = None
    for _ in range(5):
        x = torch.randn(8, 5, generator=g, dtype=F64)
        y = torch.randint(0, 3, (8,), generator=g)
        V = _grad_matrices(model, x, y)[0]
        m = (1 - beta1) * V if m is None else beta1 * m + (1 - beta1) * V
        _step(opt, model, x, y)
    factors = opt.factors(next(k for k, b in opt.blocks.items() if b.name == "0"))
    expected = factors.evec_G[0].T @ m @ factors.evec_A[0]
    torch.testing.assert_close(factors.rotated_first_moment[0], expected, rtol=1e-9, atol=1e-13)


def test_a_checkpoint_with_the_first_moment_in_parameter_coordinates_is_converted():
    """Checkpoints written before the first moment moved into the eigenbasis hold it as
    ``first_moment`` (parameter coordinates): loading rotates it into the saved basis."""
    model = mlp()
    opt = lg.RING(model.parameters(), **{**ONE_STEP, "lr": 0.01, "momentum": 0.9})
    lg.attach(model, opt, report=False)
    x, y = classification_batch()
    for _ in range(2):
        _step(opt, model, x, y)
    saved = opt.state_dict()
    key = next(k for k, b in opt.blocks.items() if b.name == "0")
    block = saved["grng"]["blocks"][key]
    f = opt.factors(key)
    legacy = f.evec_G @ block.pop("rotated_first_moment") @ f.evec_A.transpose(-1, -2)
    block["first_moment"] = legacy
    other = mlp()
    fresh = lg.RING(other.parameters(), **{**ONE_STEP, "lr": 0.01, "momentum": 0.9})
    fresh.load_state_dict(saved)
    lg.attach(other, fresh, report=False)
    torch.testing.assert_close(
        fresh.factors(key).rotated_first_moment, f.rotated_first_moment, rtol=1e-12, atol=1e-14
    )
