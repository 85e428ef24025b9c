"""Transposed linear layers (Hugging Face's Conv1D, ``y = x @ W + b`` with W of shape (in, out))
get a Kronecker block by structure, with no registration: float64 checks against dense math and
against the same layer as an nn.Linear holding W.T."""

from __future__ import annotations

import copy
import re
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_grng as lg
from lightning_grng.curvature import LinearBlock, TransposedLinearBlock

# The paper's K-FAC route, exact (A ⊗ G + γI)⁻¹ g: these tests check its math.
KFAC_K = partial(
    lg.KFAC,
    preconditioner="kfac",
    lr=1.0,
    momentum=0.0,
    kl_clip=None,
    ema_decay=0.0,
    curvature_every=1,
    damping=0.1,
    damping_mode="absolute",
)
N_IN, N_OUT = 4, 3
pytestmark = pytest.mark.filterwarnings("ignore:.*the model has no layer with a Kronecker block")


class HFStyleConv1D(nn.Module):
    """Transformers' Conv1D, copied so this file needs no transformers."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx**0.5)
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        size_out = (*x.shape[:-1], self.nf)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class FeaturesStyle(nn.Module):
    """Another transposed linear layer: Linear's attribute names, weight (in, out), no bias."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(in_features, out_features))

    def forward(self, x):
        return x @ self.weight


