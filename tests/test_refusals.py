"""Refused input changes nothing, and every refusal or quiet corner says one clear sentence:
per-group hyperparameters, transactional loading, lazy layers, eval mode, copies of the
optimizer, rejected statistics, unfrozen layers, repeated attach, overlapping optimizers."""

from __future__ import annotations

import copy
import logging
import pickle
import warnings
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

import lightning_grng as lg

# The paper's K-FAC route: these tests check its math (the eigen mode: test_eigen.py).
KFAC_K = partial(lg.KFAC, preconditioner="kfac")
RING_K = partial(lg.RING, preconditioner="kfac")
RENG_K = partial(lg.RENG, preconditioner="kfac")

CLASSES = [lg.KFAC, lg.RING, lg.RENG, lg.RKalman]


def _mlp(d_in=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 4), nn.Tanh(), nn.Linear(4, 2))


def _train_step(model, opt, x=None):
    x = torch.randn(8, model[0].in_features) if x is None else x
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), torch.arange(8) % 2)
    if isinstance(opt, lg.RENG):
        lg.regularized_backward(loss, opt)
    else:
        loss.backward()
    opt.step()


# ---------------------------------------------------------------- 5: per-group validation
BAD_GROUPS = [
    ({"lr": float("nan")}, "invalid lr=nan"),
    ({"momentum": 1.5}, "invalid momentum=1.5"),
    ({"weight_decay": -1.0}, "invalid weight_decay=-1.0"),
    ({"damping": 0.0}, r"invalid damping=0.0; allowed: \(0.0, inf\)"),
]


GROUP_CASES = [(cls, bad, message) for cls in CLASSES for bad, message in BAD_GROUPS] + [
    (cls, {"rho": -1.0}, "invalid rho=-1.0") for cls in (lg.RING, lg.RENG, lg.RKalman)
]


@pytest.mark.parametrize(
    "cls, bad, message", GROUP_CASES, ids=lambda v: v.__name__ if isinstance(v, type) else None
)
def test_param_group_values_are_checked_like_the_constructors(cls, bad, message):
    model = _mlp()
    with pytest.raises(ValueError, match=f"{cls.__name__}: {message}"):
        cls([{"params": model[0].parameters(), **bad}, {"params": model[2].parameters()}])
    opt = cls(model[0].parameters())
    groups = list(opt.param_groups)
    with pytest.raises(ValueError, match=f"{cls.__name__}: {message}"):
        opt.add_param_group({"params": model[2].parameters(), **bad})
    assert opt.param_groups == groups  # refused group not added


def test_numpy_and_torch_scalars_are_numbers():
    model = _mlp()
    opt = RING_K(
        model.parameters(),
        lr=np.float32(0.05),
        momentum=torch.tensor(0.5),
        rho=np.float64(0.1),
        curvature_every=np.int64(2),
    )
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert isinstance(opt.param_groups[0]["momentum"], float) and opt.curvature_every == 2
    lg.attach(model, opt)
    _train_step(model, opt)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------- 6: transactional loading
def _state(opt):
    return copy.deepcopy(opt.state_dict())


