"""Shared helpers: small models and *independent* dense references (no hooks involved)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn


@pytest.fixture(autouse=True)
def _seed_and_quiet():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        yield


def backward(loss: Tensor, opt: torch.optim.Optimizer) -> None:
    """The backward pass an optimizer needs: RENG's through the gradient's graph
    (``regularized_backward``), any other a plain ``loss.backward()``."""
    import lightning_grng as lg

    if isinstance(opt, lg.RENG):
        lg.regularized_backward(loss, opt)
    else:
        loss.backward()


def mlp(dtype: torch.dtype = torch.float64, d_in: int = 5, hidden: int = 4, d_out: int = 3):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).to(dtype)


def classification_batch(n: int = 8, d_in: int = 5, classes: int = 3, dtype=torch.float64):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, d_in, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def vec(M: Tensor) -> Tensor:
    """Column-major vec, so that (A ⊗ G) vec(V) = vec(G V Aᵀ)."""
    return M.transpose(-1, -2).reshape(-1)


def unvec(v: Tensor, rows: int, cols: int) -> Tensor:
    return v.reshape(cols, rows).transpose(0, 1)


def sequential_reference(model: nn.Sequential, x: Tensor, y: Tensor, reduction: str = "mean"):
    """Per-Linear-layer inputs, output gradients and parameter gradients of a plain
    cross-entropy backward, computed by running the layers by hand (no hooks)."""
    inputs, outputs = [], []
    h = x
    for layer in model:
        if isinstance(layer, nn.Linear):
            inputs.append(h.detach())
            h = nn.functional.linear(h, layer.weight, layer.bias)  # bypasses module hooks
            h.retain_grad()
            outputs.append(h)
        else:
            h = layer(h)
    loss = nn.functional.cross_entropy(h, y, reduction=reduction)
    model.zero_grad()
    loss.backward()
    refs = []
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for layer, a, s in zip(linears, inputs, outputs, strict=True):
        a_bar = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
        B = a.shape[0]
        A = a_bar.T @ a_bar / B
        G = s.grad.T @ s.grad * (B if reduction == "mean" else 1)
        V = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
        refs.append((A, G, V.clone()))
    model.zero_grad()
    return loss, refs


def dense_kfac_update(A: Tensor, G: Tensor, V: Tensor, damping: float) -> Tensor:
    """``(A ⊗ G + γI)⁻¹ vec(V)`` with the explicit dense Kronecker product."""
    n = A.shape[0] * G.shape[0]
    M = torch.kron(A, G) + damping * torch.eye(n, dtype=A.dtype)
    return unvec(torch.linalg.solve(M, vec(V)), V.shape[0], V.shape[1])


def layer_matrices(model: nn.Sequential) -> list[Tensor]:
    return [
        torch.cat([m.weight.detach(), m.bias.detach()[:, None]], 1)
        for m in model
        if isinstance(m, nn.Linear)
    ]


def small_cnn(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Conv2d, LayerNorm (a fallback layer), in-place ReLU and two Linear layers on 6×6 images."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.LayerNorm(4 * 6 * 6),
        nn.Linear(4 * 6 * 6, 16),
        nn.ReLU(inplace=True),
        nn.Linear(16, 3),
    ).to(dtype)


def teacher_data(n: int = 256, dtype: torch.dtype = torch.float32):
    """6×6 images labelled by a fixed random linear teacher (3 classes): learnable."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 6, 6, generator=g, dtype=dtype)
    w = torch.randn(36, 3, generator=g, dtype=dtype)
    return x, (x.flatten(1) @ w).argmax(1)


def dense_eigen_steps(QA: Tensor, QG: Tensor, grads, lr, beta2, damping, power=0.5, gr=None):
    """The eigen mode with the explicit Kronecker basis ``Q = Q_A ⊗ Q_G``: ``r = Qᵀ vec(V)``,
    ``d`` the bias-corrected EMA of ``r²``, ``u = Q (d + λ·mean(d) + gr(d, r))^-p r`` (``gr``:
    the GR curvature of the optimizer under test, None for none)."""
    Q = torch.kron(QA.contiguous(), QG.contiguous())
    m = torch.zeros(Q.shape[0], dtype=QA.dtype)
    steps = []
    for t, V in enumerate(grads, start=1):
        r = Q.T @ vec(V)
        m = beta2 * m + (1 - beta2) * r * r
        d = m / (1 - beta2**t)
        curvature = d + damping * d.mean()
        if gr is not None:
            curvature = curvature + gr(d, r)
        steps.append(-lr * unvec(Q @ (r * curvature ** (-power)), *V.shape))
    return steps
