"""Properties 1-3 of docs/algorithms.md in float64 against dense Kronecker math."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from conftest import (
    classification_batch,
    dense_kfac_update,
    layer_matrices,
    mlp,
    sequential_reference,
)
from torch import nn
from torch.func import functional_call, grad, jvp

import lightning_grng as lg

# The paper's K-FAC route: these tests check its math (the eigen mode: test_eigen.py).
KFAC_K = partial(lg.KFAC, preconditioner="kfac")
RING_K = partial(lg.RING, preconditioner="kfac")
RENG_K = partial(lg.RENG, preconditioner="kfac")

# Absolute damping: the dense references take γ itself (relative mode: tests/test_scale.py).
EXACT = dict(
    lr=1.0, momentum=0.0, kl_clip=None, curvature_every=1, inverse_every=1, damping_mode="absolute"
)


def _step(opt, model, x, y, create_graph=False):
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward(create_graph=create_graph)
    opt.step()


@pytest.mark.parametrize(
    "make",
    [
        lambda p: KFAC_K(p, damping=0.3, inverse="eigh", **EXACT),
        lambda p: RING_K(p, damping=0.3, rho=0.0, inverse="eigh", **EXACT),
        lambda p: RENG_K(p, damping=0.3, rho=0.0, inverse="eigh", **EXACT),
    ],
    ids=["KFAC", "RING(rho=0)", "RENG(rho=0)"],
)
def test_rho_zero_steps_equal_dense_kronecker_inverse(make):
    """Property 1: two steps (the second mixes factors by EMA) equal (A⊗G + λI)⁻¹ g."""
    model = mlp()
    opt = make(model.parameters())
    lg.attach(model, opt)
    ema = opt.ema_decay
    factors = None
    for seed in (0, 1):
        x, y = classification_batch()
        x = x + seed  # a different batch for the second step
        _, refs = sequential_reference(model, x, y)
        if factors is None:
            factors = [(A, G) for A, G, _ in refs]
        else:
            factors = [
                (ema * A0 + (1 - ema) * A, ema * G0 + (1 - ema) * G)
                for (A0, G0), (A, G, _) in zip(factors, refs, strict=True)
            ]
        before = layer_matrices(model)
        _step(opt, model, x, y)
        after = layer_matrices(model)
        for (A, G), (_, _, V), w0, w1 in zip(factors, refs, before, after, strict=True):
            expected = dense_kfac_update(A, G, V, 0.3)
            torch.testing.assert_close(w0 - w1, expected, rtol=1e-9, atol=1e-12)


def test_newton_route_equals_dense_factored_damping():
    """Property 1, Newton route: (A + π√λ I)⁻¹ ⊗ (G + √λ/π I)⁻¹ applied to g."""
    lam = 0.05
    model = mlp()
    opt = KFAC_K(model.parameters(), damping=lam, inverse="newton", newton_iters=60, **EXACT)
    lg.attach(model, opt)
    x, y = classification_batch()
    _, refs = sequential_reference(model, x, y)
    before = layer_matrices(model)
    _step(opt, model, x, y)
    after = layer_matrices(model)
    for (A, G, V), w0, w1 in zip(refs, before, after, strict=True):
        pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
        Ad = A + pi * math.sqrt(lam) * torch.eye(A.shape[0], dtype=A.dtype)
        Gd = G + math.sqrt(lam) / pi * torch.eye(G.shape[0], dtype=G.dtype)
        expected = torch.linalg.solve(Gd, V) @ torch.linalg.inv(Ad)
        torch.testing.assert_close(w0 - w1, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("rho", [0.5, 3.0])
def test_ring_equals_dense_adaptive_damping(rho):
    """Property 2: U = (A⊗G + (λ + ρ‖g‖²) I)⁻¹ g with ‖g‖ the global gradient norm."""
    lam = 0.1
    model = mlp()
    opt = RING_K(model.parameters(), damping=lam, rho=rho, inverse="eigh", **EXACT)
    lg.attach(model, opt)
    x, y = classification_batch()
    _, refs = sequential_reference(model, x, y)
    grad_sq = sum(float(V.pow(2).sum()) for _, _, V in refs)
    before = layer_matrices(model)
    _step(opt, model, x, y)
    after = layer_matrices(model)
    gamma = lam + rho * grad_sq
    assert opt.diagnostics["damping"] == pytest.approx(gamma)
    for (A, G, V), w0, w1 in zip(refs, before, after, strict=True):
        torch.testing.assert_close(
            w0 - w1, dense_kfac_update(A, G, V, gamma), rtol=1e-9, atol=1e-12
        )


def _reference_regularized_gradient(model, x, y, rho, gr_norm="squared"):
    """g + ρ·Hg (the squared penalty) or g + ρ·Hg/‖g‖ (the unsquared one, ‖g‖ over every
    parameter), with an independent forward-over-reverse Hessian-vector product."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(p):
        return nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    g = grad(loss_fn)(params)
    _, hg = jvp(grad(loss_fn), (params,), (g,))
    scale = 1.0
    if gr_norm == "unsquared":
        scale = 1.0 / float(sum(t.pow(2).sum() for t in g.values()).sqrt())
    return {k: g[k] + rho * scale * hg[k] for k in params}


