"""Issue 11: curvature at its true scale.

Rows are samples (a Linear's factors do not depend on how its rows are batched), relative damping
(the step is covariant with the loss scale), the damping-to-curvature diagnostics, the Adam
fallback and the coverage report. Float64 against dense math.
"""

from __future__ import annotations

import logging
from functools import partial

import pytest
import torch
from conftest import dense_kfac_update, vec
from torch import Tensor, nn

import lightning_grng as lg
from lightning_grng import attach

# Issue 11's K-FAC route (the eigen mode's scale properties: test_eigen.py).
KFAC = partial(lg.KFAC, preconditioner="kfac")
RING = partial(lg.RING, preconditioner="kfac")
RENG = partial(lg.RENG, preconditioner="kfac")


class Tokenwise(nn.Module):
    """One Linear layer on ``(B, T, d)``, applied either once or T times on ``(B, d)``."""

    def __init__(self, d: int, classes: int, loop: bool) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.lin = nn.Linear(d, classes).double()
        self.loop = loop

    def forward(self, x: Tensor) -> Tensor:
        if self.loop:
            return torch.stack([self.lin(x[:, t]) for t in range(x.shape[1])], 1)
        return self.lin(x)


def _tokens(b: int = 3, t: int = 4, d: int = 5, classes: int = 3):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (b, t), generator=g)
    return x, y


def _token_loss(logits: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_linear_called_once_on_sequence_equals_called_per_step(mode):
    x, y = _tokens()
    results = []
    for loop in (False, True):
        model = Tokenwise(5, 3, loop)
        opt = KFAC(model.parameters(), lr=0.1, damping=0.01, damping_mode=mode, kl_clip=None)
        attach(model, opt)
        for _ in range(2):
            opt.zero_grad()
            _token_loss(model(x), y).backward()
            opt.step()
        f = opt.factors("0")
        results.append((f.A.clone(), f.G.clone(), model.lin.weight.detach().clone()))
    for once, looped in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(once, looped, rtol=1e-12, atol=1e-14)


def test_factors_are_the_per_token_empirical_fisher():
    """A ⊗ G against the dense per-token Fisher: A and G are the means over tokens of
    ā āᵀ and ĝ ĝᵀ (ĝ the gradient of the token's own loss), and for one token their Kronecker
    product is exactly that token's empirical Fisher vec(∇W) vec(∇W)ᵀ."""
    x, y = _tokens()
    model = Tokenwise(5, 3, loop=False)
    opt = KFAC(model.parameters(), lr=0.1, kl_clip=None)
    attach(model, opt)
    opt.zero_grad()
    _token_loss(model(x), y).backward()
    opt.step()

    rows = x.reshape(-1, 5)
    a_bar = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype)], 1)
    lin = Tokenwise(5, 3, loop=False).lin  # the weights before the step
    per_token_grads = []
    for r, label in zip(a_bar, y.reshape(-1), strict=True):
        s = (lin.weight @ r[:-1] + lin.bias).detach().requires_grad_()
        nn.functional.cross_entropy(s[None], label[None]).backward()
        per_token_grads.append(s.grad)
    g_hat = torch.stack(per_token_grads)
    f = opt.factors("0")
    torch.testing.assert_close(f.A[0], a_bar.T @ a_bar / len(rows), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(f.G[0], g_hat.T @ g_hat / len(rows), rtol=1e-12, atol=1e-14)

    # One token: A ⊗ G is the dense empirical Fisher of that token.
    one = Tokenwise(5, 3, loop=False)
    opt1 = KFAC(one.parameters(), lr=0.1, kl_clip=None)
    attach(one, opt1)
    opt1.zero_grad()
    _token_loss(one(x[:1, :1]), y[:1, :1]).backward()
    grad = torch.cat([one.lin.weight.grad, one.lin.bias.grad[:, None]], 1)
    opt1.step()
    f1 = opt1.factors("0")
    dense = torch.outer(vec(grad), vec(grad))
    torch.testing.assert_close(torch.kron(f1.A[0], f1.G[0]), dense, rtol=1e-10, atol=1e-14)


def _mlp_with_norm(norm: bool = True) -> nn.Module:
    torch.manual_seed(1)
    middle = nn.LayerNorm(6) if norm else nn.Identity()
    return nn.Sequential(nn.Linear(5, 6), middle, nn.Tanh(), nn.Linear(6, 3)).double()


def _batch():
    g = torch.Generator().manual_seed(2)
    return torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (16,), generator=g
    )


