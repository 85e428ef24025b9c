"""Real Trainer runs: callback via entry point, GRNGStrategy, manual optimization, gradient
accumulation, diagnostics, checkpoints, bf16-mixed."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, LearningRateFinder, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.tuner import Tuner
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_grng as lg
from examples.data.synthetic import EpochSeededSampler, RandomImagesDataModule
from examples.models import ImageClassifier

DATA = torch.Generator().manual_seed(0)
X = torch.randn(64, 6, generator=DATA, dtype=torch.float64)
Y = torch.randint(0, 3, (64,), generator=DATA)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


class Tiny(L.LightningModule):
    def __init__(self, make_opt, manual: bool = False):
        super().__init__()
        self.net = _net()
        self.make_opt = make_opt
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return None

    def configure_optimizers(self):
        return self.make_opt(self.net.parameters())


def _trainer(**kwargs):
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**defaults, **kwargs})


def _loader(batch):
    return DataLoader(TensorDataset(X, Y), batch_size=batch, shuffle=False)


def _plain(make_opt, steps, batch, backward, micro=1):
    """The same run written as the plain PyTorch loop."""
    net = _net()
    opt = make_opt(net.parameters())
    lg.attach(net, opt)
    batches = iter(_loader(batch // micro))
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(micro):
            x, y = next(batches)
            backward(nn.functional.cross_entropy(net(x), y) / micro, opt)
        opt.step()
    return list(net.parameters())


def _plain_backward(loss, opt):
    loss.backward()


def _assert_same(a, b, tol=1e-12):
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)


def kfac(p):
    return lg.KFAC(p, curvature_every=1, inverse_every=2)


def ring(p):
    return lg.RING(p, rho=0.5, curvature_every=1, inverse_every=2)


def reng(p):
    return lg.RENG(p, rho=0.5, curvature_every=1, inverse_every=2)


def rkalman(p):
    return lg.RKalman(p, rho=0.1, curvature_every=1)


@pytest.mark.parametrize("make_opt", [kfac, ring, rkalman], ids=["KFAC", "RING", "RKalman"])
def test_entry_point_callback_trains_like_plain_pytorch(make_opt):
    model = Tiny(make_opt)
    trainer = _trainer(max_steps=4)
    grng_callbacks = [cb for cb in trainer.callbacks if isinstance(cb, lg.GRNGCallback)]
    assert len(grng_callbacks) == 1  # from the entry point, not added here
    trainer.fit(model, _loader(16))
    _assert_same(model.net.parameters(), _plain(make_opt, 4, 16, _plain_backward))
    assert not model.net[0]._forward_hooks  # removed at teardown


def test_explicit_callback_as_well_is_harmless():
    model = Tiny(ring)
    trainer = _trainer(max_steps=4, callbacks=[lg.GRNGCallback()])
    assert sum(isinstance(cb, lg.GRNGCallback) for cb in trainer.callbacks) == 2
    trainer.fit(model, _loader(16))
    _assert_same(model.net.parameters(), _plain(ring, 4, 16, _plain_backward))


def test_callback_is_inert_without_grng_optimizer():
    seen = []

    class Probe(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(len(pl_module.net[0]._forward_hooks))

    model = Tiny(lambda p: torch.optim.AdamW(p, lr=1e-2))
    _trainer(max_steps=3, callbacks=[Probe()]).fit(model, _loader(16))
    assert seen == [0, 0, 0]


def test_grng_optimizer_without_callback_says_what_to_add(monkeypatch):
    monkeypatch.setattr(
        "lightning.pytorch.trainer.connectors.callback_connector._load_external_callbacks",
        lambda group: [],
    )
    with pytest.raises(RuntimeError, match="GRNGCallback"):
        _trainer(max_steps=1).fit(Tiny(ring), _loader(16))


def _reng_plain_backward(loss, opt):
    loss.backward(create_graph=True)


def test_reng_strategy_on_unmodified_module_equals_plain_double_backprop():
    model = Tiny(reng)
    _trainer(max_steps=4, strategy=lg.GRNGStrategy()).fit(model, _loader(16))
    _assert_same(model.net.parameters(), _plain(reng, 4, 16, _reng_plain_backward), tol=1e-10)


@pytest.mark.parametrize("strategy", ["grng", "auto"])
def test_reng_manual_optimization(strategy):
    model = Tiny(reng, manual=True)
    _trainer(max_steps=4, strategy=lg.GRNGStrategy() if strategy == "grng" else "auto").fit(
        model, _loader(16)
    )
    _assert_same(model.net.parameters(), _plain(reng, 4, 16, _reng_plain_backward), tol=1e-10)


def test_reng_callback_fallback_equals_strategy_and_says_so_once(caplog):
    model = Tiny(reng)
    with caplog.at_level(logging.INFO):
        _trainer(max_steps=4).fit(model, _loader(16))
    messages = [r.getMessage() for r in caplog.records if "extra local backward" in r.getMessage()]
    assert len(messages) == 1 and "GRNGStrategy" in messages[0]
    _assert_same(model.net.parameters(), _plain(reng, 4, 16, _reng_plain_backward), tol=1e-10)


@pytest.mark.parametrize("make_opt", [kfac, ring], ids=["KFAC", "RING"])
def test_gradient_accumulation_equals_unaccumulated_batch(make_opt):
    accumulated = Tiny(make_opt)
    _trainer(max_steps=3, accumulate_grad_batches=2).fit(accumulated, _loader(8))
    full = Tiny(make_opt)
    _trainer(max_steps=3).fit(full, _loader(16))
    _assert_same(accumulated.net.parameters(), full.net.parameters(), tol=1e-10)


@pytest.mark.parametrize("strategy", ["grng", "auto"])
def test_reng_accumulation_regularizes_each_micro_batch(strategy):
    """RENG under accumulation: Σ_i ∇(ℓ_i + ρ/2‖∇ℓ_i‖²)/N, the gradient-regularization term
    formed per micro-batch (factors and plain gradients still equal the full batch)."""
    model = Tiny(reng)
    kwargs = dict(strategy=lg.GRNGStrategy()) if strategy == "grng" else {}
    _trainer(max_steps=3, accumulate_grad_batches=2, **kwargs).fit(model, _loader(8))

    def backward(loss, opt):
        lg.regularized_backward(loss, opt, loss_scale=0.5)

    _assert_same(model.net.parameters(), _plain(reng, 3, 16, backward, micro=2), tol=1e-10)


def test_diagnostics_are_logged(tmp_path):
    model = Tiny(ring)
    trainer = _trainer(max_steps=5, logger=CSVLogger(tmp_path), log_every_n_steps=1)
    trainer.fit(model, _loader(16))
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    keys = ("grng/loss", "grng/grad_norm", "grng/damping", "grng/kl_scale", "grng/skipped_steps")
    keys += ("grng/rejected_statistics",)
    for key in keys:
        assert key in header[0]
    # The per-layer damping-to-curvature ratio of every Kronecker block (issue 11).
    ratios = {k for k in header[0].split(",") if k.startswith("grng/damping_ratio/")}
    assert ratios == {"grng/damping_ratio/net.0", "grng/damping_ratio/net.2"}


def _resumable(make_opt, tmp_path, epochs, ckpt_path=None):
    torch.manual_seed(0)
    model = Tiny(make_opt)
    loader = DataLoader(
        TensorDataset(X, Y), batch_size=16, sampler=EpochSeededSampler(len(X), seed=3)
    )
    trainer = _trainer(
        max_epochs=epochs,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)],
    )
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    return model, trainer


@pytest.mark.parametrize("make_opt", [ring, reng, rkalman], ids=["RING", "RENG", "RKalman"])
def test_fit_resumes_with_all_curvature_state(make_opt, tmp_path):
    straight, _ = _resumable(make_opt, tmp_path / "a", epochs=4)
    _resumable(make_opt, tmp_path / "b", epochs=2)
    resumed, trainer = _resumable(
        make_opt, tmp_path / "c", epochs=4, ckpt_path=tmp_path / "b" / "last.ckpt"
    )
    optimizer = trainer.optimizers[0]
    assert optimizer.grng_step == 16
    _assert_same(straight.net.parameters(), resumed.net.parameters(), tol=0)


def test_resume_with_another_optimizers_checkpoint_fails_clearly(tmp_path):
    _resumable(lambda p: torch.optim.AdamW(p), tmp_path / "adam", epochs=1)
    with pytest.raises(ValueError, match="not saved by a lightning_grng optimizer"):
        _resumable(ring, tmp_path / "x", epochs=2, ckpt_path=tmp_path / "adam" / "last.ckpt")
    _resumable(kfac, tmp_path / "kfac", epochs=1)
    with pytest.raises(ValueError, match="saved by KFAC, not RING"):
        _resumable(ring, tmp_path / "y", epochs=2, ckpt_path=tmp_path / "kfac" / "last.ckpt")


def test_corrupted_checkpoint_fails_clearly(tmp_path):
    _resumable(ring, tmp_path / "ok", epochs=1)
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes((tmp_path / "ok" / "last.ckpt").read_bytes()[:500])
    with pytest.raises(RuntimeError, match=r"corrupt\.ckpt"):
        model = Tiny(ring)
        _trainer(max_epochs=2, strategy=lg.GRNGStrategy()).fit(
            model, _loader(16), ckpt_path=corrupt
        )


def test_bf16_mixed_trains_without_nan_and_keeps_float32_curvature():
    torch.manual_seed(0)
    model = ImageClassifier(width=4, hidden=16)
    trainer = _trainer(max_steps=12, precision="bf16-mixed")
    data = RandomImagesDataModule(num_samples=256, batch_size=32)
    trainer.fit(model, data)
    optimizer = trainer.optimizers[0] if trainer.optimizers else None
    assert optimizer is not None
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for key in optimizer.blocks:
        assert optimizer.factors(key).A.dtype == torch.float32
    assert optimizer.skipped_steps == 0


def test_fp16_grad_scaler_of_the_precision_plugin_reaches_the_hooks():
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    trainer = _trainer(max_steps=3, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    seen = []

    class Probe(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(trainer.optimizers[0]._gate.grad_scaler)

    trainer.callbacks.append(Probe())
    model = ImageClassifier(width=4, hidden=16)
    trainer.fit(model, RandomImagesDataModule(num_samples=96, batch_size=32))
    assert seen and all(s is scaler for s in seen)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_partial_accumulation_window_has_the_g_of_the_batches_it_saw():
    """6 batches with accumulate_grad_batches=4: the last window has 2 micro-batches, whose
    losses Lightning still divides by 4; its G equals the un-accumulated reference's."""

    def make(p):  # lr=0 keeps the weights, ema_decay=0 keeps only the last window's factors
        return lg.KFAC(
            p, lr=0.0, ema_decay=0.0, curvature_every=1, inverse_every=1, curvature="kfac"
        )

    model = Tiny(make)
    trainer = _trainer(max_epochs=1, accumulate_grad_batches=4)
    trainer.fit(model, DataLoader(TensorDataset(X[:24], Y[:24]), batch_size=4))
    optimizer = trainer.optimizers[0]
    assert optimizer.grng_step == 2
    reference = _net()
    ref_opt = make(reference.parameters())
    lg.attach(reference, ref_opt)
    nn.functional.cross_entropy(reference(X[16:24]), Y[16:24]).backward()
    ref_opt.step()
    for key in ref_opt.blocks:
        got, want = optimizer.factors(key), ref_opt.factors(key)
        torch.testing.assert_close(got.G, want.G, rtol=1e-12, atol=0)
        torch.testing.assert_close(got.A, want.A, rtol=1e-12, atol=0)


