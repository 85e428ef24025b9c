"""Golden trajectories (``tests/golden/trajectories.py``): every optimizer × route replays the
30 float64 steps recorded before the core was restructured, to within 1e-12."""

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
        torch.testing.assert_close(got, want, rtol=0.0, atol=1e-12)
