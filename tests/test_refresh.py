"""Issue 22: eigenbasis upkeep without a full eigh (``refresh="warm"``) and the first refresh
spread over the staggered slots (``stagger_first``).

Float64: orthogonal iteration from a previous basis converges to eigh's basis, its drift
measure (the relative off-diagonal mass of ``Qᵀ F Q``) is 0 for an exact eigenbasis, a drifted
side gets a full eigh at its next refresh, and a warm step from an exact basis equals the dense
eigen step. Decompositions are counted, never timed.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from conftest import backward, dense_eigen_steps
from torch import Tensor, nn

import lightning_grng as lg
from lightning_grng.curvature import inverse
from lightning_grng.curvature.kronecker import KroneckerFactors
from lightning_grng.diagnostics import SyncCounter
from lightning_grng.optim import routes
from lightning_grng.optim.routes import Due, WarmEigenRoute

F64 = torch.float64
# K-FAC statistics: the dense references below are built from the captured A and G.
EIGEN = dict(
    preconditioner="eigen", kl_clip=None, momentum=0.0, curvature="kfac", momentum_on="direction"
)


def _orthogonal(n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]


def _spd(n: int, seed: int, ratio: float = 1.5) -> Tensor:
    """SPD with well-separated eigenvalues ``ratio^k`` in a random basis."""
    Q = _orthogonal(n, seed)
    return Q @ torch.diag(ratio ** torch.arange(n, dtype=F64)) @ Q.T


# ---------------------------------------------------------------------------- the math
def test_repeated_warm_refreshes_converge_to_the_eigh_basis():
    M = torch.stack([_spd(8, 1), _spd(8, 2)])
    evals, evecs = torch.linalg.eigh(M)
    Q = torch.eye(8, dtype=F64).expand_as(M).clone()
    for _ in range(120):
        d, Q, _ = inverse.warm_eigh(M, Q)
    # Columns sorted largest first: |Qᵀ Q_eigh| is the order-reversing permutation.
    overlap = (Q.transpose(-1, -2) @ evecs).abs()
    flipped = torch.eye(8, dtype=F64).flip(-1).expand_as(M)
    torch.testing.assert_close(overlap, flipped, rtol=0, atol=1e-8)
    torch.testing.assert_close(d, evals.flip(-1), rtol=1e-10, atol=0)
    # Projectors agree as well (a basis-free statement).
    torch.testing.assert_close(Q @ Q.transpose(-1, -2), torch.eye(8, dtype=F64).expand_as(M))


def test_drift_is_zero_for_an_exact_eigenbasis_in_any_order_and_sign():
    M = _spd(7, 3)[None]
    _, Q = torch.linalg.eigh(M)
    signs = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, -1.0, 1.0], dtype=F64)
    shuffled = Q[..., torch.tensor([3, 0, 6, 1, 5, 2, 4])] * signs
    for basis in (Q, shuffled):
        _, evecs, drift = inverse.warm_eigh(M, basis)
        assert float(drift.max()) < 1e-14
        # One warm step from an exact basis keeps it (sorted, signs fixed): nothing moves.
        torch.testing.assert_close(
            (evecs.transpose(-1, -2) @ Q).abs().sum(-1), torch.ones(1, 7, dtype=F64)
        )


def test_drift_is_the_relative_off_diagonal_mass():
    M = _spd(9, 4)[None]
    Q = _orthogonal(9, 5)[None]
    _, _, drift = inverse.warm_eigh(M, Q)
    rotated = Q.transpose(-1, -2) @ M @ Q
    off = rotated - torch.diag_embed(torch.diagonal(rotated, dim1=-2, dim2=-1))
    expected = torch.linalg.matrix_norm(off) / torch.linalg.matrix_norm(rotated)
    torch.testing.assert_close(drift, expected, rtol=1e-12, atol=0)
    assert float(drift) > 0.3  # an unrelated basis is far off


def test_batched_warm_start_matches_one_call_per_factor():
    pairs = [
        (_spd(5, 6)[None], _orthogonal(5, 7)[None]),
        (_spd(3, 8)[None], _orthogonal(3, 9)[None]),
    ]
    pairs.append((torch.stack([_spd(5, 10), _spd(5, 11)]), torch.stack([_orthogonal(5, 12)] * 2)))
    batched = inverse.batched_warm_eigh(pairs)
    for (M, Q), got in zip(pairs, batched, strict=True):
        for a, b in zip(got, inverse.warm_eigh(M, Q), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_a_non_finite_previous_basis_restarts_from_the_identity():
    M = _spd(4, 13)[None]
    Q = torch.full((1, 4, 4), math.nan, dtype=F64)
    evals, evecs, _ = inverse.warm_eigh(M, Q)
    assert torch.isfinite(evecs).all() and torch.isfinite(evals).all()


# ---------------------------------------------------------------------------- the route
class _Counter:
    """Wraps a decomposition function and records the matrices of each call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, matrices, *args, **kwargs):
        self.calls.append(
            [tuple(m.shape) for m in (x[0] if isinstance(x, tuple) else x for x in matrices)]
        )
        return self.fn(matrices, *args, **kwargs)


