"""Property 4: Newton–Schulz inverse (residual squaring, warm starts, accuracy, fallback)."""

from __future__ import annotations

import itertools

import pytest
import torch

from lightning_grng.curvature.inverse import newton_schulz_inverse, spd_eigh


def _spd(n: int, cond: float, seed: int = 0, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=torch.float64))
    evals = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
    return Q @ torch.diag_embed(evals.expand(batch, n)) @ Q.transpose(-1, -2)


def test_residual_squares_every_iteration():
    M = _spd(12, cond=50.0)
    eye = torch.eye(12, dtype=M.dtype)
    residuals = []
    for k in range(1, 12):
        res = newton_schulz_inverse(M, max_iters=k, tol=0.0)
        residuals.append(torch.linalg.matrix_norm(eye - res.inverse @ M, ord=2).max().item())
    # Spectral residual r_{k+1} = r_k² (up to rounding) once below 1.
    for r0, r1 in itertools.pairwise(residuals):
        if 1e-7 < r0 < 1.0:
            assert abs(r1 - r0**2) <= 1e-9 + 1e-6 * r0**2


def test_converges_to_inverse():
    M = _spd(20, cond=1e4)
    res = newton_schulz_inverse(M, max_iters=60)
    assert not res.warm
    torch.testing.assert_close(res.inverse, torch.linalg.inv(M), rtol=1e-8, atol=1e-8)
    assert res.residual <= 1e-10
    # symmetric positive definite result
    torch.testing.assert_close(res.inverse, res.inverse.transpose(-1, -2), rtol=0, atol=1e-12)
    assert torch.linalg.eigvalsh(res.inverse).min() > 0


@pytest.mark.parametrize(
    "n,batch,damping,most", [(16, 64, 0.1, 3), (64, 128, 0.01, 3), (256, 128, 0.1, 4)]
)
def test_warm_start_converges_in_three_iterations_after_one_ema_step(n, batch, damping, most):
    """A damped EMA factor after one more EMA step: the previous inverse is accepted as warm
    start and reaches ‖I − XM‖_F <= 1e-6 in <= 3 iterations (4 for the 256-wide factor, where
    the Frobenius norm sums 256 residual eigenvalues), against 10+ cold."""
    g = torch.Generator().manual_seed(n)
    L = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5

    def batch_factor():
        x = torch.randn(batch, n, generator=g, dtype=torch.float64) @ L
        return x.T @ x / batch

    A = batch_factor()
    for _ in range(50):
        A = 0.95 * A + 0.05 * batch_factor()
    eye = torch.eye(n, dtype=torch.float64)
    previous = torch.linalg.inv(A + damping * eye)
    A_next = 0.95 * A + 0.05 * batch_factor() + damping * eye
    res = newton_schulz_inverse(A_next, initial=previous, max_iters=20, tol=1e-6)
    cold = newton_schulz_inverse(A_next, max_iters=60, tol=1e-6)
    assert res.warm
    assert res.iterations <= most < cold.iterations
    torch.testing.assert_close(res.inverse, torch.linalg.inv(A_next), rtol=1e-5, atol=1e-6)


def test_bad_warm_start_falls_back_to_cold_start():
    M = _spd(8, cond=10.0)
    res = newton_schulz_inverse(M, initial=-torch.eye(8, dtype=M.dtype).expand_as(M).clone())
    assert not res.warm
    torch.testing.assert_close(res.inverse, torch.linalg.inv(M), rtol=1e-8, atol=1e-8)


def test_low_precision_input_is_inverted_in_float32():
    M = _spd(8, cond=10.0).to(torch.bfloat16)
    res = newton_schulz_inverse(M)
    assert res.inverse.dtype == torch.bfloat16
    assert res.residual < 1e-3  # measured in float32


def test_eigh_clamps_and_is_float32_or_better():
    M = torch.zeros(1, 4, 4, dtype=torch.float16)
    M[0, 0, 0] = 1.0
    evals, evecs = spd_eigh(M)
    assert evals.dtype == torch.float32 and evecs.dtype == torch.float32
    assert evals.min() >= 0
