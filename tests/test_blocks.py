"""Property 6 and the factor conventions: Conv2d factors against an explicit patch extraction,
(B, T, d) Linear inputs, mean/sum reduction and gradient accumulation."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

import lightning_grng as lg

# The paper's K-FAC route: these tests check its math (the eigen mode: test_eigen.py).
KFAC_K = partial(lg.KFAC, preconditioner="kfac")
RING_K = partial(lg.RING, preconditioner="kfac")
RENG_K = partial(lg.RENG, preconditioner="kfac")


def _explicit_patches(x, conv: nn.Conv2d):
    """Patches by explicit indexing over output positions (no F.unfold)."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    if conv.padding == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        pad = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    else:
        ph, pw = conv.padding
        pad = (pw, pw, ph, ph)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = nn.functional.pad(x, pad, mode=mode)
    B, C, H, W = xp.shape
    Ho = (H - dh * (kh - 1) - 1) // sh + 1
    Wo = (W - dw * (kw - 1) - 1) // sw + 1
    cg = C // conv.groups
    rows = [[] for _ in range(conv.groups)]
    for b in range(B):
        for i in range(Ho):
            for j in range(Wo):
                for g in range(conv.groups):
                    patch = xp[
                        b,
                        g * cg : (g + 1) * cg,
                        i * sh : i * sh + dh * (kh - 1) + 1 : dh,
                        j * sw : j * sw + dw * (kw - 1) + 1 : dw,
                    ]
                    rows[g].append(patch.reshape(-1))
    return [torch.stack(r) for r in rows], Ho * Wo


CONV_CASES = [
    dict(in_channels=2, out_channels=3, kernel_size=3),
    dict(in_channels=2, out_channels=4, kernel_size=(3, 2), stride=2, padding=1, dilation=1),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=2, dilation=2, groups=2),
    dict(in_channels=3, out_channels=3, kernel_size=3, groups=3, bias=False),
    dict(in_channels=2, out_channels=2, kernel_size=3, padding="same", padding_mode="reflect"),
    dict(in_channels=2, out_channels=2, kernel_size=(2, 4), padding="same", dilation=(1, 2)),
]


