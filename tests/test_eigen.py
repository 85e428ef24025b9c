"""Issue 12: the eigenvalue-corrected preconditioner mode (``preconditioner="eigen"``).

Float64 against dense math: the rotated-basis step against ``Q (D + γ + ρ r²)^(-p) Qᵀ`` built
with explicit Kronecker products, GR in this mode (RING's diagonal, RENG's regularized
gradient), ρ = 0 reducing to the plain eigen step, the second moment carried across basis
refreshes, loss-scale invariance, checkpoints and the KL-clip binding count.
"""

from __future__ import annotations

import pytest
import torch
from conftest import backward, classification_batch, dense_eigen_steps, mlp, unvec, vec
from torch import Tensor, nn

import lightning_grng as lg
from lightning_grng.curvature.kronecker import KroneckerFactors, carry_moment

# The eigen mode over K-FAC statistics, momentum on the direction (the gradient source and
# momentum_on="gradient" have their own tests: tests/test_gradient_source.py).
EIGEN = dict(
    preconditioner="eigen",
    kl_clip=None,
    momentum=0.0,
    curvature_every=1,
    curvature="kfac",
    momentum_on="direction",
)


def _one_layer(seed: int = 4) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 3)).double()


def _batches(steps: int, n: int = 8, seed: int = 11) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g),
        )
        for _ in range(steps)
    ]


def _train(opt_factory, model: nn.Module, batches, scale: float = 1.0):
    opt = opt_factory(model.parameters())
    lg.attach(model, opt)
    for x, y in batches:
        opt.zero_grad()
        loss = scale * nn.functional.cross_entropy(model(x), y)
        backward(loss, opt)
        opt.step()
    return opt


def _dense_gr(d: Tensor, r: Tensor, rho: float, form: str) -> Tensor:
    """RING's GR term written from its definition (docs/algorithms.md §8.3) on the flat
    rotated gradient ``r`` of one block: ``ρ·s·S``."""
    if form == "isotropic":  # trace of ρ r rᵀ spread evenly
        return torch.full_like(r, rho * float(r @ r) / r.numel())
    if form == "unsquared":  # ρ r∘r / ‖r‖ times the block's running scale √(n·mean d)
        return rho * r * r * (r.numel() * d.mean()).sqrt() / r.norm()
    if form == "preconditioned":  # Rayleigh quotient of diag(d)^-½ along r, × √mean d
        weighted = (r * r / d.clamp_min(torch.finfo(d.dtype).tiny).sqrt()).sum()  # 0 where r = 0
        return rho * r * r * float(weighted) / float(r @ r) * d.mean().sqrt()
    return rho * r * r


def _dense_eigen_steps(A, G, grads, lr, beta2, damping, power, rho=0.0, form="diagonal"):
    """:func:`conftest.dense_eigen_steps` in the eigenbases of ``A`` and ``G``, with the GR
    curvature :func:`_dense_gr`."""
    QA, QG = torch.linalg.eigh(A)[1], torch.linalg.eigh(G)[1]

    def gr(d: Tensor, r: Tensor) -> Tensor:
        return _dense_gr(d, r, rho, form)

    return dense_eigen_steps(QA, QG, grads, lr, beta2, damping, power, gr)


def _weights(model: nn.Module) -> Tensor:
    lin = model[0]
    return torch.cat([lin.weight.detach(), lin.bias.detach()[:, None]], 1)