@pytest.fixture
def counted(monkeypatch):
    """``(eigh, warm)`` counters around the routes' batched decompositions."""
    eigh = _Counter(routes.batched_spd_eigh)
    warm = _Counter(routes.batched_warm_eigh)
    monkeypatch.setattr(routes, "batched_spd_eigh", eigh)
    monkeypatch.setattr(routes, "batched_warm_eigh", warm)
    return eigh, warm


def _due(f: KroneckerFactors) -> list[Due]:
    return [Due(None, f, None)]  # type: ignore[arg-type]  (the eigh routes read neither)


def test_a_drifted_side_gets_a_full_eigh_at_its_next_refresh(counted):
    eigh, warm = counted
    route = WarmEigenRoute(beta2=0.9, power=0.5, newton_iters=1)
    f = KroneckerFactors(F64)
    A, G = _spd(6, 14), _spd(4, 15)
    f.update(A[None], G[None], 0.0)
    route.refresh(_due(f), None)
    assert eigh.calls == [[(1, 6, 6), (1, 4, 4)]] and f.drifted == (None, None, None)  # first: eigh
    route.refresh(_due(f), None)
    assert len(eigh.calls) == 1 and warm.calls == [[(1, 6, 6), (1, 4, 4)]]
    assert not bool(f.drifted[0]) and not bool(f.drifted[1])
    # A turns into an unrelated matrix (same spectrum, another basis); G stays.
    f.update(_spd(6, 16)[None], G[None], 0.0)
    route.refresh(_due(f), None)
    assert bool(f.drifted[0]) and not bool(f.drifted[1])
    f.full_next = [bool(f.drifted[0]), bool(f.drifted[1]), False]  # what the read-back does
    route.refresh(_due(f), None)
    assert eigh.calls[-1] == [(1, 6, 6)] and warm.calls[-1] == [(1, 4, 4)]
    assert f.drifted[0] is None and f.full_next == [False, False, False]


@pytest.mark.parametrize("name", ["KFAC", "RING"])
def test_warm_step_equals_the_dense_eigen_step_when_the_basis_is_exact(name, counted):
    """Statistics once, a refresh every step: after the first (eigh) every refresh is warm from
    an exact basis, so every step equals the dense ``Q (D + γ + ρ r²)^-½ Qᵀ g``."""
    rho = 0.3 if name == "RING" else 0.0
    kw = dict(EIGEN, lr=0.05, damping=1e-2, beta2=0.9, curvature_every=1000, inverse_every=1)
    if name == "RING":
        kw["rho"] = rho
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 3)).double()
    opt = getattr(lg, name)(model.parameters(), refresh="warm", **kw)
    assert isinstance(opt.route, WarmEigenRoute)
    lg.attach(model, opt)
    g = torch.Generator().manual_seed(11)
    grads, before = [], [_weights(model)]
    for _ in range(5):
        x = torch.randn(8, 5, generator=g, dtype=F64)
        y = torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grads.append(torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1).clone())
        opt.step()
        before.append(_weights(model))
    eigh, warm = counted
    assert len(eigh.calls) == 1 and len(warm.calls) == 4
    f = opt.factors("0")
    assert f.full_next == [False, False, False]
    dense = _dense_eigen_steps(f.A[0], f.G[0], grads, 0.05, 0.9, 1e-2, rho)
    for t, step in enumerate(dense):
        torch.testing.assert_close(before[t + 1] - before[t], step, rtol=1e-9, atol=1e-12)


