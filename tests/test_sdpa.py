"""RENG's double backprop through ``F.scaled_dot_product_attention``: its fused CPU kernel has
no double backward, the math backend does, and attach (RENG, ``gr_mode="double_backprop"``)
makes training forwards use it."""

from __future__ import annotations

import copy
import pickle
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_grng as lg
from lightning_grng.curvature.sdpa import use_math_sdpa

E, HEADS = 16, 2


def _fused_allowed() -> bool:
    return torch.backends.cuda.flash_sdp_enabled()


class SDPAttention(nn.Module):
    """Self-attention that calls F.scaled_dot_product_attention itself (a causal LM block)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, E)
        self.qkv = nn.Linear(E, 3 * E)
        self.out = nn.Linear(E, E)
        self.head = nn.Linear(E, 32)
        self.seen_fused: list[bool] = []

    def forward(self, tokens):
        h = self.emb(tokens)
        q, k, v = self.qkv(h).unflatten(-1, (3, HEADS, E // HEADS)).permute(2, 0, 3, 1, 4)
        self.seen_fused.append(_fused_allowed())
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(h + self.out(a.transpose(1, 2).flatten(-2)))


class MHAModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, E)
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.head = nn.Linear(E, 32)

    def forward(self, tokens):
        h = self.emb(tokens)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(h + a)


def _tokens(batch=4, length=8, vocab=32):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, length + 1), generator=g)


def _reng_steps(model, logits_of, tokens, vocab, steps=3):
    opt = lg.RENG(model.parameters(), lr=0.01, rho=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = lg.attach(model, opt)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        logits = logits_of(model, tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        loss.backward(create_graph=True)
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    return handle, losses


def test_the_fused_kernel_has_no_double_backward_and_the_math_one_has():
    q, k, v = (torch.randn(2, HEADS, 8, 4, requires_grad=True) for _ in range(3))

    def double_backward():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        grads = torch.autograd.grad(out.pow(2).sum(), (q, k, v), create_graph=True)
        sum(g.pow(2).sum() for g in grads).backward()

    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        double_backward()
    q64, k64, v64 = (
        torch.randn(1, 2, 5, 3, dtype=torch.float64, requires_grad=True) for _ in "qkv"
    )
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        assert torch.autograd.gradgradcheck(
            lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True),
            (q64, k64, v64),
        )
    try:
        double_backward()
    except RuntimeError as err:
        assert "not implemented" in str(err)
    else:
        pytest.skip("this torch differentiates the default SDPA kernel twice")


def test_math_only_in_training_forwards_with_grad_and_left_on_exceptions():
    model = SDPAttention()
    handle = use_math_sdpa(model)
    tokens = _tokens()[:, :-1]
    model(tokens)
    with torch.no_grad():
        model(tokens)
    model.eval()
    model(tokens)
    model.train()
    assert model.seen_fused == [False, True, True]
    assert _fused_allowed()

    with pytest.raises(IndexError):
        model(tokens + 100)  # out of the embedding's range: the forward raises
    assert _fused_allowed()  # the always_call hook left the setting
    outer = nn.Sequential(model)
    outer_handle = use_math_sdpa(outer)  # hooks on outer and on its child, model
    outer(tokens)  # nested entries
    assert model.seen_fused[-1] is False and _fused_allowed()
    outer_handle.remove()

    copied = copy.deepcopy(model)  # copies carry inert hooks
    copied(tokens)
    assert copied.seen_fused[-1] is True
    pickle.loads(pickle.dumps(model))(tokens)
    handle.remove()
    model(tokens)
    assert model.seen_fused[-1] is True


def test_reng_double_backprop_through_sdpa_called_directly():
    torch.manual_seed(0)
    model = SDPAttention()
    handle, _ = _reng_steps(model, lambda m, x: m(x), _tokens(), 32)
    assert model.seen_fused and not any(model.seen_fused)
    handle.remove()  # the attachment's hooks, the attention switch with them
    model(_tokens()[:, :-1])
    assert model.seen_fused[-1] is True


def test_reng_double_backprop_through_multihead_attention_without_weights():
    torch.manual_seed(0)
    handle, _ = _reng_steps(MHAModel(), lambda m, x: m(x), _tokens(), 32)
    assert handle.coverage.share > 0.9


def test_kfac_and_finite_difference_reng_keep_the_fused_kernels():
    for opt in (lg.KFAC, lambda p: lg.RENG(p, gr_mode="finite_difference")):
        model = SDPAttention()
        handle = lg.attach(model, opt(model.parameters()))
        model(_tokens()[:, :-1])
        assert model.seen_fused == [True]
        handle.remove()


def test_reng_double_backprop_on_transformers_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(config)
    assert model.config._attn_implementation == "sdpa"
    _reng_steps(model, lambda m, x: m(input_ids=x).logits, _tokens(vocab=64), 64)


class LitSDPA(L.LightningModule):
    """training_step calls the submodule, never the LightningModule itself."""

    def __init__(self) -> None:
        super().__init__()
        self.net = SDPAttention()

    def training_step(self, batch, _):
        (tokens,) = batch
        logits = self.net(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, 32), tokens[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return lg.RENG(self.parameters(), lr=0.01, rho=0.1)


@pytest.mark.parametrize("strategy", ["grng", "auto"])
def test_reng_double_backprop_through_sdpa_in_lightning(strategy, tmp_path):
    module = LitSDPA()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=lg.GRNGStrategy() if strategy == "grng" else "auto",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    data = torch.utils.data.TensorDataset(_tokens(batch=8))
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    assert trainer.global_step == 2
    assert module.net.seen_fused and not any(module.net.seen_fused)