@pytest.mark.parametrize(
    "name,power,form",
    [
        ("KFAC", 0.5, "diagonal"),
        ("KFAC", 1.0, "diagonal"),
        ("RING", 0.5, "diagonal"),
        ("RING", 1.0, "diagonal"),
        ("RING", 0.5, "isotropic"),
        ("RING", 0.5, "unsquared"),
        ("RING", 0.5, "preconditioned"),
    ],
)
def test_eigen_step_matches_dense_kronecker_reference(name, power, form):
    """Basis fixed after the first refresh (inverse_every large): every step equals the dense
    ``Q (D + γ + GR)^-p Qᵀ g`` with Q = Q_A ⊗ Q_G from the step-0 factors, for each of RING's
    GR placements (``gr_form``)."""
    rho = 0.3 if name == "RING" else 0.0
    kw = dict(EIGEN, lr=0.05, damping=1e-2, beta2=0.9, power=power, inverse_every=1000)
    if name == "RING":
        kw |= dict(rho=rho, gr_form=form)
    model = _one_layer()
    record: list = []
    batches = _batches(5)
    before = [_weights(model)]
    opt = getattr(lg, name)(model.parameters(), **kw)
    lg.attach(model, opt)
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        lin = model[0]
        record.append(torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1).clone())
        opt.step()
        if len(record) == 1:
            f = opt.factors("0")
            A0, G0 = f.A[0].clone(), f.G[0].clone()
        before.append(_weights(model))
    dense = _dense_eigen_steps(A0, G0, record, 0.05, 0.9, 1e-2, power, rho, form)
    for t, step in enumerate(dense):
        torch.testing.assert_close(before[t + 1] - before[t], step, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["RING", "RENG"])
def test_rho_zero_is_the_plain_eigen_step(name):
    kw = dict(EIGEN, lr=0.05, inverse_every=2, momentum=0.9)
    batches = _batches(6)
    plain, regularized = _one_layer(), _one_layer()
    _train(lambda p: lg.KFAC(p, **kw), plain, batches)
    _train(lambda p: getattr(lg, name)(p, rho=0.0, **kw), regularized, batches)
    torch.testing.assert_close(_weights(regularized), _weights(plain), rtol=0, atol=0)


def test_ring_gr_term_changes_the_step():
    """The control for the test above: ρ > 0 is not a no-op in this mode."""
    kw = dict(EIGEN, lr=0.05, inverse_every=2)
    batches = _batches(3)
    a, b = _one_layer(), _one_layer()
    _train(lambda p: lg.RING(p, rho=0.0, **kw), a, batches)
    _train(lambda p: lg.RING(p, rho=1.0, **kw), b, batches)
    assert (_weights(a) - _weights(b)).abs().max() > 1e-6


def test_reng_feeds_the_regularized_gradient_to_the_eigen_stage():
    """RENG-eigen's first step is the eigen stage applied to ``g + ρHg`` (dense Hessian)."""
    rho, lr = 0.2, 0.05
    model = _one_layer()
    x, y = _batches(1)[0]
    params = list(model.parameters())
    loss = nn.functional.cross_entropy(model(x), y)
    g = torch.autograd.grad(loss, params, create_graph=True)
    flat = torch.cat([t.reshape(-1) for t in g])
    hg = torch.autograd.grad(0.5 * flat.pow(2).sum(), params)
    reg = [(gi + rho * h).detach() for gi, h in zip(g, hg, strict=True)]
    V = torch.cat([reg[0], reg[1][:, None]], 1)
    start = _weights(model)
    opt = _train(lambda p: lg.RENG(p, rho=rho, lr=lr, damping=1e-2, **EIGEN), model, [(x, y)])
    f = opt.factors("0")
    expected = _dense_eigen_steps(f.A[0], f.G[0], [V], lr, 0.95, 1e-2, 0.5)[0]
    torch.testing.assert_close(_weights(model) - start, expected, rtol=1e-9, atol=1e-12)


def test_refresh_with_the_same_basis_keeps_the_step():
    """Refreshing every step from unchanged factors (statistics taken once) gives exactly the
    steps of never refreshing: the carried moment is the moment."""
    batches = _batches(6)
    kw = dict(EIGEN, lr=0.05, curvature_every=1000)
    once, every = _one_layer(), _one_layer()
    _train(lambda p: lg.KFAC(p, inverse_every=1000, **kw), once, batches)
    _train(lambda p: lg.KFAC(p, inverse_every=1, **kw), every, batches)
    torch.testing.assert_close(_weights(every), _weights(once), rtol=1e-10, atol=1e-13)


