"""Blocks for the layers users have: MultiheadAttention, Embedding, registered layer types and
weight tying. Each block is checked in float64 against the same layer built from nn.Linear
modules, whose blocks are checked against dense references in test_blocks.py."""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch
from torch import nn

import lightning_grng as lg
from lightning_grng.curvature import EmbeddingBlock, InProjBlock, KroneckerBlock, OutProjBlock

# The paper's K-FAC route: these tests check its math (the eigen mode: test_eigen.py).
KFAC_K = partial(lg.KFAC, preconditioner="kfac")
RING_K = partial(lg.RING, preconditioner="kfac")
RENG_K = partial(lg.RENG, preconditioner="kfac")

E, HEADS = 8, 2


def _kfac(params, **kwargs):
    kwargs = dict(lr=1.0, momentum=0.0, kl_clip=None, curvature_every=1, ema_decay=0.0) | kwargs
    return KFAC_K(params, **kwargs)


def _attach_quietly(model, opt, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lg.attach(model, opt, **kwargs)


# ---------------------------------------------------------------------- MultiheadAttention
class LinearAttention(nn.Module):
    """The attention of an nn.MultiheadAttention built from four nn.Linear layers (batch first)."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(E, E).double() for _ in range(3))
        self.out = nn.Linear(E, E).double()
        with torch.no_grad():
            for i, lin in enumerate((self.q, self.k, self.v)):
                lin.weight.copy_(mha.in_proj_weight[i * E : (i + 1) * E])
                lin.bias.copy_(mha.in_proj_bias[i * E : (i + 1) * E])
            self.out.weight.copy_(mha.out_proj.weight)
            self.out.bias.copy_(mha.out_proj.bias)

    def forward(self, query, key, value, attn_mask=None):
        def heads(t):
            return t.unflatten(-1, (HEADS, E // HEADS)).transpose(1, 2)

        q, k, v = heads(self.q(query)), heads(self.k(key)), heads(self.v(value))
        scores = q @ k.transpose(-1, -2) / (E // HEADS) ** 0.5
        if attn_mask is not None:
            scores = scores + attn_mask
        attn = scores.softmax(-1) @ v  # (B, h, L, d)
        return self.out(attn.transpose(1, 2).flatten(-2))


def _inputs(kind: str, B=3, L=5, S=7):
    query = torch.randn(B, L, E, dtype=torch.float64)
    if kind == "self":
        return query, query, query
    memory = torch.randn(B, S, E, dtype=torch.float64)
    if kind == "shared_kv":
        return query, memory, memory
    return query, memory, torch.randn(B, S, E, dtype=torch.float64)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["self", "shared_kv", "separate"])
@pytest.mark.parametrize("inverse", ["eigh", "newton"])
def test_attention_factors_and_step_equal_linear_layers(kind, batch_first, inverse):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS, batch_first=batch_first).double()
    ref = LinearAttention(mha)
    query, key, value = _inputs(kind)
    target = torch.randn(query.shape, dtype=torch.float64)
    mask = None
    if kind == "self":  # masks and need_weights do not change the projections
        L = query.shape[1]
        mask = torch.full((L, L), float("-inf"), dtype=torch.float64).triu(1)

    opt = _kfac(mha.parameters(), inverse=inverse)
    handle = lg.attach(mha, opt)
    assert [type(b) for b in handle.blocks.values()] == [InProjBlock, OutProjBlock]
    args = (query, key, value) if batch_first else (t.transpose(0, 1) for t in (query, key, value))
    out, _ = mha(*args, attn_mask=mask, need_weights=kind != "self")
    out = out if batch_first else out.transpose(0, 1)
    (out - target).pow(2).sum(-1).mean().backward()
    opt.step()

    ref_opt = _kfac(ref.parameters(), inverse=inverse)
    lg.attach(ref, ref_opt)
    (ref(query, key, value, mask) - target).pow(2).sum(-1).mean().backward()
    ref_opt.step()

    in_key = next(k for k, b in opt.blocks.items() if isinstance(b, InProjBlock))
    out_key = next(k for k, b in opt.blocks.items() if isinstance(b, OutProjBlock))
    ref_keys = {b.name: k for k, b in ref_opt.blocks.items()}
    f_in = opt.factors(in_key)
    assert f_in.A.shape == (3, E + 1, E + 1) and f_in.G.shape == (3, E, E)
    for g, name in enumerate("qkv"):
        f_ref = ref_opt.factors(ref_keys[name])
        torch.testing.assert_close(f_in.A[g], f_ref.A[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(f_in.G[g], f_ref.G[0], rtol=1e-10, atol=1e-12)
    f_out, f_ref = opt.factors(out_key), ref_opt.factors(ref_keys["out"])
    torch.testing.assert_close(f_out.A, f_ref.A, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f_out.G, f_ref.G, rtol=1e-10, atol=1e-12)

    expected_w = torch.cat([ref.q.weight, ref.k.weight, ref.v.weight])
    expected_b = torch.cat([ref.q.bias, ref.k.bias, ref.v.bias])
    # Newton–Schulz stops at a residual of 1e-10 (float64), which bounds the agreement.
    tol = dict(rtol=1e-9, atol=1e-11) if inverse == "eigh" else dict(rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(mha.in_proj_weight, expected_w, **tol)
    torch.testing.assert_close(mha.in_proj_bias, expected_b, **tol)
    torch.testing.assert_close(mha.out_proj.weight, ref.out.weight, **tol)
    torch.testing.assert_close(mha.out_proj.bias, ref.out.bias, **tol)


def test_attention_with_gradient_accumulation_and_unequal_lengths():
    """Two micro-batches whose key lengths differ: each group's A is still the mean over its
    own rows (weighted by the query rows of each pass)."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS, batch_first=True).double()
    opt = _kfac(mha.parameters())
    lg.attach(mha, opt)
    q, k1 = torch.randn(2, 4, E, dtype=torch.float64), torch.randn(2, 4, E, dtype=torch.float64)
    k2 = torch.randn(2, 4, E, dtype=torch.float64)
    for key in (k1, k2):
        mha(q, key, key)[0].pow(2).mean().div(2).backward()
    opt.step()
    f = opt.factors(next(iter(opt.blocks)))
    rows = torch.cat([k1, k2]).reshape(-1, E)
    rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype)], 1)
    torch.testing.assert_close(f.A[1], rows.T @ rows / len(rows), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f.A[1], f.A[2], rtol=1e-12, atol=1e-14)


