"""Issue 22: the cheaper step. One-pass reductions (:mod:`lightning_grng.numerics`), the eigen
mode's arithmetic as one function with an optional ``torch.compile`` (and its eager
fallback), and an embedding's direction laid out as its weight. Float64 against the eager
path and dense sums, in the limits where they must agree."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from conftest import mlp
from torch import nn

import lightning_grng as lg
from lightning_grng.curvature.embedding import EmbeddingBlock
from lightning_grng.curvature.kronecker import KroneckerFactors
from lightning_grng.numerics import all_finite, inner, squared_norm
from lightning_grng.optim import eigen_scale as eigen_scale_module
from lightning_grng.optim.damping import GRForm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_all_finite_finds_every_non_finite_entry(dtype):
    x = torch.randn(3, 50, 7).to(dtype)
    assert bool(all_finite(x))
    for bad in (float("nan"), float("inf"), float("-inf")):
        for index in ((0, 0, 0), (2, 49, 6), (1, 17, 3)):
            y = x.clone()
            y[index] = bad
            assert not bool(all_finite(y)), (bad, index)
    both = x.clone()
    both[0, 0, 0], both[1, 1, 1] = float("inf"), float("-inf")  # inf − inf: NaN, still caught
    assert not bool(all_finite(both))


def test_inner_and_squared_norm_match_float64_sums_in_any_layout():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 20, generator=g)
    b = torch.randn(20, 300, generator=g).T  # a transposed view: same logical entries
    want = (a.double() * b.double()).sum()
    assert inner(a, b).dtype == torch.float64
    torch.testing.assert_close(inner(a, b), want, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(squared_norm(b), b.double().pow(2).sum(), rtol=1e-5, atol=0.0)
    a64 = a.double()
    assert inner(a64, a64) == pytest.approx(float(a64.pow(2).sum()), rel=1e-14)


def _eigen_args(R, first=True, rho=0.1, form=GRForm.DIAGONAL):
    moment = torch.rand_like(R)
    m1 = torch.randn_like(R) if first else None
    ratio = torch.full((R.shape[0],), 1e-4, dtype=R.dtype)
    return [R, moment, m1, ratio, (0.3, 0.6), 0.95, 0.9, True, rho, form, 0.5]


@pytest.mark.parametrize("form", list(GRForm))
def test_eigen_scale_is_the_dense_formula(form):
    """One call: D = (β₂m + (1−β₂)R²)/c₂, U = m̂₁ (D + λ·mean D + ρ·GR)^(−½)."""
    torch.manual_seed(1)
    R = torch.randn(2, 3, 4, dtype=torch.float64)
    args = _eigen_args(R, form=form)
    moment0, first0 = args[1].clone(), args[2].clone()
    out = eigen_scale_module.eigen_scale(*args)
    moment = 0.95 * moment0 + 0.05 * R * R
    first = 0.9 * first0 + 0.1 * R
    torch.testing.assert_close(args[1], moment, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(args[2], first, rtol=1e-14, atol=1e-15)
    D = moment / 0.3
    mean_D = D.mean(dim=(-2, -1), keepdim=True)
    curvature, _ = lg.optim.damping.eigen_curvature(
        D, R, lg.optim.damping.DampingArgs(1e-4, 0.1, 1.0, lg.optim.damping.DampingMode.RELATIVE,
                                           lambda: None, 0.0, form)
    )  # fmt: skip
    if form is GRForm.DIAGONAL:  # written out for the default form
        torch.testing.assert_close(curvature, D + 1e-4 * mean_D + 0.1 * R * R)
    torch.testing.assert_close(out, (first / 0.6) * curvature.rsqrt(), rtol=1e-13, atol=1e-15)


def test_a_non_finite_rotated_gradient_leaves_both_moments_unchanged():
    R = torch.randn(1, 3, 4, dtype=torch.float64)
    R[0, 1, 2] = float("nan")
    args = _eigen_args(R)
    moment0, first0 = args[1].clone(), args[2].clone()
    out = eigen_scale_module.eigen_scale(*args)
    assert torch.equal(args[1], moment0) and torch.equal(args[2], first0)
    assert not bool(torch.isfinite(out).all())  # the template then drops this direction


def _train(model, opt, steps=4, seed=3):
    lg.attach(model, opt)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile's CPU backend needs a C++ compiler")  # fmt: skip
def test_compiled_step_equals_the_eager_step_in_float64():
    eager_model, compiled_model = mlp(), mlp()
    compiled_model.load_state_dict(eager_model.state_dict())
    eager = lg.RING(eager_model.parameters(), lr=0.05, rho=0.3)
    compiled = lg.RING(compiled_model.parameters(), lr=0.05, rho=0.3, compile=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = _train(compiled_model, compiled)
    assert not [w for w in record if "runs eagerly" in str(w.message)]
    assert compiled.route.scale.compiled  # no fallback: the compiled path ran
    want = _train(eager_model, eager)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_a_failed_compile_warns_once_and_stays_eager(monkeypatch):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(eigen_scale_module, "BACKEND", broken_backend)
    eager_model, model = mlp(), mlp()
    model.load_state_dict(eager_model.state_dict())
    opt = lg.RING(model.parameters(), lr=0.05, compile=True)
    with pytest.warns(UserWarning, match="runs eagerly from here on") as record:
        got = _train(model, opt)
    assert sum("runs eagerly" in str(w.message) for w in record) == 1
    assert not opt.route.scale.compiled
    want = _train(eager_model, lg.RING(eager_model.parameters(), lr=0.05))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(compile=True, preconditioner="kfac"), ValueError, "eigen mode's per-block"),
        (dict(compile="yes"), TypeError, "True or False"),
    ],
)
def test_invalid_compile_settings_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        lg.RING(mlp().parameters(), lr=0.1, **kwargs)


def test_embedding_direction_comes_out_in_the_weight_layout(monkeypatch):
    """The same step with the direction computed as ``Q_G R`` and transposed afterwards
    (the layout before issue 22) and as ``(Rᵀ Q_Gᵀ)ᵀ``: equal values, and the new one is
    contiguous in the weight's own ``(vocab, dim)`` layout."""
    ids = torch.randint(0, 50, (8, 12), generator=torch.Generator().manual_seed(0))

    def run(transposed: bool):
        monkeypatch.setattr(EmbeddingBlock, "transposed_matrix", transposed)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(50, 6), nn.Linear(6, 3)).double()
        # the dense embedding update (the lazy one never forms the whole direction)
        opt = lg.RING(model.parameters(), lr=0.05, inverse_every=1, lazy_rows=False)
        lg.attach(model, opt)
        seen = []
        original = KroneckerFactors.from_eigenbasis

        def spy(self, R, dtype, transposed=False):
            out = original(self, R, dtype, transposed)
            if R.shape[-1] == 50:
                seen.append(out[0].T.is_contiguous())
            return out

        monkeypatch.setattr(KroneckerFactors, "from_eigenbasis", spy)
        for _ in range(3):
            opt.zero_grad()
            model(ids).pow(2).mean().backward()
            opt.step()
        monkeypatch.setattr(KroneckerFactors, "from_eigenbasis", original)
        return model[0].weight.detach().clone(), seen

    new, seen_new = run(True)
    old, seen_old = run(False)
    assert seen_new and all(seen_new) and not any(seen_old)
    torch.testing.assert_close(new, old, rtol=1e-12, atol=1e-14)
