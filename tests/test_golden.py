"""Golden trajectories (``tests/golden/trajectories.py``): every optimizer × route replays the
30 float64 steps recorded before the core was restructured, to within 1e-8.

The tolerance is rounding across machines: float64 BLAS kernels differ per CPU instruction set
in the last bits, and 30 steps through eigendecompositions and K-FAC's inverses grow that. On
the machine of the recording they agreed to 1e-12; on another (2026-12-06) the worst case was
3.3e-10 (RENG, kfac mode) and every other case ≤ 5.5e-12. A change of the math itself moves
these trajectories by orders of magnitude more."""

from __future__ import annotations

import pytest
import torch

from tests.golden.trajectories import CASES, PATH, run

GOLDEN = torch.load(PATH)


@pytest.mark.parametrize("name", sorted(CASES))
def test_trajectory_unchanged(name: str) -> None:
    weights = run(name)
    assert len(weights) == len(GOLDEN[name])
    for got, want in zip(weights, GOLDEN[name], strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=0.0, atol=1e-8)