def _weights(model: nn.Module) -> Tensor:
    lin = model[0]
    return torch.cat([lin.weight.detach(), lin.bias.detach()[:, None]], 1)


def _dense_eigen_steps(A, G, grads, lr, beta2, damping, rho=0.0):
    """:func:`conftest.dense_eigen_steps` in the eigenbases of ``A`` and ``G``, RING's
    diagonal GR curvature ``ρ r∘r``."""
    QA, QG = torch.linalg.eigh(A)[1], torch.linalg.eigh(G)[1]
    return dense_eigen_steps(QA, QG, grads, lr, beta2, damping, gr=lambda d, r: rho * r * r)


# ---------------------------------------------------------------------------- the optimizer
def _mlp(widths=(6, 8, 8, 8, 8, 8, 4)) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def _train(opt_factory, model: nn.Module, steps: int, on_step=None, dtype=None, skip=0):
    """``steps`` steps on seeded batches (the first ``skip`` batches drawn but not used)."""
    opt = opt_factory(model.parameters())
    lg.attach(model, opt, report=False)
    g = torch.Generator().manual_seed(3)
    for step in range(steps):
        x = torch.randn(16, model[0].in_features, generator=g, dtype=dtype)
        y = torch.randint(0, model[-1].out_features, (16,), generator=g)
        if step < skip:
            continue
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        backward(loss, opt)
        opt.step()
        if on_step is not None:
            on_step(opt)
    return opt


@pytest.mark.parametrize("refresh", ["eigh", "warm"])
def test_stagger_first_spreads_the_first_decompositions(refresh, counted):
    """B = 6 blocks, T = 4: at most ceil(B/T) = 2 blocks (4 factors) are decomposed in any
    step (counted by wrapping the batched eigh), and every block has its first decomposition
    within T steps, on its slot."""
    eigh, _ = counted
    per_step: list[int] = []  # factors decomposed per step (A and G of each block)
    seen = [0]

    def count(_opt) -> None:
        per_step.append(sum(len(c) for c in eigh.calls[seen[0] :]))
        seen[0] = len(eigh.calls)

    B, T = 6, 4
    kw = dict(curvature_every=1, inverse_every=T, refresh=refresh)
    opt = _train(lambda p: lg.KFAC(p, stagger_first=1, **kw), _mlp(), 3 * T, count)
    assert max(per_step) <= 2 * math.ceil(B / T), per_step
    assert sum(per_step[:T]) == 2 * B, per_step
    assert all(torch.isfinite(p).all() for p in opt.param_groups[0]["params"])

    eigh.calls.clear()
    per_step.clear()
    seen[0] = 0
    _train(lambda p: lg.KFAC(p, **kw), _mlp(), 1, count)
    assert per_step == [2 * B]  # the control: without the option, all at once


def test_a_stand_in_basis_is_the_identity_until_the_slot():
    """Block 3 of 6 (T = 4) has its slot at step 2: until then its basis is the identity with
    the factors' diagonals as eigenvalues; from step 2 on it is the eigh basis."""
    opt = _train(
        lambda p: lg.KFAC(p, curvature_every=1000, inverse_every=4, stagger_first=1),
        _mlp(),
        1,
    )
    f = opt.factors("6")  # the fourth Linear: offset 3·4 // 6 = 2
    torch.testing.assert_close(f.evec_A, torch.eye(9).expand_as(f.evec_A))
    torch.testing.assert_close(f.eval_A, torch.diagonal(f.A, dim1=-2, dim2=-1))
    assert f.full_next == [True, True, True]


