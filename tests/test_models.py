"""The models users have, with no user code: Hugging Face GPT-2, Llama, BERT, ViT and ResNet,
built from tiny configs (no downloads), attached as they are and trained 5 steps with each of
KFAC, RING, RENG (double backprop) and RKalman.

Needs the ``models`` extra (``pip install -e .[models]``). timm is not in it: timm imports
torchvision, and torchvision's PyPI wheel does not load beside the CPU build of torch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial

import pytest
import torch

import lightning_grng as lg

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, BATCH, IMAGE, LABELS = 128, 16, 4, 32, 10
OPTIMIZERS: dict[str, Callable[..., lg.KFAC | lg.RKalman]] = {
    "KFAC": partial(lg.KFAC, lr=0.01),
    "RING": partial(lg.RING, lr=0.01),
    "RENG": partial(lg.RENG, lr=0.01, gr_mode="double_backprop"),
    "RKalman": partial(lg.RKalman, lr=0.01),
}


def _text(**kwargs):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids.clone()} | kwargs


def _masked_text():
    batch = _text()
    g = torch.Generator().manual_seed(1)
    masked = torch.rand(BATCH, SEQ, generator=g) < 0.3
    masked[:, 0] = True  # at least one masked token per row
    batch["labels"] = torch.where(masked, batch["labels"], -100)
    batch["input_ids"] = torch.where(masked, 0, batch["input_ids"])  # token 0 as [MASK]
    return batch


def _images():
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g)
    return {"pixel_values": pixels, "labels": torch.randint(0, LABELS, (BATCH,), generator=g)}


def _gpt2():
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
    )
    return transformers.GPT2LMHeadModel(config), _text()


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
    )
    return transformers.LlamaForCausalLM(config), _text()


def _bert():
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=SEQ,
    )
    return transformers.BertForMaskedLM(config), _masked_text()


def _vit():
    config = transformers.ViTConfig(
        image_size=IMAGE,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=LABELS,
    )
    return transformers.ViTForImageClassification(config), _images()


def _resnet():
    config = transformers.ResNetConfig(
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        layer_type="basic",
        num_labels=LABELS,
    )
    return transformers.ResNetForImageClassification(config), _images()


MODELS = {"GPT-2": _gpt2, "Llama": _llama, "BERT": _bert, "ViT": _vit, "ResNet": _resnet}

#: Lower bounds of ``handle.coverage.share``: 0.95 unless listed. What falls back: norm layers,
#: ViT's cls token and position embeddings, and under RKalman the embeddings (it filters a dense
#: input factor, vocab × vocab for an embedding, so it leaves them to the fallback).
MIN_COVERAGE = {
    # GPT-2 and BERT tie the input embedding to the LM head: one tied block for KFAC, RING and
    # RENG (curvature/tied.py); RKalman refuses its diagonal vocabulary side, so the tied weight
    # falls back there (13-15% of these tiny models).
    ("GPT-2", "RKalman"): 0.836,
    ("BERT", "RKalman"): 0.775,
    ("Llama", "RKalman"): 0.841,  # RKalman: the (untied) embedding falls back, by design
}
RESULTS: dict[tuple[str, str], tuple[float, str]] = {}


@pytest.fixture(scope="module", autouse=True)
def _table(request):
    """Prints the model × optimizer table (coverage, steps) after the module's tests."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or not RESULTS:
        return
    names = list(OPTIMIZERS)
    lines = ["", "coverage, 5 steps | " + " | ".join(f"{n:^17s}" for n in names)]
    for model in MODELS:
        cells = [RESULTS.get((model, n)) for n in names]
        lines.append(
            f"{model:17s} | "
            + " | ".join(f"{c[0]:6.1%} {c[1]:>10s}" if c else f"{'-':^17s}" for c in cells)
        )
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        for line in lines:
            reporter.write_line(line)


def _min_coverage(model: str, optimizer: str) -> float:
    key = (model, "RKalman" if optimizer == "RKalman" else "KFAC")  # RING, RENG: as KFAC
    return MIN_COVERAGE.get(key, 0.95)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_model_trains_with_blocks(model_name, optimizer):
    torch.manual_seed(0)
    model, batch = MODELS[model_name]()
    model.train()
    opt = OPTIMIZERS[optimizer](model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback and tied-weight warnings
        handle = lg.attach(model, opt)
    share = handle.coverage.share
    RESULTS[(model_name, optimizer)] = (share, "attached")
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward(create_graph=isinstance(opt, lg.RENG))
        opt.step()
        losses.append(loss.item())
    finite = all(torch.isfinite(torch.tensor(losses)))
    moved = all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    RESULTS[(model_name, optimizer)] = (share, "5 steps OK" if finite and moved else "FAILED")
    assert finite, losses
    assert moved
    assert share >= _min_coverage(model_name, optimizer), str(handle.coverage)
    handle.remove()


def test_gpt2_conv1d_layers_get_transposed_linear_blocks():
    from lightning_grng.curvature import TransposedLinearBlock

    model, _ = _gpt2()
    opt = lg.KFAC(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = lg.attach(model, opt)
    conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(conv1d) == 8
    assert all(isinstance(handle.blocks[n], TransposedLinearBlock) for n in conv1d)
    fallback = " ".join(handle.coverage.fallback)
    assert "Conv1D" not in fallback and "(tied)" not in fallback


def test_modules_have_no_unexpected_fallback():
    """Only norm layers, tied embeddings and bare parameters fall back."""
    expected = ("LayerNorm", "RMSNorm", "BatchNorm2d", "(tied)", "ViTEmbeddings")
    for name, build in MODELS.items():
        model, _ = build()
        opt = lg.KFAC(model.parameters())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            handle = lg.attach(model, opt)
        odd = [f for f in handle.coverage.fallback if not any(e in f for e in expected)]
        assert not odd, (name, odd)
        handle.remove()
