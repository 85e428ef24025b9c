"""The restructured core's pieces on their own: the damping rule, the routes, the arguments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_grng as lg
from lightning_grng.curvature.kronecker import InverseMethod
from lightning_grng.optim.arguments import documented
from lightning_grng.optim.damping import (
    DampingArgs,
    DampingMode,
    RhoMode,
    eigen_curvature,
    kalman_gr,
    kronecker_damping,
)
from lightning_grng.optim.routes import (
    EigenRoute,
    EighRoute,
    NewtonRoute,
    Preconditioner,
    WarmEigenRoute,
    route_for,
)

F64 = torch.float64


def _args(mode: DampingMode, rho: float, block_sq: float = 3.0, total_sq: float = 5.0):
    return DampingArgs(
        damping=0.2,
        rho=rho,
        boost=4.0,
        mode=mode,
        block_grad_sq=lambda: torch.tensor(block_sq, dtype=F64),
        total_grad_sq=torch.tensor(total_sq, dtype=F64),
    )


def test_kronecker_damping_relative_is_the_trace_matched_gr_share():
    mean = torch.tensor([2.0, 0.5], dtype=F64)  # (tr A/n_A)(tr G/n_G) per group
    size = 6  # n_A · n_G
    gamma, ratio = kronecker_damping(mean, size, _args(DampingMode.RELATIVE, rho=0.7))
    trace = float(mean.sum()) * size  # tr(A ⊗ G) over the groups
    expected_ratio = (0.2 + 0.7 * 3.0 / trace) * 4.0
    torch.testing.assert_close(ratio, torch.full_like(mean, expected_ratio), rtol=1e-15, atol=0)
    torch.testing.assert_close(gamma, expected_ratio * mean, rtol=1e-15, atol=0)


def test_kronecker_damping_absolute_uses_the_global_norm_and_never_the_block_one():
    mean = torch.tensor([2.0], dtype=F64)

    def refuse():
        raise AssertionError("the absolute mode reads the global ‖g‖²")

    args = DampingArgs(0.2, 0.7, 4.0, DampingMode.ABSOLUTE, refuse, torch.tensor(5.0, dtype=F64))
    gamma, ratio = kronecker_damping(mean, 6, args)
    assert float(gamma) == pytest.approx((0.2 + 0.7 * 5.0) * 4.0, rel=1e-15)
    assert float(ratio) == pytest.approx(float(gamma) / 2.0, rel=1e-15)


def test_kronecker_damping_without_rho_never_reads_a_gradient_norm():
    def refuse():
        raise AssertionError("ρ = 0 needs no ‖g_b‖²")

    args = DampingArgs(0.2, 0.0, 1.0, DampingMode.RELATIVE, refuse, torch.tensor(5.0))
    gamma, _ = kronecker_damping(torch.tensor([3.0], dtype=F64), 4, args)
    assert float(gamma) == pytest.approx(0.6)


@pytest.mark.parametrize("mode", list(DampingMode))
def test_eigen_curvature_is_d_plus_gamma_plus_rho_r_squared(mode):
    g = torch.Generator().manual_seed(0)
    D = torch.rand(2, 3, 4, generator=g, dtype=F64) + 0.1
    R = torch.randn(2, 3, 4, generator=g, dtype=F64)
    curvature, ratio = eigen_curvature(D, R, _args(mode, rho=0.3))
    lam = 0.2 * 4.0
    gamma = (
        lam * D.mean(dim=(-2, -1))
        if mode is DampingMode.RELATIVE
        else torch.full((2,), lam, dtype=F64)
    )
    expected = D + gamma.to(F64)[:, None, None] + 0.3 * R * R
    torch.testing.assert_close(curvature, expected, rtol=1e-15, atol=0)
    torch.testing.assert_close(ratio, torch.full((2,), lam, dtype=F64))


def test_kalman_gr_terms():
    assert kalman_gr(0.0, RhoMode.NOISE, 9.0) == (1.0, 0.0)
    assert kalman_gr(0.5, RhoMode.DAMPING, 4.0) == (1.0, 2.0)
    assert kalman_gr(0.5, RhoMode.NOISE, 4.0) == (pytest.approx(1.0 / 3.0), 0.0)


def test_routes_are_chosen_by_preconditioner_and_inverse():
    eig, kfac = Preconditioner.EIGEN, Preconditioner.KFAC
    assert route_for("X", eig, None, InverseMethod.NEWTON) is EigenRoute
    assert route_for("X", eig, InverseMethod.EIGH, InverseMethod.NEWTON) is EigenRoute
    assert route_for("X", kfac, None, InverseMethod.NEWTON) is NewtonRoute
    assert route_for("X", kfac, InverseMethod.EIGH, InverseMethod.NEWTON) is EighRoute
    with pytest.raises(ValueError, match="preconditioner='eigen' needs the eigenbasis"):
        route_for("X", eig, InverseMethod.NEWTON, InverseMethod.EIGH)


@pytest.mark.parametrize(
    ("make", "route", "rho"),
    [
        (lambda p: lg.KFAC(p), EigenRoute, None),
        (lambda p: lg.RING(p), EigenRoute, 0.1),
        (lambda p: lg.RING(p, refresh="warm"), WarmEigenRoute, 0.1),
        (lambda p: lg.RING(p, preconditioner="kfac"), NewtonRoute, 10.0),
        (lambda p: lg.RING(p, preconditioner="kfac", inverse="eigh"), EighRoute, 10.0),
        (lambda p: lg.RENG(p, preconditioner="kfac"), EighRoute, 0.1),
    ],
)
def test_each_optimizer_takes_its_defaults_from_its_route(make, route, rho):
    opt = make(nn.Linear(2, 2).parameters())
    assert type(opt.route) is route
    assert opt.defaults["damping"] == route.damping and opt.fallback_lr == route.fallback_lr
    assert opt.momentum_ema is route.momentum_ema
    assert opt.defaults.get("rho") == rho


def test_an_undocumented_constructor_argument_is_refused():
    class Odd:
        """Odd."""

        def __init__(self, lr: float = 1.0, mystery: int = 0) -> None:
            pass

    with pytest.raises(TypeError, match="'mystery' has no description"):
        documented(Odd)


def test_help_describes_units_and_the_real_default_inverse():
    ring = lg.RING.__doc__
    assert "Adam's units" in " ".join(ring.split())
    assert "None: 'eigh' in the eigen mode, 'newton' in the kfac mode" in " ".join(ring.split())
    assert "``" not in lg.KFAC.__doc__ and ":class:" not in lg.RING.__doc__


def test_diagnostics_report_the_damping_in_the_units_of_the_route():
    """Eigen mode: λ (relative to mean D), not λ + ρ‖g‖², which would mix units."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    opt = lg.RING(model.parameters(), rho=0.5, curvature_every=1, inverse_every=1)
    lg.attach(model, opt, report=False)
    x, y = torch.randn(16, 4, dtype=F64), torch.randint(0, 3, (16,))
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    diag = opt.diagnostics
    assert diag["damping"] == pytest.approx(1e-4)
    assert diag["damping_ratio/0"] == pytest.approx(1e-4)