@pytest.mark.parametrize("kwargs", CONV_CASES, ids=[str(i) for i in range(len(CONV_CASES))])
def test_conv2d_factors_equal_explicit_patches(kwargs):
    conv = nn.Conv2d(**kwargs).double()
    model = nn.Sequential(conv, nn.Flatten())
    opt = KFAC_K(model.parameters(), curvature_every=1, ema_decay=0.0)
    lg.attach(model, opt)
    x = torch.randn(3, conv.in_channels, 7, 8, dtype=torch.float64)
    out = conv(x)
    out.retain_grad()
    head = torch.randn(out[0].numel(), 5, dtype=torch.float64)
    y = torch.randint(0, 5, (3,))
    nn.functional.cross_entropy(out.flatten(1) @ head, y).backward()
    opt.step()

    rows, _ = _explicit_patches(x, conv)
    og = conv.out_channels // conv.groups
    factors = opt.factors("0")
    n_in = rows[0].shape[1] + (conv.bias is not None)
    assert factors.A.shape == (conv.groups, n_in, n_in)
    assert factors.G.shape == (conv.groups, og, og)
    for g in range(conv.groups):
        a = rows[g]
        if conv.bias is not None:
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
        A = a.T @ a / a.shape[0]
        # δ rows: gradient at each position; mean loss over B=3 samples → G = B·Σ δδᵀ
        d = out.grad[:, g * og : (g + 1) * og].permute(0, 2, 3, 1).reshape(-1, og)
        G = 3 * d.T @ d
        torch.testing.assert_close(factors.A[g], A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(factors.G[g], G, rtol=1e-12, atol=1e-14)


def test_conv_kfac_is_exact_for_one_position_and_one_sample():
    """With a single output position and one sample, the per-sample empirical Fisher of the
    conv weight is exactly A ⊗ G."""
    conv = nn.Conv2d(2, 3, kernel_size=3).double()
    opt = KFAC_K(conv.parameters(), curvature_every=1)
    lg.attach(conv, opt)
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    loss = nn.functional.cross_entropy(conv(x).flatten(1), torch.tensor([1]))
    loss.backward()
    gW = torch.cat([conv.weight.grad.reshape(3, -1), conv.bias.grad[:, None]], 1)
    exact = torch.outer(gW.T.reshape(-1), gW.T.reshape(-1))  # column-major vec
    opt.step()
    f = opt.factors("0")
    torch.testing.assert_close(torch.kron(f.A[0], f.G[0]), exact, rtol=1e-10, atol=1e-12)


def test_linear_on_sequences_uses_rows_as_samples():
    """Every row (token) is a sample: G = R·Σ δδᵀ with R = B·T rows, the mean per-token
    Fisher factor of a per-token mean loss."""
    lin = nn.Linear(4, 3).double()
    opt = KFAC_K(lin.parameters(), curvature_every=1)
    lg.attach(lin, opt)
    x = torch.randn(2, 5, 4, dtype=torch.float64)  # (B, T, d)
    out = lin(x)
    out.retain_grad()
    y = torch.randint(0, 3, (2, 5))
    nn.functional.cross_entropy(out.reshape(-1, 3), y.reshape(-1)).backward()
    opt.step()
    a = torch.cat([x.reshape(-1, 4), torch.ones(10, 1, dtype=x.dtype)], 1)
    d = out.grad.reshape(-1, 3)
    f = opt.factors("0")
    torch.testing.assert_close(f.A[0], a.T @ a / 10, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(f.G[0], 10 * d.T @ d, rtol=1e-12, atol=1e-14)


def _one_step(reduction: str, damping: float, x, y, mode: str = "relative"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    opt = KFAC_K(
        model.parameters(),
        lr=1.0,
        momentum=0.0,
        kl_clip=None,
        damping=damping,
        damping_mode=mode,
        curvature_every=1,
        loss_reduction=reduction,
    )
    lg.attach(model, opt)
    nn.functional.cross_entropy(model(x), y, reduction=reduction).backward()
    opt.step()
    return model, opt


@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_sum_reduction_scales_g_by_batch_and_gives_the_same_step(mode):
    """G(sum) = B·G(mean): relative damping follows by itself, absolute damping scaled by B
    by hand; either way the natural-gradient steps agree."""
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    m_mean, o_mean = _one_step("mean", 0.1, x, y, mode)
    m_sum, o_sum = _one_step("sum", 0.1 * (8 if mode == "absolute" else 1), x, y, mode)
    for k in o_mean.blocks:
        torch.testing.assert_close(o_sum.factors(k).G, 8 * o_mean.factors(k).G)
        torch.testing.assert_close(o_sum.factors(k).A, o_mean.factors(k).A)
    for a, b in zip(m_mean.parameters(), m_sum.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [lg.KFAC, lg.RING])
def test_gradient_accumulation_equals_full_batch(cls):
    """Two micro-batches with loss/2 give the same factors and step as one batch of 2B."""
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    finals = []
    for micro in (1, 2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
        opt = cls(model.parameters(), curvature_every=1, inverse_every=1)
        lg.attach(model, opt)
        for _ in range(3):
            opt.zero_grad()
            for xb, yb in zip(x.chunk(micro), y.chunk(micro), strict=True):
                (nn.functional.cross_entropy(model(xb), yb) / micro).backward()
            opt.step()
        finals.append(([opt.factors(k).G.clone() for k in opt.blocks], list(model.parameters())))
    for g1, g2 in zip(finals[0][0], finals[1][0], strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    for p1, p2 in zip(finals[0][1], finals[1][1], strict=True):
        torch.testing.assert_close(p1, p2, rtol=1e-10, atol=1e-12)


def _explicit_patches_1d(x, conv: nn.Conv1d):
    """Conv1d patches by explicit indexing over output positions (no F.unfold)."""
    (k,), (s,), (d,) = conv.kernel_size, conv.stride, conv.dilation
    if conv.padding == "same":
        total = d * (k - 1)
        pad = (total // 2, total - total // 2)
    else:
        pad = (conv.padding[0], conv.padding[0])
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = nn.functional.pad(x, pad, mode=mode)
    B, C, W = xp.shape
    Wo = (W - d * (k - 1) - 1) // s + 1
    cg = C // conv.groups
    rows = [[] for _ in range(conv.groups)]
    for b in range(B):
        for j in range(Wo):
            for g in range(conv.groups):
                rows[g].append(
                    xp[b, g * cg : (g + 1) * cg, j * s : j * s + d * (k - 1) + 1 : d].reshape(-1)
                )
    return [torch.stack(r) for r in rows]


CONV1D_CASES = [
    dict(in_channels=2, out_channels=3, kernel_size=3),
    dict(in_channels=2, out_channels=4, kernel_size=2, stride=2, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=2, dilation=2, groups=2),
    dict(in_channels=3, out_channels=3, kernel_size=3, groups=3, bias=False),
    dict(in_channels=2, out_channels=2, kernel_size=4, padding="same", padding_mode="reflect"),
    dict(
        in_channels=2,
        out_channels=2,
        kernel_size=3,
        padding="same",
        dilation=2,
        padding_mode="circular",
    ),
]


@pytest.mark.parametrize("kwargs", CONV1D_CASES, ids=[str(i) for i in range(len(CONV1D_CASES))])
def test_conv1d_factors_equal_explicit_patches(kwargs):
    conv = nn.Conv1d(**kwargs).double()
    model = nn.Sequential(conv, nn.Flatten())
    opt = KFAC_K(model.parameters(), curvature_every=1, ema_decay=0.0)
    lg.attach(model, opt)
    assert isinstance(opt.blocks["0"], lg.curvature.Conv1dBlock)
    x = torch.randn(3, conv.in_channels, 9, dtype=torch.float64)
    out = conv(x)
    out.retain_grad()
    head = torch.randn(out[0].numel(), 5, dtype=torch.float64)
    y = torch.randint(0, 5, (3,))
    nn.functional.cross_entropy(out.flatten(1) @ head, y).backward()
    opt.step()

    rows = _explicit_patches_1d(x, conv)
    og = conv.out_channels // conv.groups
    factors = opt.factors("0")
    n_in = rows[0].shape[1] + (conv.bias is not None)
    assert factors.A.shape == (conv.groups, n_in, n_in)
    for g in range(conv.groups):
        a = rows[g]
        if conv.bias is not None:
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
        d = out.grad[:, g * og : (g + 1) * og].permute(0, 2, 1).reshape(-1, og)
        torch.testing.assert_close(factors.A[g], a.T @ a / a.shape[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(factors.G[g], 3 * d.T @ d, rtol=1e-12, atol=1e-14)


def test_conv1d_unbatched_input_matches_batch_of_one():
    conv = nn.Conv1d(2, 3, kernel_size=3, padding=1).double()
    factors = []
    for x in (torch.randn(2, 6, dtype=torch.float64),):
        for batched in (False, True):
            opt = KFAC_K(conv.parameters(), curvature_every=1, ema_decay=0.0)
            handle = lg.attach(conv, opt)
            conv(x.unsqueeze(0) if batched else x).pow(2).sum().backward()
            opt.step()
            factors.append(opt.factors("0").A.clone())
            handle.remove()
            conv.zero_grad()
    torch.testing.assert_close(factors[0], factors[1])