def _train(cls, c: float, steps: int = 4, norm: bool = False, **kw) -> list[Tensor]:
    model = _mlp_with_norm(norm)
    kl = kw.pop("kl_clip", 1e-3)
    if cls is RENG:
        # RENG's ρ weighs ½‖∇ℓ‖² against ℓ, so it carries the inverse units of the loss.
        kw["rho"] = kw["rho"] / c
    opt = cls(
        model.parameters(),
        lr=0.05 * c,
        kl_clip=kl * c * c,
        fallback_lr=0.2 / c,
        momentum=0.9,
        curvature_every=1,
        inverse_every=2,
        **kw,
    )
    attach(model, opt)
    x, y = _batch()
    for step in range(steps):
        opt.zero_grad()
        loss = c * nn.functional.cross_entropy(model(x + 0.1 * step), y)
        if isinstance(opt, lg.RENG):
            loss.backward(create_graph=True)
        else:
            loss.backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    ("cls", "kw"),
    [
        (KFAC, {}),
        (KFAC, {"inverse": "newton"}),
        (RING, {"rho": 0.5}),
        (RING, {"rho": 0.5, "inverse": "eigh"}),
        (RENG, {"rho": 0.5}),
    ],
)
def test_loss_scale_changes_nothing_with_lr_and_clip_in_its_units(cls, kw):
    """Loss × c with lr × c and kl_clip × c² (and RENG's ρ / c): the same parameters after
    every step (the Kronecker directions shrink by exactly 1/c)."""
    reference = _train(cls, 1.0, **kw)
    scaled = _train(cls, 7.0, **kw)
    for a, b in zip(reference, scaled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_loss_scale_with_an_adam_fallback_layer():
    """With a LayerNorm on the Adam fallback, fallback_lr / c keeps its step (Adam is
    scale-free); only Adam's ε = 1e-8 does not scale, against gradients of order 1e-3."""
    reference = _train(RING, 1.0, norm=True, rho=0.5)
    scaled = _train(RING, 7.0, norm=True, rho=0.5)
    for a, b in zip(reference, scaled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_absolute_damping_is_not_scale_covariant():
    """The control: with absolute damping the same change of units changes the run."""
    reference = _train(KFAC, 1.0, damping_mode="absolute", damping=1e-2)
    scaled = _train(KFAC, 7.0, damping_mode="absolute", damping=1e-2)
    assert any(not torch.allclose(a, b, rtol=1e-4) for a, b in zip(reference, scaled, strict=True))


def test_relative_step_is_the_dense_inverse_at_lambda_times_mean_eigenvalue():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    opt = KFAC(model.parameters(), lr=1.0, momentum=0.0, damping=0.05, kl_clip=None)
    attach(model, opt)
    x, y = _batch()
    before = torch.cat([model[0].weight.detach(), model[0].bias.detach()[:, None]], 1)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x[:, :4]), y).backward()
    V = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1)
    opt.step()
    after = torch.cat([model[0].weight.detach(), model[0].bias.detach()[:, None]], 1)
    f = opt.factors("0")
    A, G = f.A[0], f.G[0]
    m = torch.trace(A) / A.shape[0] * torch.trace(G) / G.shape[0]
    expected = dense_kfac_update(A, G, V, float(0.05 * m))
    torch.testing.assert_close(before - after, expected, rtol=1e-9, atol=1e-12)
    assert float(opt.diagnostics["damping_ratio/0"]) == pytest.approx(0.05)


def test_ring_damping_ratio_is_lambda_plus_rho_times_gradient_to_trace():
    model = _mlp_with_norm()
    opt = RING(model.parameters(), lr=0.01, damping=1e-3, rho=0.3, inverse="eigh")
    attach(model, opt)
    x, y = _batch()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for key, name in (("0", "0"), ("4", "3")):
        f = opt.factors(key)
        g_sq = grads[f"{name}.weight"].pow(2).sum() + grads[f"{name}.bias"].pow(2).sum()
        trace = torch.trace(f.A[0]) * torch.trace(f.G[0])
        expected = 1e-3 + 0.3 * float(g_sq / trace)
        assert float(opt.diagnostics[f"damping_ratio/{name}"]) == pytest.approx(expected, rel=1e-9)