@pytest.mark.parametrize("gr_norm", ["squared", "unsquared"])
@pytest.mark.parametrize("gr_mode,tol", [("double_backprop", 1e-9), ("finite_difference", 1e-5)])
def test_reng_step_equals_dense_preconditioned_regularized_gradient(gr_mode, tol, gr_norm):
    """Property 3 (with 1): RENG's step is (A⊗G + λI)⁻¹ (g + ρHg), Hg from torch.func; with
    ``gr_norm="unsquared"`` (the penalty ρ‖∇ℓ‖) it is (A⊗G + λI)⁻¹ (g + ρHg/‖g‖)."""
    lam, rho = 0.2, 0.7
    model = mlp()
    opt = RENG_K(
        model.parameters(),
        damping=lam,
        rho=rho,
        gr_mode=gr_mode,
        fd_eps=1e-7,
        gr_norm=gr_norm,
        **EXACT,
    )
    x, y = classification_batch()
    _, refs = sequential_reference(model, x, y)
    reg = _reference_regularized_gradient(model, x, y, rho, gr_norm)  # before attach: no hooks
    lg.attach(model, opt)
    before = layer_matrices(model)
    if gr_mode == "double_backprop":
        _step(opt, model, x, y, create_graph=True)
    else:

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    after = layer_matrices(model)
    for i, ((A, G, _), w0, w1) in enumerate(zip(refs, before, after, strict=True)):
        idx = 2 * i
        V = torch.cat([reg[f"{idx}.weight"], reg[f"{idx}.bias"][:, None]], 1)
        torch.testing.assert_close(
            w0 - w1, dense_kfac_update(A, G, V, lam), rtol=tol, atol=tol * 1e-2
        )


def test_regularized_gradient_matches_finite_difference_of_half_grad_norm():
    """Property 3: (∇ℓ_G − g)/ρ = ∇(½‖∇ℓ‖²), checked by central differences along random
    directions (error O(ε²))."""
    rho = 0.3
    model = mlp()
    opt = RENG_K(model.parameters(), rho=rho)
    lg.attach(model, opt)
    x, y = classification_batch()
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    lg.regularized_backward(loss, opt)
    reg = [p.grad.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    g = [p.grad.detach().clone() for p in model.parameters()]
    hg = [(r - gi) / rho for r, gi in zip(reg, g, strict=True)]

    def half_grad_norm(shift, eps):
        with torch.no_grad():
            for p, s in zip(model.parameters(), shift, strict=True):
                p.add_(s, alpha=eps)
        gs = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
        with torch.no_grad():
            for p, s in zip(model.parameters(), shift, strict=True):
                p.sub_(s, alpha=eps)
        return 0.5 * sum(float(t.pow(2).sum()) for t in gs)

    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in model.parameters()]
        eps = 1e-5
        fd = (half_grad_norm(v, eps) - half_grad_norm(v, -eps)) / (2 * eps)
        analytic = sum(float((h * vi).sum()) for h, vi in zip(hg, v, strict=True))
        assert fd == pytest.approx(analytic, rel=1e-6, abs=1e-10)


def test_double_backward_does_not_leak_into_curvature():
    """G after a RENG double-backprop step equals G from a plain backward (gated capture)."""
    x, y = classification_batch()
    results = []
    for cls, create_graph in ((lg.KFAC, False), (lg.RENG, True)):
        model = mlp()
        kwargs = dict(rho=2.0) if cls is lg.RENG else {}
        opt = cls(model.parameters(), **EXACT, **kwargs, curvature="kfac")
        lg.attach(model, opt)
        _step(opt, model, x, y, create_graph=create_graph)
        results.append([(opt.factors(k).A, opt.factors(k).G) for k in sorted(opt.blocks)])
    _, refs = sequential_reference(mlp(), x, y)
    for (A0, G0), (A1, G1), (A, G, _) in zip(*results, refs, strict=True):
        torch.testing.assert_close(G1[0], G, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(G0, G1, rtol=0, atol=0)
        torch.testing.assert_close(A0, A1, rtol=0, atol=0)
        torch.testing.assert_close(A1[0], A, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("gr_norm", ["squared", "unsquared"])
def test_regularized_backward_equals_create_graph_path(gr_norm):
    """The strategy path (autograd.grad + one backward) equals backward(create_graph=True),
    for either penalty (the unsquared one scales the penalty by 1/‖g‖ in both)."""
    x, y = classification_batch()
    finals = []
    for use_helper in (False, True):
        model = mlp()
        opt = RENG_K(model.parameters(), rho=0.5, gr_norm=gr_norm, **EXACT)
        lg.attach(model, opt)
        for _ in range(3):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if use_helper:
                lg.regularized_backward(loss, opt)
            else:
                loss.backward(create_graph=True)
            opt.step()
        finals.append(layer_matrices(model))
    for a, b in zip(*finals, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
