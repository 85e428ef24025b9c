"""Optimizer behaviour: checkpoints, bad input, failure handling, torch.optim integration,
and a smoke run per optimizer where the loss falls."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from conftest import small_cnn as _model
from conftest import teacher_data as _data
from torch import nn

import lightning_grng as lg

KMODE = dict(preconditioner="kfac")  # the paper's route
OPTIMIZERS = {
    "KFAC": lambda p, **kw: lg.KFAC(p, **kw),
    "KFAC-kfac": lambda p, **kw: lg.KFAC(p, **KMODE, **kw),
    "KFAC-newton": lambda p, **kw: lg.KFAC(p, inverse="newton", **KMODE, **kw),
    "RING": lambda p, **kw: lg.RING(p, **kw),
    "RING-newton": lambda p, **kw: lg.RING(p, **KMODE, **kw),
    "RENG": lambda p, **kw: lg.RENG(p, **kw),
    "RENG-kfac": lambda p, **kw: lg.RENG(p, **KMODE, **kw),
    "RENG-fd": lambda p, **kw: lg.RENG(p, gr_mode="finite_difference", **kw),
}


def _train(opt, model, x, y, steps, start=0, batch=32):
    losses = []
    for i in range(start, start + steps):
        idx = torch.arange(i * batch, (i + 1) * batch) % x.shape[0]

        def closure(xb=x[idx], yb=y[idx]):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            double = isinstance(opt, lg.RENG) and opt.gr_mode.value == "double_backprop"
            loss.backward(create_graph=double)
            return loss

        losses.append(float(opt.step(closure).detach()))
    return losses


def _make(name, model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LayerNorm fallback warning
        opt = OPTIMIZERS[name](model.parameters(), **kw)
        lg.attach(model, opt)
    return opt


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_smoke_loss_falls(name):
    model = _model()
    x, y = _data()
    opt = _make(name, model, lr=0.05)
    losses = _train(opt, model, x, y, steps=40)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["KFAC", "RING-newton", "RENG", "RENG-fd"])
def test_state_dict_round_trip_mid_run_continues_identically(name, tmp_path):
    x, y = _data()
    kw = dict(lr=0.05, curvature_every=2, inverse_every=3)
    model = _model()
    opt = _make(name, model, **kw)
    _train(opt, model, x, y, steps=5)  # stops between curvature and inverse refreshes
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    reference = _train(opt, model, x, y, steps=6, start=5)
    ref_params = [p.detach().clone() for p in model.parameters()]

    model2 = _model()
    ckpt = torch.load(path, weights_only=True)
    model2.load_state_dict(ckpt["model"])
    opt2 = OPTIMIZERS[name](model2.parameters(), **kw)
    opt2.load_state_dict(ckpt["opt"])  # before attach: applied when the hooks are attached
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lg.attach(model2, opt2)
    resumed = _train(opt2, model2, x, y, steps=6, start=5)
    assert resumed == reference
    for a, b in zip(ref_params, model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_factor_dtypes_are_preserved_by_checkpoints():
    model = _model(torch.bfloat16)
    x, y = _data(dtype=torch.bfloat16)
    opt = _make("KFAC", model, curvature_every=1)
    _train(opt, model, x, y, steps=2)
    state = opt.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    opt2 = lg.KFAC(model.parameters(), curvature_every=1)
    opt.detach_hooks()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lg.attach(model, opt2)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    for key in opt2.blocks:
        assert opt2.factors(key).A.dtype == torch.float32  # not cast to the bf16 parameters
        assert opt2.factors(key).evec_A.dtype == torch.float32


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(lr=-1.0), "lr=-1.0"),
        (dict(momentum=1.0), "momentum=1.0"),
        (dict(weight_decay=-0.1), "weight_decay=-0.1"),
        (dict(damping=0.0), "damping=0.0"),
        (dict(damping=float("nan")), "damping=nan"),
        (dict(ema_decay=1.0), "ema_decay=1.0"),
        (dict(curvature_every=0), "curvature_every=0"),
        (dict(inverse_every=2.5), "inverse_every=2.5"),
        (dict(inverse="cholesky"), "inverse='cholesky'"),
        (dict(newton_iters=0), "newton_iters=0"),
        (dict(kl_clip=0.0), "kl_clip=0.0"),
        (dict(fisher="true"), "fisher='true'"),
        (dict(loss_reduction="avg"), "loss_reduction='avg'"),
    ],
)
@pytest.mark.parametrize("cls", [lg.KFAC, lg.RING, lg.RENG])
def test_invalid_hyperparameters_name_value_and_range(cls, kwargs, fragment):
    with pytest.raises(ValueError, match="allowed") as info:
        cls(nn.Linear(2, 2).parameters(), **kwargs)
    assert fragment in str(info.value) and cls.__name__ in str(info.value)


@pytest.mark.parametrize(
    "cls,kwargs,fragment",
    [
        (lg.RING, dict(rho=-0.5), "rho=-0.5"),
        (lg.RENG, dict(rho=-1), "rho=-1"),
        (lg.RENG, dict(gr_mode="hutchinson"), "gr_mode='hutchinson'"),
        (lg.RENG, dict(fd_eps=0.0), "fd_eps=0.0"),
    ],
)
def test_invalid_regularization_settings(cls, kwargs, fragment):
    with pytest.raises(ValueError, match="allowed") as info:
        cls(nn.Linear(2, 2).parameters(), **kwargs)
    assert fragment in str(info.value)


def test_step_without_hooks_says_what_to_add():
    model = nn.Linear(3, 2)
    opt = lg.RING(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    with pytest.raises(RuntimeError, match=r"lightning_grng\.attach\(model, optimizer\)") as info:
        opt.step()
    assert "GRNGCallback" in str(info.value)
    before = model.weight.detach().clone()
    assert torch.equal(before, model.weight)


def test_handle_remove_takes_hooks_off():
    model = nn.Linear(3, 2)
    opt = lg.KFAC(model.parameters(), curvature="kfac")
    handle = lg.attach(model, opt)
    assert len(model._forward_hooks) == 1
    handle.remove()
    assert len(model._forward_hooks) == 0
    with pytest.raises(RuntimeError, match="no curvature hooks"):
        model(torch.randn(2, 3)).sum().backward()
        opt.step()


def test_attach_rejects_other_optimizers():
    model = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="lightning_grng optimizer"):
        lg.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_reng_without_create_graph_says_what_to_do():
    model = nn.Linear(3, 2)
    opt = lg.RENG(model.parameters(), rho=0.1)
    lg.attach(model, opt)
    nn.functional.cross_entropy(model(torch.randn(4, 3)), torch.tensor([0, 1, 0, 1])).backward()
    with pytest.raises(RuntimeError, match=r"loss\.backward\(create_graph=True\)"):
        opt.step()


def test_reng_finite_difference_needs_a_closure():
    model = nn.Linear(3, 2)
    opt = lg.RENG(model.parameters(), rho=0.1, gr_mode="finite_difference")
    lg.attach(model, opt)
    model(torch.randn(4, 3)).sum().backward()
    with pytest.raises(RuntimeError, match=r"step\(closure\)"):
        opt.step()


def test_unsupported_modules_get_one_warning_summarizing_them_by_type():
    model = nn.Sequential(
        nn.Embedding(10, 4, max_norm=1.0), nn.LayerNorm(4), nn.LayerNorm(4), nn.Linear(4, 2)
    )
    model.register_parameter("temperature", nn.Parameter(torch.ones(())))
    opt = lg.KFAC(model.parameters())
    with pytest.warns(UserWarning) as record:
        handle = lg.attach(model, opt)
    messages = [str(w.message) for w in record if "no Kronecker block" in str(w.message)]
    assert len(messages) == 1
    for part in (
        "no Kronecker block for 1 × Embedding ('0'; max_norm",
        "2 × LayerNorm ('1', '2'), root parameters: temperature;",
        "fallback update",
    ):
        assert part in messages[0]
    assert "<root>" not in messages[0]
    assert "(1 block)" in str(handle.coverage) and "2 × LayerNorm" in str(handle.coverage)
    # the names are still there for whoever wants them
    assert "'1' (LayerNorm)" in handle.coverage.fallback
    assert "'<root>' (Sequential)" in handle.coverage.fallback
    # the fallback really updates them
    before = model[0].weight.detach().clone()
    nn.functional.cross_entropy(model(torch.tensor([1, 2])), torch.tensor([0, 1])).backward()
    opt.step()
    assert not torch.equal(before, model[0].weight)


def test_module_whose_hooks_never_fire_is_named():
    """A Linear whose weight is used through F.linear: its hooks never fire."""

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(nn.functional.linear(x, self.proj.weight, self.proj.bias).mean(1))

    model = Functional()
    opt = lg.KFAC(model.parameters(), curvature="kfac", curvature_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lg.attach(model, opt)
    x = torch.randn(4, 5, 8)
    with pytest.warns(RuntimeWarning, match=r"'proj'.*never fired"):
        nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 0, 1])).backward()
        opt.step()
    before = model.proj.weight.detach().clone()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 0, 1])).backward()
    opt.step()  # fallback update, no second warning, no crash
    assert not torch.equal(before, model.proj.weight)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradients_skip_the_step_and_raise_damping(bad):
    model = _model()
    x, y = _data()
    opt = _make("RING", model, curvature_every=1)
    _train(opt, model, x, y, steps=3)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
    model[4].weight.grad[0, 0] = bad
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert opt.skipped_steps == 1 and opt.damping_boost == 2.0
    assert opt.diagnostics["skipped_steps"] == 1.0
    _train(opt, model, x, y, steps=3, start=3)  # recovers, still finite
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_activations_never_reach_the_factors():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = lg.KFAC(model.parameters(), curvature_every=1, inverse_every=1)
    lg.attach(model, opt)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    good = {k: opt.factors(k).A.clone() for k in opt.blocks}
    opt.zero_grad()
    x_bad = x.clone()
    x_bad[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        nn.functional.cross_entropy(model(x_bad), y).backward()
        opt.step()
    for k in opt.blocks:
        assert torch.equal(opt.factors(k).A, good[k])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_factor_keeps_last_good_preconditioner_then_heals():
    model = nn.Linear(3, 2)
    opt = lg.KFAC(model.parameters(), curvature_every=3, inverse_every=1)
    lg.attach(model, opt)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()
    factors = opt.factors("0")
    evecs = factors.evec_A.clone()
    factors.A[0, 0, 0] = float("nan")  # corrupted state
    step()  # refresh only: fails, keeps the last good eigenbasis
    assert opt.inverse_failures == 1 and opt.damping_boost == 2.0
    assert torch.equal(factors.evec_A, evecs)
    assert torch.isfinite(model.weight).all()
    step()
    step()  # curvature step: the non-finite EMA restarts from the batch statistics
    assert factors.finite and torch.isfinite(factors.evec_A).all()
    assert opt.inverse_failures == 2  # the step in between also kept the old basis
    assert torch.isfinite(model.weight).all()


# ---------------------------------------------------------------- checkpoints: bad input
def test_checkpoint_from_another_optimizer_is_rejected():
    model = nn.Linear(3, 2)
    adam = torch.optim.AdamW(model.parameters())
    opt = lg.RING(model.parameters())
    with pytest.raises(ValueError, match="not saved by a lightning_grng optimizer"):
        opt.load_state_dict(adam.state_dict())
    kfac = lg.KFAC(model.parameters())
    with pytest.raises(ValueError, match="saved by KFAC, not RING"):
        opt.load_state_dict(kfac.state_dict())


def test_checkpoint_of_another_model_is_rejected():
    small, big = nn.Linear(3, 2), nn.Linear(5, 2)
    opt_small = lg.KFAC(small.parameters(), curvature_every=1)
    lg.attach(small, opt_small)
    small(torch.randn(4, 3)).sum().backward()
    opt_small.step()
    opt_big = lg.KFAC(big.parameters())
    lg.attach(big, opt_big)
    with pytest.raises(ValueError, match="factor A of module '' has shape"):
        opt_big.load_state_dict(opt_small.state_dict())
    two = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    opt_two = lg.KFAC(two.parameters())
    lg.attach(two, opt_two)
    state = copy.deepcopy(opt_small.state_dict())
    with pytest.raises(ValueError):  # param group sizes differ (torch's own check)
        opt_two.load_state_dict(state)


# ---------------------------------------------------------------- torch.optim integration
def test_param_groups_scheduler_and_clipping():
    model = _model()
    x, y = _data()
    head, body = (
        list(model[-1].parameters()),
        [p for n, p in model.named_parameters() if not n.startswith("6.")],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = lg.RING([{"params": body}, {"params": head, "lr": 0.01, "rho": 0.0}], lr=0.05)
        lg.attach(model, opt)
    # rho: the eigen mode's default
    assert opt.param_groups[1]["rho"] == 0.0 and opt.param_groups[0]["rho"] == 0.1
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for i in range(4):
        opt.zero_grad()
        batch = slice(i * 16, (i + 1) * 16)
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        assert math.isfinite(float(norm))
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.25)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.01 * 0.25)


def test_grad_scaler_unscale_and_step():
    model = _model()
    x, y = _data()
    opt = _make("KFAC", model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(x[:32]), y[:32])).backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
    assert opt.grng_step == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("curvature", ["kfac", "gradient"])
def test_grad_scaler_curvature_is_built_from_unscaled_gradients(curvature):
    """With the scaler passed to attach, G equals the unscaled run's; without it K-FAC's
    captured G is S² off, while gradient statistics (read after ``scaler.step`` unscaled the
    gradients) never see the scale."""
    x, y = _data()
    factors = {}
    for name, scale, pass_scaler in (("plain", None, False), ("scaled", 2.0**10, True),
                                     ("unaware", 2.0**10, False)):  # fmt: skip
        model = _model()
        opt = lg.KFAC(model.parameters(), curvature=curvature, curvature_every=1)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lg.attach(model, opt, grad_scaler=scaler if pass_scaler else None)
        loss = nn.functional.cross_entropy(model(x[:32]), y[:32])
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        factors[name] = [opt.factors(k).G for k in sorted(opt.blocks)]
    for plain, scaled, unaware in zip(*factors.values(), strict=True):
        torch.testing.assert_close(scaled, plain, rtol=1e-5, atol=1e-8)
        unscaled = plain * 2.0**20 if curvature == "kfac" else plain
        torch.testing.assert_close(unaware, unscaled, rtol=1e-4, atol=1e-3)


def test_mc_fisher_uses_sampled_labels_and_requires_the_pass():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(64, 4, dtype=torch.float64), torch.randint(0, 3, (64,))
    model_copy = copy.deepcopy(model)  # before attach: a deepcopy would copy the hooks
    opt = lg.KFAC(model.parameters(), fisher="mc", curvature_every=1)
    lg.attach(model, opt)
    logits = model(x)
    opt.mc_fisher_backward(logits)
    nn.functional.cross_entropy(logits, y).backward()
    opt.step()
    emp = lg.KFAC(model_copy.parameters(), curvature="kfac", curvature_every=1)
    lg.attach(model_copy, emp)
    nn.functional.cross_entropy(model_copy(x), y).backward()
    emp.step()
    # MC G differs from the empirical one but has the same scale (sampled labels, 64 samples)
    G_mc, G_emp = opt.factors("2").G, emp.factors("2").G
    assert not torch.allclose(G_mc, G_emp)
    assert 0.2 < float(G_mc[0].trace() / G_emp[0].trace()) < 5.0
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"mc_fisher_backward\(outputs\)"):
        opt.step()


def test_in_place_activation_after_layer_captures_pre_activation_gradient():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)).double()
    opt = lg.KFAC(model.parameters(), curvature="kfac", curvature_every=1)
    lg.attach(model, opt)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    s = nn.functional.linear(x, model[0].weight, model[0].bias)
    s.retain_grad()
    out = nn.functional.linear(torch.relu(s), model[2].weight, model[2].bias)
    nn.functional.cross_entropy(out, y).backward()
    expected = 6 * s.grad.T @ s.grad
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    torch.testing.assert_close(opt.factors("0").G[0], expected)


def test_adam_fallback_is_adamw_at_fallback_lr():
    """Parameters without a block (a LayerNorm, a bare parameter) take torch's AdamW step at
    fallback_lr × lr, with decoupled weight decay, per param group (float64)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)).double()
    model.register_parameter("scale", nn.Parameter(torch.ones(4, dtype=torch.float64)))
    reference = [p.detach().clone().requires_grad_() for p in (model[1].weight, model[1].bias)]
    scale_ref = model.scale.detach().clone().requires_grad_()
    groups = [
        {"params": [*model[0].parameters(), *model[1].parameters()]},
        {"params": [model.scale], "lr": 0.05, "weight_decay": 0.3},
    ]
    opt = lg.RING(groups, lr=0.02, weight_decay=0.1, fallback_lr=0.5)
    with pytest.warns(UserWarning, match="no Kronecker block"):
        lg.attach(model, opt)
    adamw = torch.optim.AdamW(
        [{"params": reference, "lr": 0.01, "weight_decay": 0.1},
         {"params": [scale_ref], "lr": 0.025, "weight_decay": 0.3}],
    )  # fmt: skip
    for step in range(5):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 4, generator=g, dtype=torch.float64)
        opt.zero_grad()
        (model(x) * model.scale).square().mean().backward()
        grads = [p.grad.clone() for p in (model[1].weight, model[1].bias, model.scale)]
        opt.step()
        for p, grad in zip([*reference, scale_ref], grads, strict=True):
            p.grad = grad
        adamw.step()
    trained = (model[1].weight, model[1].bias, model.scale)
    for got, want in zip(trained, [*reference, scale_ref], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
    state = opt.state_dict()["state"]
    assert {s["fallback_step"] for s in state.values() if "fallback_step" in s} == {5}