class TunableTiny(Tiny):
    """Tiny with the ``lr`` attribute the learning-rate finder reads and sets."""

    def __init__(self, cls):
        super().__init__(None)
        self.cls, self.lr = cls, 0.01

    def configure_optimizers(self):
        return self.cls(self.net.parameters(), lr=self.lr, curvature_every=1)


GRNG_CLASSES = [lg.KFAC, lg.RING, lg.RENG, lg.RKalman]


def _tuner_strategy(cls):
    # RENG's double backprop inside a tuner needs a strategy that drives it (see below).
    return lg.GRNGStrategy() if cls is lg.RENG else "auto"


@pytest.mark.parametrize("cls", GRNG_CLASSES, ids=lambda c: c.__name__)
def test_lr_finder_of_the_tuner_works(cls):
    model = TunableTiny(cls)
    trainer = _trainer(max_steps=3, strategy=_tuner_strategy(cls))
    finder = Tuner(trainer).lr_find(
        model, train_dataloaders=_loader(8), min_lr=1e-4, max_lr=1.0, num_training=6
    )
    assert len(finder.results["lr"]) == 6
    assert all(torch.isfinite(torch.tensor(v)) for v in finder.results["loss"])


@pytest.mark.parametrize("cls", GRNG_CLASSES, ids=lambda c: c.__name__)
def test_lr_finder_callback_works_and_training_follows(cls):
    model = TunableTiny(cls)
    finder = LearningRateFinder(min_lr=1e-4, max_lr=1.0, num_training_steps=6)
    trainer = _trainer(max_steps=4, callbacks=[finder], strategy=_tuner_strategy(cls))
    trainer.fit(model, _loader(8))
    optimizer = trainer.optimizers[0]
    assert len(finder.optimal_lr.results["lr"]) == 6
    assert optimizer.grng_step == 4 and not optimizer.attached  # detached at teardown
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_lr_finder_with_reng_and_a_strategy_that_cannot_regularize_says_what_to_use():
    model = TunableTiny(lg.RENG)
    with pytest.raises(MisconfigurationException, match="runs its training steps without"):
        Tuner(_trainer(max_steps=3)).lr_find(model, train_dataloaders=_loader(8), num_training=4)


@pytest.mark.parametrize("content", ["truncated", "text", "empty"])
def test_unreadable_checkpoint_is_named_with_the_default_strategy(content, tmp_path):
    _resumable(ring, tmp_path / "ok", epochs=1)
    good = (tmp_path / "ok" / "last.ckpt").read_bytes()
    data = {"truncated": good[: len(good) // 2], "text": b"not a checkpoint\n", "empty": b""}
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(data[content])
    with pytest.raises(RuntimeError, match=r"Cannot read the checkpoint .*bad\.ckpt: it is empty"):
        _trainer(max_epochs=2).fit(Tiny(ring), _loader(16), ckpt_path=bad)


ImageClassifier.configure_optimizers = lambda self: lg.RING(  # type: ignore[method-assign]
    self.parameters(), lr=0.05, curvature_every=1, inverse_every=3
)
