"""The statistics rule: curvature statistics accumulate exactly like gradients.

Only backward passes whose gradients reach the optimizer's ``.grad`` between ``zero_grad()`` and
``step()`` count; a forward counts only when its backward arrives. Each test runs a loop with a
foreign pass and compares the factors with the same loop without it (``torch.equal``)."""

from __future__ import annotations

import copy
import pickle
from functools import partial

import pytest
import torch
from torch import nn

import lightning_grng as lg

# The paper's K-FAC route: these tests check its math (the eigen mode: test_eigen.py).
KFAC_K = partial(lg.KFAC, preconditioner="kfac")
RING_K = partial(lg.RING, preconditioner="kfac")
RENG_K = partial(lg.RENG, preconditioner="kfac")


def _disc():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()


def _kfac(params):
    # ema_decay=0: the factors after a step are exactly that step's statistics.
    return KFAC_K(params, lr=0.1, ema_decay=0.0, curvature_every=1, inverse_every=1)


def _data():
    g = torch.Generator().manual_seed(4)
    real = torch.randn(8, 4, generator=g, dtype=torch.float64)
    z = torch.randn(8, 2, generator=g, dtype=torch.float64)
    return real, z


def _d_loss(disc, real, fake):
    bce = nn.functional.binary_cross_entropy_with_logits
    ones, zeros = torch.ones(8, 1, dtype=real.dtype), torch.zeros(8, 1, dtype=real.dtype)
    return bce(disc(real), ones) + bce(disc(fake), zeros)


def _factors(opt):
    return {k: (opt.factors(k).A.clone(), opt.factors(k).G.clone()) for k in opt.blocks}


def _assert_equal_factors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]), k


def _gan_step(foreign: str | None):
    """One discriminator step; ``foreign`` names a pass through the discriminator that is not
    its own training backward."""
    disc, gen = _disc(), nn.Linear(2, 4).double()
    opt_d = _kfac(disc.parameters())
    lg.attach(disc, opt_d)
    real, z = _data()
    bce = nn.functional.binary_cross_entropy_with_logits
    if foreign == "generator_backward_then_zero_grad":
        # Typical GAN order: the generator's loss backpropagates into the discriminator's
        # .grad too; the discriminator's zero_grad clears it, and its statistics with it.
        g_loss = bce(disc(gen(z)), torch.ones(8, 1, dtype=torch.float64))
        g_loss.backward()
    opt_d.zero_grad()
    if foreign == "generator_autograd_grad":
        g_loss = bce(disc(gen(z)), torch.ones(8, 1, dtype=torch.float64))
        torch.autograd.grad(g_loss, list(gen.parameters()))
    if foreign == "metric_forward_without_backward":
        disc(real).sigmoid().mean()  # grad enabled, never backpropagated
    if foreign == "backward_then_model_zero_grad":
        _d_loss(disc, real * 3, gen(z).detach()).backward()
        disc.zero_grad()  # the module's zero_grad, not the optimizer's
    if foreign == "backward_then_zero_grad_not_to_none":
        _d_loss(disc, real * 3, gen(z).detach()).backward()
        opt_d.zero_grad(set_to_none=False)
    _d_loss(disc, real, gen(z).detach()).backward()
    opt_d.step()
    return opt_d


@pytest.mark.parametrize(
    "foreign",
    [
        "generator_backward_then_zero_grad",
        "generator_autograd_grad",
        "metric_forward_without_backward",
        "backward_then_model_zero_grad",
        "backward_then_zero_grad_not_to_none",
    ],
)
def test_foreign_passes_do_not_reach_the_statistics(foreign):
    reference = _gan_step(None)
    _assert_equal_factors(_factors(_gan_step(foreign)), _factors(reference))


def test_discriminator_rows_are_its_own_loss_rows():
    """The issue's count: 16 rows (real + fake) for the discriminator, not 24."""
    disc, gen = _disc(), nn.Linear(2, 4).double()
    opt_d = _kfac(disc.parameters())
    lg.attach(disc, opt_d)
    real, z = _data()
    nn.functional.binary_cross_entropy_with_logits(
        disc(gen(z)), torch.ones(8, 1, dtype=torch.float64)
    ).backward()
    opt_d.zero_grad()
    _d_loss(disc, real, gen(z).detach()).backward()
    accumulators = opt_d._capture.accumulators
    assert [acc.a_rows for acc in accumulators.values()] == [16, 16]
    assert [acc.g_samples for acc in accumulators.values()] == [16, 16]


def test_backward_through_a_retained_forward_counts_once():
    """A second backward through the same forward (retain_graph) adds nothing more."""
    disc = _disc()
    opt = _kfac(disc.parameters())
    lg.attach(disc, opt)
    real, _ = _data()
    loss = disc(real).pow(2).mean()
    loss.backward(retain_graph=True)
    rows = [acc.a_rows for acc in opt._capture.accumulators.values()]
    loss.backward()
    assert [acc.a_rows for acc in opt._capture.accumulators.values()] == rows == [8, 8]


def test_deep_copy_of_an_attached_model_never_feeds_the_original():
    reference = _gan_step(None)
    disc, gen = _disc(), nn.Linear(2, 4).double()
    opt_d = _kfac(disc.parameters())
    lg.attach(disc, opt_d)
    ema = copy.deepcopy(disc)  # an EMA / mean-teacher copy, trained on other data
    real, z = _data()
    opt_d.zero_grad()
    _d_loss(ema, real * 5, gen(z).detach()).backward()
    _d_loss(disc, real, gen(z).detach()).backward()
    opt_d.step()
    _assert_equal_factors(_factors(opt_d), _factors(reference))
    copied = [h for m in ema.modules() for h in m._forward_hooks.values()]
    assert copied and all(h.owner is None for h in copied)  # inert, no optimizer reference
    pickle.loads(pickle.dumps(disc))  # an attached model pickles (hooks travel inert)


def test_tied_weight_is_named_once_and_gets_the_fallback_update():
    """Two Linear layers sharing a weight (no embedding + output-map pair, which gets a tied
    block: tests/test_tied.py) cannot be one Kronecker block."""

    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(10, 4)
            self.mid = nn.Linear(4, 4)
            self.again = nn.Linear(4, 4)
            self.again.weight = self.mid.weight
            self.head = nn.Linear(4, 10)

        def forward(self, ids):
            return self.head(self.again(torch.tanh(self.mid(self.tok(ids)))))

    torch.manual_seed(0)
    model = TiedLM()
    opt = KFAC_K(
        model.parameters(), lr=0.1, momentum=0.0, kl_clip=None, curvature_every=1, fallback="sgd"
    )
    with pytest.warns(UserWarning) as record:
        lg.attach(model, opt)
    tied = [str(w.message) for w in record if "tied" in str(w.message)]
    assert len(tied) == 1 and "'mid.weight' and 'again.weight'" in tied[0]
    assert "fallback" in tied[0]
    assert sorted(b.name for b in opt.blocks.values()) == ["head", "tok"]
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    nn.functional.cross_entropy(model(ids).reshape(-1, 10), ids.reshape(-1)).backward()
    before, grad = model.mid.weight.detach().clone(), model.mid.weight.grad.clone()
    opt.step()
    torch.testing.assert_close(model.mid.weight, before - 0.1 * grad, rtol=0, atol=0)
