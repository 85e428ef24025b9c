"""``one_sided``: each weight preconditioned on one side only ('input': A; 'narrower': the
narrower side), the other side's factor kept as its diagonal (eigenbasis the identity). Float64
against the dense eigen step with the basis ``I ⊗ Q_G`` (or ``Q_A ⊗ I``), which side each rule
keeps, that split convolutions and embeddings are left alone, the state bound of 'narrower',
and the refusals.
"""

from __future__ import annotations

import pytest
import torch
from conftest import dense_eigen_steps
from torch import Tensor, nn

import lightning_grng as lg
from benchmarks.optimizers import _tensor_bytes
from examples.models import CharTransformer, ImageClassifier

F64 = torch.float64
ONE_STEP_BASIS = dict(kl_clip=None, momentum=0.0, lr=0.05, damping=1e-2, beta2=0.9)
ONE_STEP_BASIS |= dict(curvature_every=1, inverse_every=1000, momentum_on="direction")


def _train(model: nn.Module, batches, **kw):
    """Trains ``model`` (its first module a Linear) with KFAC; returns the optimizer, the
    gradients ``[W | b]`` and the weights ``[W | b]`` after each step."""
    opt = lg.KFAC(model.parameters(), **kw)
    lg.attach(model, opt, report=False)
    lin = model[0]

    def weights() -> Tensor:
        return torch.cat([lin.weight.detach(), lin.bias.detach()[:, None]], 1)

    grads, seen = [], [weights()]
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grads.append(torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1).clone())
        opt.step()
        seen.append(weights())
    return opt, grads, seen


def _layer(d_in: int, d_out: int) -> nn.Sequential:
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(d_in, d_out)).double()


def _batches(d_in: int, classes: int, steps: int = 5) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(11)
    return [
        (torch.randn(8, d_in, generator=g, dtype=F64), torch.randint(0, classes, (8,), generator=g))
        for _ in range(steps)
    ]


#: (rule, d_in, d_out, kept side, curvature sources). 'input' keeping the wider side is run with
#: K-FAC statistics only: a gradient's A = VᵀV (6 wide, rank 3) is rank-deficient on step 0,
#: and the route's basis of its null space is the settled one (tested against the dense
#: reference in test_gradient_source.py), not the raw eigh basis this test builds.
CASES = [
    ("narrower", 5, 3, "G", ("kfac", "gradient")),
    ("narrower", 2, 6, "A", ("kfac", "gradient")),
    ("narrower", 3, 4, "A", ("kfac", "gradient")),
    ("input", 5, 3, "A", ("kfac",)),
    ("input", 2, 6, "A", ("kfac", "gradient")),
]


@pytest.mark.parametrize(
    ("rule", "d_in", "d_out", "dense", "curvature"),
    [(*case[:4], source) for case in CASES for source in case[4]],
)
def test_the_kept_side_and_the_step_is_the_dense_one(curvature, rule, d_in, d_out, dense):
    """A is d_in + 1 wide (bias), G d_out. 'narrower' keeps the narrower side's factor and
    basis (the input side on a tie, 4 = 4), 'input' keeps A; the other side is diagonal. With
    the basis fixed after step 0 every step is the dense eigen step with Q = Q_A ⊗ I (or
    I ⊗ Q_G)."""
    kw = dict(ONE_STEP_BASIS, curvature=curvature)
    batches = _batches(d_in, d_out)
    opt, grads, weights = _train(_layer(d_in, d_out), batches, one_sided=rule, **kw)
    f = opt.factors("0")
    assert (f.A.dim(), f.G.dim()) == ((3, 2) if dense == "A" else (2, 3))
    kept_basis = (f.evec_A is not None, f.evec_G is not None)
    assert kept_basis == ((True, False) if dense == "A" else (False, True))
    # After one step (same weights, same statistics) the diagonal side is the diagonal of the
    # factor a two-sided run holds, and the kept basis is the eigenbasis of the kept factor.
    first, _, _ = _train(_layer(d_in, d_out), batches[:1], one_sided=rule, **kw)
    both, _, _ = _train(_layer(d_in, d_out), batches[:1], **kw)
    diagonal, full = (
        (first.factors("0").G, both.factors("0").G)
        if dense == "A"
        else (first.factors("0").A, both.factors("0").A)
    )
    torch.testing.assert_close(diagonal, torch.diagonal(full, dim1=-2, dim2=-1))
    eye_A, eye_G = torch.eye(d_in + 1, dtype=F64), torch.eye(d_out, dtype=F64)
    if dense == "A":
        QA, QG = torch.linalg.eigh(first.factors("0").A[0])[1], eye_G
    else:
        QA, QG = eye_A, torch.linalg.eigh(first.factors("0").G[0])[1]
    for t, step in enumerate(dense_eigen_steps(QA, QG, grads, 0.05, 0.9, 1e-2)):
        torch.testing.assert_close(weights[t + 1] - weights[t], step, rtol=1e-9, atol=1e-12)