def _orthogonal(n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]


def test_carried_moment_is_the_diagonal_of_the_operator_in_the_new_basis():
    """``diag(Q_newᵀ Q_old diag(m) Q_oldᵀ Q_new)`` with the explicit Kronecker basis, and the
    exact permutation (with sign flips) when the new basis reorders the old one."""
    n_out, n_in = 3, 4
    g = torch.Generator().manual_seed(5)
    m = torch.rand(1, n_out, n_in, generator=g, dtype=torch.float64)
    old_A, new_A = _orthogonal(n_in, 1), _orthogonal(n_in, 2)
    old_G, new_G = _orthogonal(n_out, 3), _orthogonal(n_out, 4)
    carried = carry_moment(m, (old_A[None], new_A[None]), (old_G[None], new_G[None]))[0]
    Q_old, Q_new = torch.kron(old_A, old_G), torch.kron(new_A, new_G)
    operator = Q_old @ torch.diag(vec(m[0])) @ Q_old.T
    expected = unvec(torch.diagonal(Q_new.T @ operator @ Q_new), n_out, n_in)
    torch.testing.assert_close(carried, expected, rtol=1e-12, atol=1e-14)

    perm_A, perm_G = torch.tensor([2, 0, 3, 1]), torch.tensor([1, 2, 0])
    flips = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    moved = carry_moment(
        m, (old_A[None], (old_A[:, perm_A] * flips)[None]), (old_G[None], old_G[:, perm_G][None])
    )[0]
    torch.testing.assert_close(moved, m[0][perm_G][:, perm_A], rtol=1e-12, atol=1e-14)


def test_basis_change_moves_the_step_by_at_most_the_dropped_off_diagonal():
    """Continuity: after a refresh to a nearby basis, the step differs from the step in the old
    basis by a term of the order of the rotation (the documented approximation)."""
    torch.manual_seed(0)
    n_out, n_in = 3, 4
    f = KroneckerFactors(torch.float64)
    A = torch.randn(n_in, n_in, dtype=torch.float64)
    G = torch.randn(n_out, n_out, dtype=torch.float64)
    f.update((A @ A.T + torch.eye(n_in))[None], (G @ G.T + torch.eye(n_out))[None], 0.9)
    f.refresh(lg.curvature.kronecker.InverseMethod.EIGH, 0.0, 0)
    V = torch.randn(1, n_out, n_in, dtype=torch.float64)
    for _ in range(3):
        R = f.to_eigenbasis(torch.randn_like(V))
        f.eigen_moments(R, 0.9, None)[0].lerp_(R * R, 0.1)  # the moment's EMA

    def step(factors: KroneckerFactors) -> Tensor:
        R = factors.to_eigenbasis(V)
        return factors.from_eigenbasis(R / factors.moment.sqrt(), V.dtype)

    before = step(f)
    sizes = []
    for eps in (1e-2, 1e-3):
        g = KroneckerFactors(torch.float64)
        g.A, g.G, g.moment, g.moment_count = f.A, f.G, f.moment, f.moment_count
        g.eval_A, g.evec_A, g.eval_G, g.evec_G = f.eval_A, f.evec_A, f.eval_G, f.evec_G
        skew = torch.randn(n_in, n_in, dtype=torch.float64)
        rotation = torch.linalg.matrix_exp(eps * (skew - skew.T))
        g.install_eigh((f.eval_A, f.evec_A @ rotation), (f.eval_G, f.evec_G), torch.tensor(True))
        sizes.append(float((step(g) - before).norm() / before.norm()))
    assert sizes[0] < 0.5
    assert sizes[1] < sizes[0] / 5  # shrinks with the rotation: continuous