def test_attention_eval_mode_and_exceptions_leave_no_interception():
    mha = nn.MultiheadAttention(E, HEADS, batch_first=True).double()
    opt = _kfac(mha.parameters())
    lg.attach(mha, opt)
    x = torch.randn(2, 3, E, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        mha(x, x[..., :-1], x[..., :-1])  # wrong key width: the forward raises
    assert not torch.overrides._get_current_function_mode_stack()
    mha.eval()
    mha(x, x, x)[0].sum().backward()
    with pytest.warns(RuntimeWarning, match="eval mode"):
        opt.step()
    mha.train()
    opt.zero_grad()
    mha(x, x, x)[0].sum().backward()
    opt.step()
    assert all(opt.factors(k).A is not None for k in opt.blocks)


def test_attention_blocks_can_be_skipped_one_by_one():
    model = nn.Sequential(nn.MultiheadAttention(E, HEADS))
    handle = _attach_quietly(model, KFAC_K(model.parameters()))
    assert set(handle.blocks) == {"0", "0.out_proj"}
    model = nn.Sequential(nn.MultiheadAttention(E, HEADS))
    opt = KFAC_K(model.parameters())
    with pytest.warns(UserWarning, match=r"1 × NonDynamicallyQuantizableLinear \('0.out_proj'\)"):
        handle = lg.attach(model, opt, skip_modules=["0.out_proj"])
    assert set(handle.blocks) == {"0"}
    model = nn.Sequential(nn.MultiheadAttention(E, HEADS))
    handle = _attach_quietly(model, KFAC_K(model.parameters()), skip_modules=["0"])
    assert not handle.blocks  # the attention's out_proj goes with it


def test_attention_with_separate_kv_dims_falls_back_with_a_reason():
    mha = nn.MultiheadAttention(E, HEADS, kdim=4, vdim=6, batch_first=True).double()
    opt = _kfac(mha.parameters())
    why = r"root parameters: q_proj_weight, .* \(separate q/k/v"
    with pytest.warns(UserWarning, match=why) as record:
        handle = lg.attach(mha, opt)
    assert [b.name for b in handle.blocks.values()] == ["out_proj"]
    assert not any("never fired" in str(w.message) for w in record)
    q = torch.randn(2, 3, E, dtype=torch.float64)
    out, _ = mha(q, torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(2, 5, 6).double())
    out.pow(2).mean().backward()
    opt.step()
    assert opt.factors(next(iter(opt.blocks))).A is not None


class TinyLM(nn.Module):
    def __init__(self, vocab=11, dim=16, context=6, layers=2) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        layer = nn.TransformerEncoderLayer(dim, 2, dim_feedforward=32, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        T = ids.shape[1]
        h = self.tok(ids) + self.pos(torch.arange(T))
        mask = nn.Transformer.generate_square_subsequent_mask(T)
        return self.head(self.norm(self.encoder(h, mask=mask, is_causal=True)))


@pytest.mark.parametrize("cls", [lg.KFAC, lg.RING])
def test_transformer_language_model_trains_with_attention_blocks(cls):
    torch.manual_seed(0)
    model = TinyLM()
    opt = cls(model.parameters(), lr=0.05, curvature_every=1, inverse_every=2)
    with pytest.warns(UserWarning, match="no Kronecker block") as record:
        handle = lg.attach(model, opt)
    fallback = " ".join(str(w.message) for w in record)
    assert "self_attn" not in fallback and "tok" not in fallback
    names = set(handle.blocks)
    for i in range(2):
        assert {f"encoder.layers.{i}.self_attn", f"encoder.layers.{i}.self_attn.out_proj"} <= names
    assert {"tok", "pos", "head"} <= names
    ids = torch.randint(0, 11, (8, 6))
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "hooks never fired" would fail here
        for _ in range(12):
            opt.zero_grad()
            logits = model(ids[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, 11), ids[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0]
    for key, block in opt.blocks.items():
        assert opt.factors(key).A is not None, block.name
    state = opt.state_dict()
    handle.remove()
    fresh = cls(model.parameters(), lr=0.05)
    fresh.load_state_dict(state)
    _attach_quietly(model, fresh)  # the diagonal A passes the checkpoint's shape check
    for key in opt.blocks:
        torch.testing.assert_close(fresh.factors(key).A, opt.factors(key).A)


# ---------------------------------------------------------------------- Embedding
VOCAB, DIM = 7, 4


def _embedding_and_linear(padding_idx=None):
    torch.manual_seed(0)
    emb = nn.Embedding(VOCAB, DIM, padding_idx=padding_idx).double()
    head = nn.Linear(DIM, 3).double()
    lin = nn.Linear(VOCAB, DIM, bias=False).double()
    head2 = nn.Linear(DIM, 3).double()
    with torch.no_grad():
        lin.weight.copy_(emb.weight.T)
        head2.load_state_dict(head.state_dict())
    return nn.Sequential(emb, head), nn.Sequential(lin, head2)


@pytest.mark.parametrize("inverse", ["eigh", "newton"])
def test_embedding_equals_linear_on_one_hot_inputs(inverse):
    emb_model, lin_model = _embedding_and_linear()
    ids = torch.tensor([[0, 2, 2, 5], [1, 2, 0, 0]])  # tokens 3, 4, 6 never occur
    y = torch.randint(0, 3, (2, 4))
    opts = []
    for model, x in ((emb_model, ids), (lin_model, nn.functional.one_hot(ids, VOCAB).double())):
        opt = _kfac(model.parameters(), inverse=inverse, newton_iters=100)
        lg.attach(model, opt)
        nn.functional.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1)).backward()
        opt.step()
        opts.append(opt)
    assert isinstance(opts[0].blocks["0"], EmbeddingBlock)
    f_emb, f_lin = opts[0].factors("0"), opts[1].factors("0")
    assert f_emb.A.shape == (1, VOCAB)
    torch.testing.assert_close(torch.diag_embed(f_emb.A), f_lin.A, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(f_emb.G, f_lin.G, rtol=1e-12, atol=1e-14)
    tol = dict(rtol=1e-10, atol=1e-12) if inverse == "eigh" else dict(rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(emb_model[0].weight, lin_model[0].weight.T, **tol)
    torch.testing.assert_close(emb_model[1].weight, lin_model[1].weight, **tol)


@pytest.mark.parametrize("inverse", ["eigh", "newton"])
def test_embedding_padding_row_is_left_untouched(inverse):
    emb_model, _ = _embedding_and_linear(padding_idx=0)
    before = emb_model[0].weight[0].clone()
    opt = _kfac(emb_model.parameters(), inverse=inverse, momentum=0.9)
    lg.attach(emb_model, opt)
    ids = torch.tensor([[0, 2, 2, 5], [1, 2, 0, 0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # absent tokens are not a foreign use
        for _ in range(3):
            opt.zero_grad()
            loss = emb_model(ids).pow(2).mean()
            loss.backward()
            opt.step()
    f = opt.factors("0")
    assert f.A[0, 0] == 0 and f.A[0, 2] > 0
    assert torch.isfinite(emb_model[0].weight).all()
    assert torch.equal(emb_model[0].weight[0], before)


def test_embedding_refused_configurations_fall_back_with_reasons():
    model = nn.Sequential(nn.Embedding(5, 3, max_norm=1.0), nn.Embedding(5, 3, sparse=True))
    opt = KFAC_K(model.parameters())
    with pytest.warns(UserWarning) as record:
        handle = lg.attach(model, opt)
    text = " ".join(str(w.message) for w in record)
    assert "max_norm" in text and "sparse=True" in text
    assert not handle.blocks


def test_rkalman_leaves_embeddings_to_the_fallback():
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2))
    opt = lg.RKalman(model.parameters())
    with pytest.warns(UserWarning, match=r"1 × Embedding \('0'; RKalman filters a dense P_A"):
        handle = lg.attach(model, opt)
    assert list(handle.blocks) == ["1"]
    model(torch.tensor([[1, 2], [3, 4]])).pow(2).mean().backward()
    opt.step()


# ---------------------------------------------------------------------- weight tying
def test_weight_tied_three_ways_gets_the_fallback():
    """An embedding tied to one head gets one block (tests/test_tied.py); a third owner makes
    a pattern no block covers."""
    torch.manual_seed(0)
    model = TinyLM(layers=1)
    model.head = nn.Linear(16, 11, bias=False)
    model.head.weight = model.tok.weight
    model.spare = nn.Linear(16, 11, bias=False)  # not called
    model.spare.weight = model.tok.weight
    opt = KFAC_K(model.parameters(), curvature_every=1)
    with pytest.warns(UserWarning, match=r"tied weights: 'tok.weight' and 'head.weight'"):
        handle = lg.attach(model, opt)
    assert "tok" not in handle.blocks and "head" not in handle.blocks
    assert all(model.tok.weight is not p for b in opt.blocks.values() for p in b.params())
    ids = torch.randint(0, 11, (4, 6))
    before = model.tok.weight.clone()
    for _ in range(2):
        opt.zero_grad()
        logits = model(ids[:, :-1])
        nn.functional.cross_entropy(logits.reshape(-1, 11), ids[:, 1:].reshape(-1)).backward()
        opt.step()
    assert not torch.equal(model.tok.weight, before)
    assert torch.isfinite(model.tok.weight).all()


def test_embedding_weight_used_by_a_functional_head_gets_the_fallback():
    """Tying through F.linear is invisible to attach; the gradient rows of tokens that no
    input holds give it away, and the embedding's block is dropped."""

    class FunctionalTie(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(11, 8)
            self.mix = nn.Linear(8, 8)

        def forward(self, ids):
            return nn.functional.linear(torch.tanh(self.mix(self.tok(ids))), self.tok.weight)

    torch.manual_seed(0)
    model = FunctionalTie()
    opt = KFAC_K(model.parameters(), curvature_every=1)
    handle = lg.attach(model, opt)
    assert "tok" in handle.blocks  # attach cannot see the functional use
    ids = torch.randint(0, 6, (4, 5))  # tokens 6..10 never occur as inputs
    before = model.tok.weight.detach().clone()
    with pytest.warns(RuntimeWarning, match=r"'tok' \(Embedding\) gets gradient from outside"):
        for _ in range(3):
            opt.zero_grad()
            logits = model(ids[:, :-1])
            nn.functional.cross_entropy(logits.reshape(-1, 11), ids[:, 1:].reshape(-1)).backward()
            opt.step()
    key = next(k for k, b in opt.blocks.items() if b.name == "tok")
    assert key not in opt._factors
    assert not torch.equal(before, model.tok.weight)
    assert opt.factors(next(k for k, b in opt.blocks.items() if b.name == "mix")).A is not None


# ---------------------------------------------------------------------- registration
class TransposedLinear(nn.Module):
    """GPT-2's Conv1D: ``y = x @ W + b`` with W of shape (in, out)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return x @ self.weight + self.bias


class TransposedLinearBlock(KroneckerBlock):
    def __init__(self, module: TransposedLinear, name: str, with_bias: bool) -> None:
        n_in, n_out = module.weight.shape
        super().__init__(module, name, groups=1, fan_in=n_in, n_out=n_out, with_bias=with_bias)

    def input_rows(self, x):
        return self._append_ones(x.reshape(1, -1, x.shape[-1]))

    def output_grad_rows(self, grad_output):
        return grad_output.reshape(1, -1, grad_output.shape[-1])

    def weight_matrix_shape(self):
        return (1, self.n_out, self.n_in - self.has_bias)

    def to_matrix(self, weight_like, bias_like=None):
        return super().to_matrix(weight_like.T.contiguous(), bias_like)

    def from_matrix(self, mat):
        w, *rest = super().from_matrix(mat.contiguous())
        return [w.reshape(self.n_out, -1).T, *rest]


@pytest.fixture
def registered():
    lg.register_block(
        TransposedLinear, lambda m, n, trainable: TransposedLinearBlock(m, n, trainable(m.bias))
    )
    yield
    lg.unregister_block(TransposedLinear)


def test_registered_block_equals_linear(registered):
    torch.manual_seed(0)
    tl = TransposedLinear(4, 3).double()
    model = nn.Sequential(tl, nn.Tanh(), nn.Linear(3, 2).double())
    ref = nn.Sequential(nn.Linear(4, 3).double(), nn.Tanh(), nn.Linear(3, 2).double())
    with torch.no_grad():
        ref[0].weight.copy_(tl.weight.T)
        ref[0].bias.copy_(tl.bias)
        ref[2].load_state_dict(model[2].state_dict())
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 2, (6,))
    opts = []
    for m in (model, ref):
        opt = _kfac(m.parameters())
        handle = lg.attach(m, opt)
        assert set(handle.blocks) == {"0", "2"}
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
        opts.append(opt)
    for key in ("0", "2"):
        torch.testing.assert_close(opts[0].factors(key).A, opts[1].factors(key).A)
        torch.testing.assert_close(opts[0].factors(key).G, opts[1].factors(key).G)
    torch.testing.assert_close(tl.weight, ref[0].weight.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tl.bias, ref[0].bias, rtol=1e-10, atol=1e-12)


def test_registration_overrides_built_ins_and_subclasses_inherit():
    class MyLinear(nn.Linear):
        pass

    seen = []

    @lg.register_block(nn.Linear)
    def only_note(module, name, trainable):
        seen.append(name)
        return None  # this layer type gets no block

    try:
        model = nn.Sequential(MyLinear(2, 2), nn.Linear(2, 2))
        opt = KFAC_K(model.parameters())
        with pytest.warns(UserWarning):
            handle = lg.attach(model, opt)
        assert seen == ["0", "1"] and not handle.blocks
    finally:
        lg.unregister_block(nn.Linear)
    model = nn.Sequential(MyLinear(2, 2))
    assert set(lg.attach(model, KFAC_K(model.parameters())).blocks) == {"0"}
    with pytest.raises(TypeError):
        lg.register_block(int, lambda *a: None)  # type: ignore[arg-type]


def test_statistics_reduction_carries_a_diagonal_input_factor(tmp_path):
    """The DDP statistics reduce packs an embedding's A as its diagonal (one process, gloo)."""
    import torch.distributed as dist

    from lightning_grng.distributed import Sharding, block_cost

    assert block_cost(1, 1000, 4, diagonal_in=True) == 1000 + 64
    model = nn.Sequential(nn.Embedding(VOCAB, DIM), nn.Linear(DIM, 3))
    opt = KFAC_K(model.parameters(), curvature_every=1)
    lg.attach(model, opt)
    model(torch.tensor([[1, 2, 2], [0, 5, 1]])).pow(2).mean().backward()
    capture = opt._capture
    before = {k: (a.a_sum.clone(), a.g_sum.clone()) for k, a in capture.accumulators.items()}
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        shard = Sharding(rank=0, world_size=1)
        shard.bind(opt.blocks)
        shard.reduce_factor_statistics(opt.blocks, capture.accumulators)
    finally:
        dist.destroy_process_group()
    for key, (a_sum, g_sum) in before.items():
        torch.testing.assert_close(capture.accumulators[key].a_sum, a_sum.float())
        torch.testing.assert_close(capture.accumulators[key].g_sum, g_sum)
    assert capture.accumulators["0"].a_sum.shape == (1, VOCAB)