class NotTransposed(HFStyleConv1D):
    """Conv1D's structure, square, but its forward uses W.T: it must not get the block."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class WithDropout(HFStyleConv1D):
    def forward(self, x):
        return F.dropout(super().forward(x), 0.5, self.training)


def _attach(model, opt, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lg.attach(model, opt, **kwargs)


def _step(model, x):
    """One KFAC step on a mean-squared loss; returns the optimizer, the layer's output (with
    its gradient) and the weight and bias gradients before the step."""
    opt = KFAC_K(model.parameters())
    handle = _attach(model, opt)
    out = model[0](x)
    out.retain_grad()
    model[1:](out).pow(2).sum(-1).mean().backward()
    grads = [p.grad.clone() for p in model[0].parameters() if p.grad is not None]
    opt.step()
    return opt, handle, out, grads


@pytest.mark.parametrize("bias", [True, False])
def test_block_equals_dense_math_and_the_linear_layer(bias):
    torch.manual_seed(0)
    tl = HFStyleConv1D(N_OUT, N_IN).double()
    lin = nn.Linear(N_IN, N_OUT).double()
    if not bias:  # a frozen bias is left out of the block
        tl.bias.requires_grad_(False)
        lin.bias.requires_grad_(False)
    head = nn.Linear(N_OUT, 2).double()
    with torch.no_grad():
        lin.weight.copy_(tl.weight.T)
        lin.bias.copy_(tl.bias)
    model = nn.Sequential(tl, nn.Tanh(), head)
    ref = nn.Sequential(lin, nn.Tanh(), copy.deepcopy(head))
    w0, b0 = tl.weight.detach().clone(), tl.bias.detach().clone()
    x = torch.randn(2, 5, N_IN, dtype=torch.float64)  # (B, T, d): every row is a sample

    opt, handle, out, (gw, *gb) = _step(model, x)
    assert isinstance(handle.blocks["0"], TransposedLinearBlock)
    assert handle.coverage.share == 1.0 and handle.blocks["0"].has_bias == bias
    ref_opt, ref_handle, _, _ = _step(ref, x)
    assert type(ref_handle.blocks["0"]) is LinearBlock

    # Dense math: A = E[ā āᵀ], G = R·Σ δδᵀ (R rows), step -(A ⊗ G + γI)⁻¹ vec(∇W̄).
    rows = x.reshape(-1, N_IN)
    if bias:
        rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype)], 1)
    delta = out.grad.reshape(-1, N_OUT)
    A, G = rows.T @ rows / len(rows), len(rows) * delta.T @ delta
    f, f_ref = opt.factors("0"), ref_opt.factors("0")
    torch.testing.assert_close(f.A[0], A, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(f.G[0], G, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(f.A, f_ref.A, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(f.G, f_ref.G, rtol=1e-12, atol=1e-14)
    V = torch.cat([gw.T, gb[0][:, None]], 1) if bias else gw.T  # the (out, in) matrix
    n = V.numel()
    M = torch.kron(A, G) + 0.1 * torch.eye(n, dtype=torch.float64)
    D = torch.linalg.solve(M, V.T.reshape(-1)).reshape(-1, N_OUT).T  # column-major vec
    torch.testing.assert_close(tl.weight, w0 - D[:, :N_IN].T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tl.weight, lin.weight.T, rtol=1e-10, atol=1e-12)
    if bias:
        torch.testing.assert_close(tl.bias, b0 - D[:, N_IN], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(tl.bias, lin.bias, rtol=1e-10, atol=1e-12)
    else:
        torch.testing.assert_close(tl.bias, b0, rtol=0, atol=0)


def test_matrix_convention_round_trip():
    tl = HFStyleConv1D(N_OUT, N_IN)
    block = TransposedLinearBlock(tl, "tl", with_bias=True)
    w, b = torch.randn(N_IN, N_OUT), torch.randn(N_OUT)
    mat = block.to_matrix(w, b)
    assert mat.shape == (1, N_OUT, N_IN + 1)
    torch.testing.assert_close(mat[0, :, :N_IN], w.T)
    w2, b2 = block.from_matrix(mat)
    assert w2.shape == tl.weight.shape and w2.is_contiguous()
    torch.testing.assert_close(w2, w)
    torch.testing.assert_close(b2, b)


def test_transformers_conv1d_is_recognized_and_equals_linear():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    conv = pytorch_utils.Conv1D(N_OUT, N_IN).double()
    with torch.no_grad():
        conv.bias.normal_()
    lin = nn.Linear(N_IN, N_OUT).double()
    with torch.no_grad():
        lin.weight.copy_(conv.weight.T)
        lin.bias.copy_(conv.bias)
    x = torch.randn(3, 6, N_IN, dtype=torch.float64)
    results = []
    for layer in (conv, lin):
        opt = KFAC_K(layer.parameters())
        handle = lg.attach(layer, opt)  # no warning: everything is covered
        assert handle.coverage.share == 1.0 and not handle.coverage.fallback
        torch.tanh(layer(x)).pow(2).mean().backward()
        opt.step()
        results.append(opt.factors(next(iter(opt.blocks))))
    torch.testing.assert_close(results[0].A, results[1].A, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(results[0].G, results[1].G, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(conv.weight, lin.weight.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(conv.bias, lin.bias, rtol=1e-10, atol=1e-12)


def test_other_transposed_layer_by_in_and_out_features():
    torch.manual_seed(0)
    layer = FeaturesStyle(N_IN, N_IN).double()  # square: the forward decides the orientation
    handle = lg.attach(layer, KFAC_K(layer.parameters()))
    assert isinstance(handle.blocks[""], TransposedLinearBlock)
    assert not handle.blocks[""].has_bias


@pytest.mark.parametrize("cls", [NotTransposed, WithDropout])
def test_same_structure_other_forward_falls_back_with_the_reason(cls):
    torch.manual_seed(0)
    model = nn.Sequential(cls(N_IN, N_IN))
    state = torch.get_rng_state()
    reason = r"shaped like a transposed linear layer .*does not compute x @ weight \+ bias"
    with pytest.warns(UserWarning, match=reason):
        handle = lg.attach(model, KFAC_K(model.parameters()))
    assert torch.equal(torch.get_rng_state(), state)  # the probe's dropout drew nothing
    assert not handle.blocks and handle.coverage.share == 0.0
    assert re.search(reason, handle.coverage.fallback[0])


def test_structure_mismatches_are_not_recognized():
    class Wrapped(nn.Module):  # not a leaf
        def __init__(self):
            super().__init__()
            self.nf, self.weight, self.inner = N_OUT, nn.Parameter(torch.randn(N_IN, N_OUT)), None
            self.inner = nn.Identity()

        def forward(self, x):
            return self.inner(x @ self.weight)

    wrong_nf = HFStyleConv1D(N_OUT, N_IN)
    wrong_nf.nf = N_IN  # (in, out) but says out = in
    extra = HFStyleConv1D(N_OUT, N_IN)
    extra.scale = nn.Parameter(torch.ones(()))
    for layer in (wrong_nf, extra, Wrapped()):
        with pytest.warns(UserWarning, match="no Kronecker block"):
            handle = lg.attach(layer, KFAC_K(layer.parameters()))
        assert not handle.blocks


def test_a_registration_takes_precedence_over_the_structure():
    layer = HFStyleConv1D(N_OUT, N_IN)
    lg.register_block(HFStyleConv1D, lambda m, n, t: None)
    try:
        with pytest.warns(UserWarning, match="no Kronecker block"):
            handle = lg.attach(layer, KFAC_K(layer.parameters()))
        assert not handle.blocks
        handle.remove()
    finally:
        lg.unregister_block(HFStyleConv1D)
    assert set(lg.attach(layer, KFAC_K(layer.parameters())).blocks) == {""}


def test_hooks_of_the_module_do_not_run_at_attach():
    layer = HFStyleConv1D(N_OUT, N_IN)
    calls = []
    layer.register_forward_hook(lambda *args: calls.append(1))
    lg.attach(layer, KFAC_K(layer.parameters()))
    assert not calls


@pytest.mark.parametrize("cls", [lg.KFAC, lg.RING, lg.RENG, lg.RKalman])
def test_every_optimizer_trains_a_transposed_layer(cls):
    torch.manual_seed(0)
    model = nn.Sequential(HFStyleConv1D(8, N_IN), nn.Tanh(), HFStyleConv1D(2, 8))
    opt = cls(model.parameters(), lr=0.01)
    handle = lg.attach(model, opt)
    assert handle.coverage.share == 1.0
    x, y = torch.randn(16, N_IN), torch.randint(0, 2, (16,))
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward(create_graph=isinstance(opt, lg.RENG))
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