@pytest.mark.parametrize("form", ["diagonal", "isotropic", "unsquared", "preconditioned"])
def test_eigen_step_is_invariant_to_the_loss_scale(form):
    """Power ½ with relative damping: loss × c leaves every step unchanged at the same lr
    (D scales by c², the rotated gradient by c), for every GR placement: each is made
    dimensionless (ρ needs no retuning when the loss is rescaled)."""
    batches = _batches(6)
    kw = dict(EIGEN, lr=0.05, momentum=0.9, inverse_every=2, gr_form=form)
    a, b = _one_layer(), _one_layer()
    _train(lambda p: lg.RING(p, rho=0.5, **kw), a, batches)
    _train(lambda p: lg.RING(p, rho=0.5, **kw), b, batches, scale=1000.0)
    torch.testing.assert_close(_weights(b), _weights(a), rtol=1e-9, atol=1e-12)


def test_unsquared_reng_is_invariant_to_the_loss_scale_and_squared_is_not():
    """RENG's unsquared penalty ρ‖∇ℓ‖ adds ρHg/‖g‖, which scales like g under loss × c, so the
    eigen step is unchanged; the squared penalty's ρHg scales by c², so ρ has units."""
    batches = _batches(4)
    kw = dict(EIGEN, lr=0.05, inverse_every=2, rho=0.3)
    finals = {}
    for norm in ("squared", "unsquared"):
        a, b = _one_layer(), _one_layer()
        _train(lambda p, norm=norm: lg.RENG(p, gr_norm=norm, **kw), a, batches)
        _train(lambda p, norm=norm: lg.RENG(p, gr_norm=norm, **kw), b, batches, scale=1000.0)
        finals[norm] = (_weights(a), _weights(b))
    torch.testing.assert_close(*finals["unsquared"], rtol=1e-9, atol=1e-12)
    assert not torch.allclose(*finals["squared"], rtol=1e-3, atol=1e-6)


def test_checkpoint_round_trip_keeps_the_moment():
    batches = _batches(8)
    kw = dict(EIGEN, lr=0.05, momentum=0.9, inverse_every=3)
    straight = _one_layer()
    _train(lambda p: lg.RING(p, **kw), straight, batches)

    first = _one_layer()
    opt = _train(lambda p: lg.RING(p, **kw), first, batches[:4])
    saved = opt.state_dict()
    assert saved["grng"]["blocks"]["0"]["moment"].shape == (1, 3, 6)
    resumed = _one_layer()
    resumed.load_state_dict(first.state_dict())
    opt2 = lg.RING(resumed.parameters(), **kw)
    opt2.load_state_dict(saved)
    lg.attach(resumed, opt2)
    for x, y in batches[4:]:
        opt2.zero_grad()
        nn.functional.cross_entropy(resumed(x), y).backward()
        opt2.step()
    torch.testing.assert_close(_weights(resumed), _weights(straight), rtol=1e-12, atol=1e-14)