def test_absolute_mode_reports_how_far_damping_sits_above_the_curvature():
    model = _mlp_with_norm()
    opt = KFAC(model.parameters(), lr=0.01, damping=0.1, damping_mode="absolute")
    attach(model, opt)
    x, y = _batch()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    f = opt.factors("0")
    m = torch.trace(f.A[0]) / f.A.shape[-1] * torch.trace(f.G[0]) / f.G.shape[-1]
    assert float(opt.diagnostics["damping_ratio/0"]) == pytest.approx(float(0.1 / m), rel=1e-9)


def test_adam_fallback_is_adam_on_the_unblocked_parameters():
    model = _mlp_with_norm()
    norm = model[1]
    reference = nn.LayerNorm(6).double()
    reference.load_state_dict(norm.state_dict())
    opt = KFAC(model.parameters(), lr=0.05, fallback_lr=0.4, weight_decay=0.1)
    adam = torch.optim.AdamW(reference.parameters(), lr=0.02, weight_decay=0.1)
    attach(model, opt)
    x, y = _batch()
    for step in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x + step), y).backward()
        for p, q in zip(norm.parameters(), reference.parameters(), strict=True):
            q.grad = p.grad.clone()
        opt.step()
        adam.step()
        for p, q in zip(norm.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_sgd_fallback_keeps_the_raw_gradient_step():
    model = _mlp_with_norm()
    opt = KFAC(model.parameters(), lr=0.05, momentum=0.0, kl_clip=None, fallback="sgd")
    attach(model, opt)
    x, y = _batch()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model[1].parameters()]
    grads = [p.grad.clone() for p in model[1].parameters()]
    opt.step()
    for p, p0, g in zip(model[1].parameters(), before, grads, strict=True):
        torch.testing.assert_close(p.detach(), p0 - 0.05 * g, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"fallback": "rmsprop"}, "fallback"),
        ({"fallback_lr": 0.0}, "fallback_lr"),
        ({"damping_mode": "scaled"}, "damping_mode"),
    ],
)
def test_new_options_are_validated(kw, message):
    with pytest.raises(ValueError, match=message):
        RING(_mlp_with_norm().parameters(), **kw)


def test_coverage_is_stated_once_in_one_line(caplog):
    model = _mlp_with_norm()
    opt = RING(model.parameters())
    with caplog.at_level(logging.INFO, logger="lightning_grng"), pytest.warns(UserWarning):
        handle = attach(model, opt)
    lines = [r.getMessage() for r in caplog.records if r.name == "lightning_grng"]
    assert len(lines) == 1 and "\n" not in lines[0]
    linear = sum(p.numel() for i in (0, 3) for p in model[i].parameters())
    total = sum(p.numel() for p in model.parameters())
    assert handle.coverage.covered == linear and handle.coverage.total == total
    assert f"{linear / total:.1%}" in lines[0] and "1 × LayerNorm ('1')" in lines[0]


class EncoderLM(nn.Module):
    """A standard PyTorch language model: token and position embeddings,
    ``nn.TransformerEncoder`` (MultiheadAttention, feed-forward, LayerNorms), a final norm and a
    Linear head (width 64, 2 layers, vocabulary 65, context 64: the Shakespeare model's sizes)."""

    def __init__(self, vocab: int = 65, dim: int = 64, context: int = 64, layers: int = 2):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        t = ids.shape[1]
        h = self.tok(ids) + self.pos(torch.arange(t))
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        return self.head(self.norm(self.encoder(h, mask=mask, is_causal=True)))


@pytest.mark.parametrize("cls", [KFAC, RING, RENG])
def test_standard_transformer_lm_is_at_least_95_percent_in_kronecker_blocks(cls, caplog):
    model = EncoderLM()
    opt = cls(model.parameters(), lr=0.03)
    with caplog.at_level(logging.INFO, logger="lightning_grng"), pytest.warns(UserWarning):
        handle = attach(model, opt)
    coverage = handle.coverage
    assert coverage.share >= 0.95, str(coverage)
    # Only the LayerNorms fall back.
    assert all("LayerNorm" in name for name in coverage.fallback), coverage.fallback
    line = next(r.getMessage() for r in caplog.records if r.name == "lightning_grng")
    assert f"{coverage.share:.1%}" in line