@pytest.mark.parametrize(
    "make",
    [
        lambda p: lg.KFAC(p, refresh="warm", curvature_every=2, inverse_every=3),
        lambda p: lg.RING(p, refresh="warm", stagger_first=8, curvature_every=2, inverse_every=3),
        lambda p: lg.RENG(p, refresh="warm", max_factor=7, curvature_every=2, inverse_every=3),
        lambda p: lg.KFAC(p, stagger_first=1, max_factor=8, curvature_every=2, inverse_every=3),
    ],
)
def test_the_new_options_keep_one_host_sync_per_step(make):
    """Drift flags are read with the step's one read-back (every step refreshes some block)."""
    counts = []
    model = _mlp()
    opt = make(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lg.attach(model, opt, report=False)
    g = torch.Generator().manual_seed(5)
    for _ in range(8):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 4, (16,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward(create_graph=isinstance(opt, lg.RENG))
        with SyncCounter() as counter:
            opt.step()
        counts.append(counter.total)
    assert max(counts) <= 1, counts


def test_warm_refresh_is_refused_outside_the_eigen_mode():
    params = nn.Linear(2, 2).parameters()
    with pytest.raises(ValueError, match="refresh='warm' keeps the eigen mode's eigenbasis"):
        lg.KFAC(params, preconditioner="kfac", refresh="warm")
    with pytest.raises(ValueError, match="invalid refresh='sometimes'"):
        lg.KFAC(nn.Linear(2, 2).parameters(), refresh="sometimes")


def test_defaults_stagger_wide_first_decompositions_in_the_eigen_mode():
    """The eigen mode's full-eigh route spreads the first decompositions of blocks with
    factors 512 wide or more; factors over 2048 diagonal (the eigen mode's cap,
    tests/test_size_policy.py). The kfac mode staggers nothing."""
    opt = lg.RING(nn.Linear(2, 2).parameters())
    assert type(opt.route) is routes.EigenRoute
    assert opt.stagger_first == 512 and opt.max_factor == 2048
    opt = lg.RING(nn.Linear(2, 2).parameters(), stagger_first=10**6)
    assert opt.stagger_first == 10**6
    kfac = lg.KFAC(nn.Linear(2, 2).parameters(), preconditioner="kfac")
    assert type(kfac.route) is routes.EighRoute and kfac.stagger_first is None


class _EmbeddingNet(nn.Module):
    """Blocks in registration order (staggered offsets 0, 1, 2 of T = 4): a narrow Linear, a
    40-row embedding (its input factor diagonal, its output factor 2 wide) and a head whose
    output factor is 40 wide."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 8)
        self.emb = nn.Embedding(40, 2)
        self.head = nn.Linear(8, 40)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.relu(self.first(self.emb(ids).flatten(1))))


def test_stagger_first_counts_only_the_factors_a_refresh_decomposes():
    """stagger_first=10 at the first step: the embedding (off its slot) decomposes only its
    2-wide output factor, so it gets its eigenbasis at once; the head (off its slot, a 40-wide
    output factor) takes the stand-in basis until its slot."""
    model = _EmbeddingNet()
    opt = lg.KFAC(model.parameters(), stagger_first=10, curvature_every=1, inverse_every=4)
    lg.attach(model, opt, report=False)
    ids, y = torch.randint(0, 40, (8, 3)), torch.randint(0, 40, (8,))
    opt.zero_grad()
    nn.functional.cross_entropy(model(ids), y).backward()
    opt.step()
    first, embedding, head = (opt.factors(k) for k in opt._blocks)
    assert embedding.a_is_diagonal and embedding.A.shape[-1] == 40
    assert not any(first.full_next) and not any(embedding.full_next)
    assert head.full_next == [True, True, True]
    torch.testing.assert_close(head.evec_G, torch.eye(40).expand_as(head.evec_G))


def test_a_resumed_run_keeps_its_pending_full_decompositions():
    """A checkpoint taken while stand-in bases wait for their slot (and warm bases are kept)
    resumes into exactly the uninterrupted run."""
    kw = dict(refresh="warm", stagger_first=1, curvature_every=1, inverse_every=4)
    straight = _mlp().double()
    _train(lambda p: lg.KFAC(p, **kw), straight, 8, dtype=F64)

    first = _mlp().double()
    opt = _train(lambda p: lg.KFAC(p, **kw), first, 2, dtype=F64)
    saved = opt.state_dict()
    assert any("full_next" in b for b in saved["grng"]["blocks"].values())
    resumed = _mlp().double()
    resumed.load_state_dict(first.state_dict())
    opt2 = lg.KFAC(resumed.parameters(), **kw)
    opt2.load_state_dict(saved)
    _train(lambda p: opt2, resumed, 8, dtype=F64, skip=2)
    for a, b in zip(resumed.parameters(), straight.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