def test_mismatched_moment_in_a_checkpoint_is_refused():
    batches = _batches(2)
    opt = _train(lambda p: lg.KFAC(p, **EIGEN), _one_layer(), batches)
    saved = opt.state_dict()
    saved["grng"]["blocks"]["0"]["moment"] = torch.zeros(1, 4, 6, dtype=torch.float64)
    model = _one_layer()
    fresh = lg.KFAC(model.parameters(), **EIGEN)
    lg.attach(model, fresh)
    with pytest.raises(ValueError, match="moment"):
        fresh.load_state_dict(saved)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(preconditioner="shampoo"), "preconditioner"),
        (dict(preconditioner="eigen", beta2=1.0), "beta2"),
        (dict(preconditioner="eigen", beta2=-0.1), "beta2"),
        (dict(preconditioner="eigen", power=0.0), "power"),
        (dict(preconditioner="eigen", power=1.5), "power"),
        (dict(preconditioner="eigen", inverse="newton"), "inverse='eigh'"),
    ],
)
@pytest.mark.parametrize("cls", [lg.KFAC, lg.RING, lg.RENG])
def test_invalid_eigen_settings_are_refused(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(mlp().parameters(), **kwargs)


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (lg.RING, dict(gr_form="sharp"), "gr_form"),
        (lg.RING, dict(gr_form="isotropic", preconditioner="kfac"), "kfac mode's placement"),
        (lg.RENG, dict(gr_norm="cubed"), "gr_norm"),
    ],
)
def test_invalid_gr_placements_are_refused(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(mlp().parameters(), **kwargs)


def test_mode_defaults():
    params = list(mlp().parameters())
    kfac, eigen = lg.RING(params, preconditioner="kfac"), lg.RING(params)
    assert eigen.preconditioner.value == "eigen"  # the default mode
    assert kfac.inverse.value == "newton" and eigen.inverse.value == "eigh"
    assert kfac.defaults["damping"] == 100.0 and eigen.defaults["damping"] < 1.0
    assert kfac.fallback_lr == 0.1 and eigen.fallback_lr == 1.0
    assert not kfac.momentum_ema and eigen.momentum_ema
    explicit = lg.KFAC(params, preconditioner="eigen", damping=0.5, fallback_lr=0.3)
    assert explicit.defaults["damping"] == 0.5 and explicit.fallback_lr == 0.3


def test_kl_clip_binding_is_counted():
    x, y = classification_batch()
    counts = {}
    for clip in (1e-12, 1e6, None):
        model = mlp()
        opt = lg.KFAC(model.parameters(), lr=0.1, kl_clip=clip)
        lg.attach(model, opt)
        for _ in range(4):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        counts[clip] = opt.diagnostics
    assert counts[1e-12]["kl_clip_bind_rate"] == 1.0 and counts[1e-12]["kl_clip_bound"] == 1.0
    assert counts[1e6]["kl_clip_bind_rate"] == 0.0 and counts[1e6]["kl_clip_bound"] == 0.0
    assert "kl_clip_bind_rate" not in counts[None]


def test_a_refresh_maps_both_moments_with_one_change_of_basis_per_side(monkeypatch):
    """Both moments (second, and the rotated first) are carried with the same ``Q_oldᵀ Q_new``
    per side, computed once (an n³ matmul each): 3 sides per refresh, not 6. The carried
    moments equal the public carries'."""
    from lightning_grng.curvature import kronecker

    f = KroneckerFactors(torch.float64)
    g = torch.Generator().manual_seed(1)
    A, G = (
        torch.randn(1, 4, 4, generator=g, dtype=torch.float64),
        torch.randn(1, 3, 3, generator=g, dtype=torch.float64),
    )
    f.update(
        A @ A.mT + torch.eye(4, dtype=torch.float64),
        G @ G.mT + torch.eye(3, dtype=torch.float64),
        0.9,
    )
    f.refresh(kronecker.InverseMethod.EIGH, 0.0, 0)
    f.moment = torch.rand(1, 3, 4, generator=g, dtype=torch.float64)
    f.rotated_first_moment = torch.randn(1, 3, 4, generator=g, dtype=torch.float64)
    old = (f.evec_A, f.evec_G, f.moment, f.rotated_first_moment)
    B = torch.randn(1, 4, 4, generator=g, dtype=torch.float64)
    f.update(B @ B.mT, G @ G.mT + torch.eye(3, dtype=torch.float64), 0.5)  # a new basis for A
    calls = []
    change = kronecker._change_of_basis
    monkeypatch.setattr(kronecker, "_change_of_basis", lambda b: calls.append(b) or change(b))
    f.refresh(kronecker.InverseMethod.EIGH, 0.0, 0)
    assert len(calls) == 3
    monkeypatch.undo()
    bases = (old[0], f.evec_A), (old[1], f.evec_G)
    torch.testing.assert_close(f.moment, carry_moment(old[2], *bases), rtol=1e-13, atol=0)
    first = kronecker.carry_first_moment(old[3], *bases)
    torch.testing.assert_close(f.rotated_first_moment, first, rtol=1e-13, atol=1e-15)
