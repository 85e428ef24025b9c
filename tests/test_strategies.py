"""Lightning's sharding strategies (FSDP, DeepSpeed, ModelParallel) are refused at fit start with
one sentence naming what works, before any step could train with a split weight."""

from __future__ import annotations

import os
from types import SimpleNamespace
from unittest import mock

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

import lightning_grng as lg

SENTENCE = (
    r"KFAC cannot train under \w+, which splits every weight and gradient across processes, so "
    r"no Kronecker block would see a whole layer: use "
    r"strategy=lightning_grng\.GRNGDDPStrategy\(\) for several processes \(GRNGStrategy, or the "
    r"default strategy, on one device\)\.$"
)


class Tiny(L.LightningModule):
    def __init__(self, optimizer=lg.KFAC) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        self.optimizer = optimizer
        self.steps = 0

    def training_step(self, batch, _):
        self.steps += 1
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return self.optimizer(self.parameters(), lr=0.01)


class FSDPOnCPU(FSDPStrategy):
    """Lightning's FSDPStrategy all the way to fit start, but without the FSDP wrapper, which
    needs an accelerator (``FSDP needs a non-CPU accelerator device``); a subclass also passes
    the Trainer's 'fsdp needs a GPU' check (``type(strategy) is FSDPStrategy``)."""

    def _setup_model(self, model):
        return model


def _fit(strategy, module):
    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    was_initialized = torch.distributed.is_initialized()
    # Lightning writes MASTER_PORT, LOCAL_RANK, ... into os.environ: keep them out of later tests.
    try:
        with mock.patch.dict(os.environ):
            trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    finally:
        if torch.distributed.is_initialized() and not was_initialized:
            torch.distributed.destroy_process_group()
    return trainer


def test_fsdp_is_refused_at_fit_start_with_the_sentence():
    module = Tiny()
    with pytest.raises(MisconfigurationException, match=SENTENCE.replace(r"\w+", "FSDPOnCPU")):
        _fit(FSDPOnCPU(), module)
    assert module.steps == 0


def test_fsdp_without_a_grng_optimizer_is_left_alone():
    module = Tiny(optimizer=torch.optim.SGD)
    trainer = _fit(FSDPOnCPU(), module)
    assert trainer.global_step == 2


def test_plain_fsdp_on_cpu_stops_before_any_step():
    """Lightning itself refuses strategy='fsdp' without a GPU."""
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        _fit("fsdp", Tiny())


class ParallelizedTiny(Tiny):
    def configure_model(self):
        pass  # ModelParallelStrategy needs the hook; a real one would shard self.net here


def test_model_parallel_is_refused_at_fit_start_with_the_sentence():
    module = ParallelizedTiny()
    pattern = SENTENCE.replace(r"\w+", "ModelParallelStrategy")
    with pytest.raises(MisconfigurationException, match=pattern):
        _fit(ModelParallelStrategy(), module)
    assert module.steps == 0


def test_deepspeed_is_refused_through_its_optimizer_wrapper():
    """Lightning's DeepSpeedStrategy starts on CUDA only (and its constructor needs deepspeed),
    so the check is run on an instance of the real class with the optimizer nested the way
    DeepSpeed's ZeRO optimizer holds the client optimizer (``.optimizer``)."""
    module = Tiny()
    zero = SimpleNamespace(optimizer=module.configure_optimizers())
    trainer = SimpleNamespace(
        strategy=DeepSpeedStrategy.__new__(DeepSpeedStrategy),
        optimizers=[SimpleNamespace(optimizer=zero)],  # Lightning's wrapper around it
    )
    with pytest.raises(
        MisconfigurationException, match=SENTENCE.replace(r"\w+", "DeepSpeedStrategy")
    ):
        lg.GRNGCallback._refuse_sharding(trainer)
    trainer.optimizers = [SimpleNamespace(optimizer=torch.optim.SGD(module.parameters(), lr=0.1))]
    lg.GRNGCallback._refuse_sharding(trainer)  # no GRNG optimizer: left alone