def _assert_same_state(a, b):
    """Equal nested states: same keys, same types, tensors equal in value and dtype."""
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same_state(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same_state(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_refused_load_leaves_an_attached_optimizer_as_it_was(cls):
    other = _mlp(d_in=5)
    opt_other = cls(other.parameters(), curvature_every=1)
    lg.attach(other, opt_other)
    _train_step(other, opt_other)
    model = _mlp()
    opt = cls(model.parameters(), curvature_every=1)
    lg.attach(model, opt)
    _train_step(model, opt)
    before = _state(opt)
    with pytest.raises(ValueError, match="belongs to"):
        opt.load_state_dict(opt_other.state_dict())
    _assert_same_state(_state(opt), before)
    _train_step(model, opt)  # the next step works (no momentum buffer of the wrong shape)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_refused_load_before_attach_leaves_the_optimizer_detached_and_unchanged(cls):
    other = _mlp(d_in=5)
    opt_other = cls(other.parameters(), curvature_every=1)
    lg.attach(other, opt_other)
    _train_step(other, opt_other)
    model = _mlp()
    opt = cls(model.parameters(), curvature_every=1)
    before = _state(opt)
    try:
        opt.load_state_dict(opt_other.state_dict())  # momentum buffers refused here ...
    except ValueError:
        pass
    else:  # ... or the curvature blocks at attach
        with pytest.raises(ValueError, match=r"belongs to (a different|another) model"):
            lg.attach(model, opt)
    assert not opt.attached
    assert not any(m._forward_hooks for m in model.modules())
    _assert_same_state(_state(opt), before)
    lg.attach(model, opt)
    _train_step(model, opt)


def test_refused_curvature_at_attach_restores_the_state_before_the_load():
    """Momentum buffers of the right shape, curvature of another model: refused at attach,
    and the optimizer's state is the one from before load_state_dict."""
    source = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt_source = KFAC_K(source.parameters(), curvature_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # '2' skipped: fallback
        lg.attach(source, opt_source, skip_modules=["2"])
        _train_step(source, opt_source)
    model = _mlp()
    opt = KFAC_K(model.parameters(), curvature_every=1)
    before = _state(opt)
    opt.load_state_dict(opt_source.state_dict())
    with pytest.raises(ValueError, match="belongs to a different model"):
        lg.attach(model, opt)
    assert not opt.attached
    _assert_same_state(_state(opt), before)


# ---------------------------------------------------------------- 8: one clear sentence
def test_lazy_layer_before_its_first_forward_is_named():
    model = nn.Sequential(nn.LazyLinear(6), nn.ReLU(), nn.Linear(6, 2))
    opt = RING_K(model.parameters())
    with pytest.raises(RuntimeError, match=r"module '0' \(LazyLinear\) is not initialized"):
        lg.attach(model, opt)
    assert not opt.attached
    model(torch.randn(2, 3))  # materialized: now it attaches and trains
    lg.attach(model, opt)
    _train_step(model, opt, torch.randn(8, 3))


def test_training_in_eval_mode_is_named_as_such():
    model = _mlp()
    opt = KFAC_K(model.parameters(), curvature_every=1)
    lg.attach(model, opt)
    model.eval()
    with pytest.warns(RuntimeWarning, match="ran in eval mode") as record:
        _train_step(model, opt)
    assert not any("functional path" in str(w.message) for w in record)


@pytest.mark.parametrize("copier", [copy.deepcopy, copy.copy, pickle.dumps])
def test_copying_or_pickling_the_optimizer_says_what_to_do(copier):
    model = _mlp()
    opt = RING_K(model.parameters())
    lg.attach(model, opt)
    with pytest.raises(TypeError, match=r"cannot be copied or pickled.*state_dict\(\)"):
        copier(opt)


# ---------------------------------------------------------------- 9: quiet corners
def test_rejected_statistics_are_counted_visibly_and_said_once():
    model = nn.Linear(3, 2)
    opt = KFAC_K(model.parameters(), curvature_every=1, kl_clip=1e-6)
    lg.attach(model, opt)
    x = torch.randn(8, 3)
    x[0, 0] = 1e20  # ā āᵀ overflows float32; the gradient stays finite

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), torch.arange(8) % 2).backward()
        opt.step()

    with pytest.warns(RuntimeWarning, match="not finite.*dropped"):
        step()
    assert opt.diagnostics["rejected_statistics"] == 1.0 and opt.skipped_steps == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        step()
    assert opt.diagnostics["rejected_statistics"] == 2.0
    assert opt.state_dict()["grng"]["rejected_statistics"] == 2


def test_layer_unfrozen_after_attach_is_named():
    model = _mlp()
    model[0].weight.requires_grad_(False)
    opt = KFAC_K(model.parameters(), curvature_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # model[0].bias: fallback, said at attach
        handle = lg.attach(model, opt)
    _train_step(model, opt)
    model[0].weight.requires_grad_(True)
    with pytest.warns(RuntimeWarning, match=r"module '0' was frozen.*re-attach"):
        _train_step(model, opt)
    handle.remove()
    lg.attach(model, opt)  # re-attaching gives it a block
    assert "0" in [b.name for b in opt.blocks.values()]


def test_attaching_twice_gives_handles_that_do_not_detach_each_other():
    model = _mlp()
    opt = KFAC_K(model.parameters())
    first, second = lg.attach(model, opt), lg.attach(model, opt)
    first.remove()
    first.remove()  # idempotent: does not release the second handle
    assert opt.attached and second.attached and not first.attached
    _train_step(model, opt)
    second.remove()
    assert not opt.attached and not model[0]._forward_hooks


@pytest.mark.parametrize("shared", ["all", "fallback only"])
def test_two_grng_optimizers_over_one_parameter_are_refused(shared):
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    if shared == "all":
        first_params, second_params = model.parameters(), model.parameters()
    else:  # the first has no block at all (LayerNorm only): its marker still names it
        first_params, second_params = model[1].parameters(), model.parameters()
    first, second = KFAC_K(first_params), RING_K(second_params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lg.attach(model, first)
        with pytest.raises(ValueError, match="RING and the attached KFAC both optimize"):
            lg.attach(model, second)
    assert not second.attached


def test_attach_refuses_an_optimizer_over_none_of_the_models_parameters():
    model, other = nn.Linear(3, 2), nn.Linear(3, 2)
    with pytest.raises(ValueError, match="holds none of the parameters of Linear, so nothing"):
        lg.attach(model, lg.RING(other.parameters()))


@pytest.mark.parametrize("kwargs", [{}, {"preconditioner": "kfac"}])
def test_an_absurd_rho_is_warned_about_with_the_reason(kwargs):
    with pytest.warns(UserWarning, match="training would stand still"):
        lg.RING(nn.Linear(3, 2).parameters(), rho=1e30, **kwargs)
    opt = lg.RING(nn.Linear(3, 2).parameters(), rho=1.0, **kwargs)  # no warning
    with pytest.warns(UserWarning, match="rho=1e\\+12"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "rho": 1e12})


def test_a_refresh_of_very_wide_factors_says_so_once(caplog):
    model = nn.Linear(2048, 2)
    # The eigen mode keeps factors over 2048 diagonal by default: this one is decomposed.
    opt = lg.KFAC(model.parameters(), curvature_every=1, inverse_every=1, max_factor=4096)
    lg.attach(model, opt, report=False)
    x, y = torch.randn(4, 2048), torch.randint(0, 2, (4,))
    with caplog.at_level(logging.INFO, logger="lightning_grng"):
        for _ in range(2):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    said = [r.getMessage() for r in caplog.records if "factors up to" in r.getMessage()]
    assert len(said) == 1 and "2049 wide" in said[0] and "O(n³)" in said[0]