def _steps(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, n: int = 3):
    lg.attach(model, opt, report=False)
    for _ in range(n):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_split_convolutions_and_embeddings_are_unchanged_bit_for_bit():
    """A split conv's input side is per dimension already and an embedding's A is diagonal
    already: either rule leaves both blocks, and their steps, exactly as they were."""

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Unflatten(1, (4, 16))).double()

    x, y = torch.randn(6, 3, 6, 6, dtype=F64), torch.randint(0, 4, (6, 16))
    convs = []
    for one_sided in (None, "narrower", "input"):
        model = net()
        opt = lg.RING(model.parameters(), split_conv=1, one_sided=one_sided, inverse_every=1)
        _steps(model, opt, x, y)
        convs.append(model[0].weight.detach().clone())
        assert opt.factors("0").K is not None and opt.factors("0").G.dim() == 3
    for conv in convs[1:]:
        torch.testing.assert_close(conv, convs[0], rtol=0, atol=0)

    tokens = torch.randint(0, 50, (4, 7))
    embedded = []
    for one_sided in (None, "narrower", "input"):
        torch.manual_seed(1)
        table = nn.Embedding(50, 6).double()
        opt = lg.RING(table.parameters(), one_sided=one_sided, inverse_every=1)
        lg.attach(table, opt, report=False)
        for _ in range(3):
            opt.zero_grad()
            table(tokens).pow(2).sum().backward()
            opt.step()
        embedded.append(table.weight.detach().clone())
        assert opt.factors(next(iter(opt.blocks))).G.dim() == 3
    for table in embedded[1:]:
        torch.testing.assert_close(table, embedded[0], rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:RING. no Kronecker block")
@pytest.mark.parametrize("which", ["shakespeare", "cnn"])
def test_state_is_at_most_four_times_the_parameters_on_the_benchmark_models(which):
    """The benchmark models' square-ish dense blocks hold 9-12x their parameters in state with
    both sides (factor + basis per side, and two moments); the narrower side alone keeps it
    under 4x, by construction (factor and basis of the narrower side are each at most the
    weight)."""
    g = torch.Generator().manual_seed(0)
    if which == "shakespeare":
        x, y = torch.randint(0, 65, (4, 16), generator=g), torch.randint(0, 65, (64,), generator=g)
    else:
        x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
    ratios = {}
    for one_sided in (None, "narrower"):
        torch.manual_seed(0)
        if which == "shakespeare":
            model = CharTransformer(65, seq_len=16, dim=64, depth=2, heads=4)
        else:
            model = ImageClassifier(10, width=16, hidden=64).net
        opt = lg.RING(model.parameters(), one_sided=one_sided, inverse_every=1)
        lg.attach(model, opt, report=False)
        for _ in range(2):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x).flatten(0, -2), y).backward()
            opt.step()
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        ratios[one_sided] = _tensor_bytes(opt.state_dict()) / params
    assert ratios[None] > 8 and ratios["narrower"] <= 4, ratios


def test_a_one_sided_checkpoint_refuses_a_two_sided_optimizer():
    kw = dict(ONE_STEP_BASIS)
    opt, _, _ = _train(_layer(5, 3), _batches(5, 3, steps=2), one_sided="narrower", **kw)
    saved = opt.state_dict()
    model = _layer(5, 3)
    fresh = lg.KFAC(model.parameters(), one_sided="narrower", **kw)
    fresh.load_state_dict(saved)
    lg.attach(model, fresh, report=False)
    assert fresh.factors("0").A.shape == (1, 6)
    other = _layer(5, 3)
    two_sided = lg.KFAC(other.parameters(), **kw)
    lg.attach(other, two_sided, report=False)
    with pytest.raises(ValueError, match="shape"):
        two_sided.load_state_dict(saved)


def test_one_sided_is_refused_where_it_cannot_act():
    params = nn.Linear(2, 2).parameters
    with pytest.raises(ValueError, match=r"one_sided='input' .* Newton–Schulz"):
        lg.RING(params(), preconditioner="kfac", one_sided="input")  # RING's kfac mode: Newton
    with pytest.raises(ValueError, match="one_sided='output'; allowed: one of 'input', 'narrower'"):
        lg.KFAC(params(), one_sided="output")
    assert lg.KFAC(params(), preconditioner="kfac", one_sided="input").one_sided.value == "input"
    assert lg.RING(params()).one_sided is None
