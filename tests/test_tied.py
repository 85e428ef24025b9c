"""Tied weights: an embedding tied to an output layer gets ONE block fed by both uses.

The references are dense and hook-free: the two uses' inputs and output gradients come from a
hand-written forward (``F.embedding``/``F.linear`` on the shared weight, ``retain_grad``), the
Fisher sum ``Σ D_k ⊗ S_k`` is formed as a dense ``(vocab·d)²`` matrix and its partial traces
are taken by ``einsum`` on it (``docs/algorithms.md`` §1, "Tied weights: one block, two uses").
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lightning_grng as lg
from lightning_grng.curvature import TiedEmbeddingBlock
from lightning_grng.diagnostics import SyncCounter

V, D = 7, 4  # vocabulary, width


class TiedLM(nn.Module):
    """embedding → tanh(linear) → head, the head's weight tied to the embedding's."""

    def __init__(self, head_bias: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.mid = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=head_bias)
        self.head.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mid(self.emb(ids))))


class SoftLookup(nn.Module):
    """A transposed linear layer ``x @ W`` (Hugging Face's Conv1D: ``nf``, ``nx``)."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = None

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight


class SoftTiedModel(nn.Module):
    """The embedding's weight also maps a distribution over the vocabulary back to the width."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.mid = nn.Linear(D, V)
        self.soft = SoftLookup(V, D)
        self.soft.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.soft(torch.softmax(self.mid(self.emb(ids)), -1))


def _model(cls: type[nn.Module] = TiedLM, **kwargs) -> nn.Module:
    torch.manual_seed(3)
    return cls(**kwargs).double()


def _batch(seed: int = 0, batch: int = 3, length: int = 6) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (batch, length), generator=g)
    return ids, torch.randint(0, V, (batch, length), generator=g)


def _lm_loss(model: nn.Module, ids: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(ids).reshape(-1, V), y.reshape(-1))


def _attach(model: nn.Module, opt) -> lg.CurvatureHandle:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no tied-weight warning
        return lg.attach(model, opt)


def _tied_key(opt, model: nn.Module) -> str:
    (key,) = [k for k, b in opt.blocks.items() if b.weight is model.emb.weight]
    return key


# ---------------------------------------------------------------------- the dense reference
def _lm_terms(model: TiedLM, ids: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor]]:
    """``(D, S)`` of the lookup and of the output map, from a hook-free forward/backward:
    ``D`` the vocabulary-side diagonal, ``S`` the width-side factor, each scaled as its own
    layer's block scales it (rows are samples, G = N·Σ δδᵀ for the mean loss)."""
    W = model.emb.weight
    e = F.embedding(ids, W)
    e.retain_grad()
    z = torch.tanh(F.linear(e, model.mid.weight, model.mid.bias))
    logits = F.linear(z, W, model.head.bias)
    logits.retain_grad()
    F.cross_entropy(logits.reshape(-1, V), y.reshape(-1)).backward()
    R = ids.numel()
    delta, eps, rows = e.grad.reshape(R, D), logits.grad.reshape(R, V), z.detach().reshape(R, D)
    counts = torch.bincount(ids.reshape(-1), minlength=V).double()
    lookup = (counts / R, R * delta.T @ delta)
    output_map = (R * (eps * eps).sum(0), rows.T @ rows / R)
    model.zero_grad()
    return [lookup, output_map]


def _soft_terms(model: SoftTiedModel, ids: Tensor, target: Tensor) -> list[tuple[Tensor, Tensor]]:
    W = model.emb.weight
    e = F.embedding(ids, W)
    e.retain_grad()
    p = torch.softmax(F.linear(e, model.mid.weight, model.mid.bias), -1)
    out = p @ W
    out.retain_grad()
    F.mse_loss(out, target).backward()
    R = ids.numel()
    delta, gout, x = e.grad.reshape(R, D), out.grad.reshape(R, D), p.detach().reshape(R, V)
    counts = torch.bincount(ids.reshape(-1), minlength=V).double()
    model.zero_grad()
    return [(counts / R, R * delta.T @ delta), ((x * x).sum(0) / R, R * gout.T @ gout)]


def _dense_fisher(terms: list[tuple[Tensor, Tensor]]) -> Tensor:
    """``Σ diag(D_k) ⊗ S_k``, indexed like ``weight.reshape(-1)`` (vocab-major)."""
    return sum(torch.kron(torch.diag(d), s) for d, s in terms)


def _partial_trace_product(F_dense: Tensor) -> Tensor:
    """``tr_d(F) ⊗ tr_vocab(F) / tr F``, the partial traces taken on the dense matrix."""
    F4 = F_dense.reshape(V, D, V, D)
    vocab_side = torch.einsum("aibi->ab", F4)
    width_side = torch.einsum("aiaj->ij", F4)
    return torch.kron(vocab_side, width_side) / torch.trace(F_dense)


def _block_product(factors) -> Tensor:
    return torch.kron(torch.diag(factors.A[0]), factors.G[0])


# ---------------------------------------------------------------------- (a) the factors
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_factors_are_the_partial_traces_of_both_uses(reduction):
    model = _model()
    ids, y = _batch()
    terms = _lm_terms(model, ids, y)
    if reduction == "sum":  # the same loss summed: output gradients × R, G = Σ δδᵀ
        R = ids.numel()
        terms = [(terms[0][0], terms[0][1] * R), (terms[1][0] * R, terms[1][1])]
    opt = lg.KFAC(
        model.parameters(), preconditioner="kfac", curvature_every=1, loss_reduction=reduction
    )
    _attach(model, opt)
    loss = F.cross_entropy(model(ids).reshape(-1, V), y.reshape(-1), reduction=reduction)
    loss.backward()
    opt.step()
    factors = opt.factors(_tied_key(opt, model))
    assert factors.A.shape == (1, V) and factors.G.shape == (1, D, D)
    expected = _partial_trace_product(_dense_fisher(terms))
    torch.testing.assert_close(_block_product(factors), expected, rtol=1e-12, atol=1e-14)
    # The stored gauge: A is the convex combination of the uses' vocabulary sides, weighted
    # by their width-side traces.
    tr_s = [torch.trace(s) for _, s in terms]
    A = sum(t * d for t, (d, _) in zip(tr_s, terms, strict=True)) / sum(tr_s)
    torch.testing.assert_close(factors.A[0], A, rtol=1e-12, atol=1e-15)
    # Not one use alone: the lookup's own Kronecker term is far from it.
    alone = _dense_fisher(terms[:1])
    assert (alone - expected).norm() > 0.1 * expected.norm()


def test_width_side_is_exact_for_the_full_head_covariance():
    """Only the vocabulary side of the head is diagonalized: with the full logit-gradient
    covariance the width-side partial trace is the same."""
    model = _model()
    ids, y = _batch()
    terms = _lm_terms(model, ids, y)
    W = model.emb.weight
    z = torch.tanh(model.mid(F.embedding(ids, W)))
    logits = F.linear(z, W)
    logits.retain_grad()
    F.cross_entropy(logits.reshape(-1, V), y.reshape(-1)).backward()
    eps, R = logits.grad.reshape(-1, V), ids.numel()
    full = torch.kron(torch.diag(terms[0][0]), terms[0][1]) + torch.kron(
        R * eps.T @ eps, terms[1][1]
    )
    width = torch.einsum("aiaj->ij", full.reshape(V, D, V, D))
    width_diag = torch.einsum("aiaj->ij", _dense_fisher(terms).reshape(V, D, V, D))
    torch.testing.assert_close(width, width_diag, rtol=1e-12, atol=1e-15)


def test_single_use_gives_that_uses_own_factors():
    """A window in which only the lookup is reached (the head's logits unused) gives exactly
    the embedding block's factors."""
    model = _model()
    ids, _ = _batch()
    opt = lg.KFAC(model.parameters(), preconditioner="kfac", curvature_every=1)
    _attach(model, opt)
    e = model.emb(ids)
    e.retain_grad()
    e.pow(2).mean().backward()
    opt.step()
    factors = opt.factors(_tied_key(opt, model))
    R = ids.numel()
    delta = e.grad.reshape(R, D)
    counts = torch.bincount(ids.reshape(-1), minlength=V).double()
    torch.testing.assert_close(factors.A[0], counts / R, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(factors.G[0], R * delta.T @ delta, rtol=1e-12, atol=1e-15)


def test_transposed_linear_use_feeds_the_vocabulary_side_from_its_inputs():
    model = _model(SoftTiedModel)
    ids, _ = _batch()
    target = torch.randn(
        *ids.shape, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5)
    )
    terms = _soft_terms(model, ids, target)
    opt = lg.KFAC(model.parameters(), preconditioner="kfac", curvature_every=1)
    handle = _attach(model, opt)
    block = opt.blocks[_tied_key(opt, model)]
    assert isinstance(block, TiedEmbeddingBlock) and block.name == "emb+soft"
    assert handle.coverage.share == 1.0
    F.mse_loss(model(ids), target).backward()
    opt.step()
    expected = _partial_trace_product(_dense_fisher(terms))
    factors = opt.factors(_tied_key(opt, model))
    torch.testing.assert_close(_block_product(factors), expected, rtol=1e-12, atol=1e-14)


class SharedLookups(nn.Module):
    """Two embedding modules and a head on one weight (T5: ``shared``, ``encoder.embed_tokens``,
    ``lm_head``); ``split=False`` calls one embedding twice instead."""

    def __init__(self, split: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.enc = nn.Embedding(V, D) if split else self.emb
        self.enc.weight = self.emb.weight
        self.mid = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        context = self.enc(ids.flip(-1)).mean(-2, keepdim=True)
        return self.head(torch.tanh(self.mid(self.emb(ids) + context)))


def test_several_embedding_modules_are_one_lookup():
    ids, y = _batch()
    factors = []
    reference = _model(SharedLookups)
    for split in (True, False):
        model = _model(SharedLookups, split=split)
        with torch.no_grad():
            model.emb.weight.copy_(reference.emb.weight)
            model.mid.load_state_dict(reference.mid.state_dict())
        opt = lg.KFAC(model.parameters(), preconditioner="kfac", curvature_every=1)
        handle = _attach(model, opt)
        assert handle.coverage.share == 1.0
        _lm_loss(model, ids, y).backward()
        opt.step()
        factors.append(opt.factors(_tied_key(opt, model)))
        names = [b.name for b in opt.blocks.values()]
        assert names == (["emb+enc+head", "mid"] if split else ["emb+head", "mid"])
    torch.testing.assert_close(factors[0].A, factors[1].A, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(factors[0].G, factors[1].G, rtol=1e-13, atol=1e-15)


def test_gradient_accumulation_sums_both_uses_over_micro_batches():
    model = _model()
    ids, y = _batch(length=8)
    full = _partial_trace_product(_dense_fisher(_lm_terms(model, ids, y)))
    opt = lg.KFAC(model.parameters(), preconditioner="kfac", curvature_every=1)
    _attach(model, opt)
    for part in (slice(0, 4), slice(4, 8)):
        (_lm_loss(model, ids[:, part], y[:, part]) / 2).backward()
    opt.step()
    factors = opt.factors(_tied_key(opt, model))
    torch.testing.assert_close(_block_product(factors), full, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------- (b) one step
def _one_step(cls, **kwargs):
    model = _model()
    ids, y = _batch()
    terms = _lm_terms(model, ids, y)
    opt = cls(
        model.parameters(),
        preconditioner="kfac",
        inverse="eigh",
        lr=1.0,
        momentum=0.0,
        kl_clip=None,
        curvature_every=1,
        inverse_every=1,
        **kwargs,
    )
    _attach(model, opt)
    before = model.emb.weight.detach().clone()
    _lm_loss(model, ids, y).backward()
    grad = model.emb.weight.grad.detach().clone()
    opt.step()
    return model.emb.weight.detach() - before, grad, _dense_fisher(terms)


def test_kfac_step_is_the_dense_damped_inverse():
    gamma = 3e-3
    step, grad, F_dense = _one_step(lg.KFAC, damping=gamma, damping_mode="absolute")
    M = _partial_trace_product(F_dense) + gamma * torch.eye(V * D, dtype=torch.float64)
    expected = -torch.linalg.solve(M, grad.reshape(-1)).reshape(V, D)
    torch.testing.assert_close(step, expected, rtol=1e-9, atol=1e-12)


def test_ring_step_is_the_dense_damped_inverse_with_relative_damping():
    """Relative damping's unit is the mean eigenvalue, tr F / (vocab·d), which the combination
    keeps; RING adds ρ‖g_b‖² / (vocab·d)."""
    lam, rho = 0.5, 0.2
    step, grad, F_dense = _one_step(lg.RING, damping=lam, rho=rho)
    n = V * D
    gamma = lam * torch.trace(F_dense) / n + rho * grad.pow(2).sum() / n
    M = _partial_trace_product(F_dense) + gamma * torch.eye(n, dtype=torch.float64)
    expected = -torch.linalg.solve(M, grad.reshape(-1)).reshape(V, D)
    torch.testing.assert_close(step, expected, rtol=1e-9, atol=1e-12)


def test_eigen_mode_basis_comes_from_both_uses():
    model = _model()
    ids, y = _batch()
    terms = _lm_terms(model, ids, y)
    opt = lg.KFAC(model.parameters(), curvature="kfac", curvature_every=1, inverse_every=1)
    _attach(model, opt)
    _lm_loss(model, ids, y).backward()
    opt.step()
    factors = opt.factors(_tied_key(opt, model))
    assert factors.evec_A is None  # the vocabulary side is diagonal: its own eigenbasis
    Q = factors.evec_G[0]
    width = torch.einsum("aiaj->ij", _dense_fisher(terms).reshape(V, D, V, D))
    evals, evecs = torch.linalg.eigh(width)
    assert (evals[1:] - evals[:-1]).min() > 1e-6 * evals.max()  # a unique basis to compare
    torch.testing.assert_close((Q.T @ evecs).abs(), torch.eye(D, dtype=Q.dtype), atol=1e-9, rtol=0)

    def off_diagonal(M: Tensor) -> float:
        R = Q.T @ M @ Q
        return float((R - torch.diag(torch.diagonal(R))).norm() / R.norm())

    assert off_diagonal(width) < 1e-10
    assert off_diagonal(terms[0][1]) > 1e-2 and off_diagonal(terms[1][1]) > 1e-2  # not one use


# ---------------------------------------------------------------------- (c) training
@pytest.mark.parametrize("name", ["KFAC", "RING", "RENG", "KFAC-kfac", "RING-newton"])
def test_tied_model_trains(name):
    model = _model()
    kwargs = dict(curvature_every=1, inverse_every=2)
    if name == "KFAC-kfac":  # the paper's route, its KL-clip loosened for a 25-step run
        opt = lg.KFAC(model.parameters(), preconditioner="kfac", lr=0.3, kl_clip=1.0, **kwargs)
    elif name == "RING-newton":
        opt = lg.RING(
            model.parameters(),
            preconditioner="kfac",
            inverse="newton",
            lr=0.3,
            kl_clip=1.0,
            **kwargs,
        )
    else:
        opt = getattr(lg, name)(model.parameters(), **kwargs)
    _attach(model, opt)
    ids, y = _batch(batch=8)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = _lm_loss(model, ids, y)
        loss.backward(create_graph=isinstance(opt, lg.RENG))
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses
    factors = opt.factors(_tied_key(opt, model))
    assert factors.A is not None and torch.isfinite(factors.G).all()


def test_one_host_read_back_per_step():
    model = _model(head_bias=True)
    opt = lg.RING(model.parameters(), preconditioner="kfac", curvature_every=2, inverse_every=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the head's bias falls back
        lg.attach(model, opt)
    ids, y = _batch()
    counts = []
    for _ in range(6):
        opt.zero_grad()
        _lm_loss(model, ids, y).backward()
        with SyncCounter() as counter:
            opt.step()
        counts.append(counter.total)
    assert max(counts) <= 1, counts


# ---------------------------------------------------------------------- (d) attach and coverage
def test_coverage_is_complete_and_counts_the_tied_weight_once():
    model = _model()
    opt = lg.KFAC(model.parameters())
    handle = _attach(model, opt)  # raises on any warning: no fallback, no tied-weight warning
    assert handle.coverage.share == 1.0 and handle.coverage.fallback == []
    assert handle.coverage.total == V * D + D * D + D
    assert handle.coverage.layers == 2
    block = handle.blocks["emb+head"]
    assert isinstance(block, TiedEmbeddingBlock) and block.params() == [model.emb.weight]


def test_head_bias_gets_the_fallback_with_its_reason():
    model = _model(head_bias=True)
    opt = lg.KFAC(model.parameters())
    with pytest.warns(UserWarning, match="bias only: the weight is in the tied block 'emb\\+head'"):
        handle = lg.attach(model, opt)
    assert "emb+head" in handle.blocks
    assert handle.coverage.covered == V * D + D * D + D  # all but the head's bias
    assert handle.coverage.total == handle.coverage.covered + V


def test_rkalman_refuses_the_tied_block_with_its_reason():
    model = _model()
    opt = lg.RKalman(model.parameters())
    with pytest.warns(UserWarning, match="RKalman filters a dense P_A"):
        handle = lg.attach(model, opt)
    assert [b.name for b in handle.blocks.values()] == ["mid"]
    fallback = " ".join(handle.coverage.fallback)
    assert "'emb' (Embedding; RKalman filters" in fallback
    assert "'head' (Linear; RKalman filters" in fallback
    ids, y = _batch()
    _lm_loss(model, ids, y).backward()
    opt.step()


def test_other_sharing_patterns_keep_the_fallback():
    class TwoLinears(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    model = TwoLinears()
    opt = lg.KFAC(model.parameters())
    with pytest.warns(UserWarning, match="tied weights: 'a.weight' and 'b.weight'"):
        handle = lg.attach(model, opt)
    assert not handle.blocks
    # A skipped owner leaves the pair unrecognized too.
    model = _model()
    with pytest.warns(UserWarning, match="tied weights: 'emb.weight' and 'head.weight'"):
        handle = lg.attach(model, lg.KFAC(model.parameters()), skip_modules=["head"])
    assert not any(isinstance(b, TiedEmbeddingBlock) for b in handle.blocks.values())


# ---------------------------------------------------------------------- (e) checkpoints
def test_checkpoint_round_trip_continues_bit_for_bit():
    ids, y = _batch(batch=4)

    def make(model):
        opt = lg.RING(model.parameters(), curvature_every=1, inverse_every=2)
        _attach(model, opt)
        return opt

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            _lm_loss(model, ids, y).backward()
            opt.step()

    model = _model()
    opt = make(model)
    train(model, opt, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    block_state = saved_opt["grng"]["blocks"][_tied_key(opt, model)]
    assert block_state["module"] == "emb+head" and block_state["A"].shape == (1, V)
    train(model, opt, 3)

    resumed = _model()
    resumed.load_state_dict(saved_model)
    assert resumed.head.weight is resumed.emb.weight  # still tied after loading
    opt2 = make(resumed)
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, 3)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
