"""RKalman: property 5 of docs/algorithms.md (exact Bayes, factors = inverse of their precision,
no inversion routine), float32 robustness, and the optimizer contract (smoke, checkpoints,
bad input)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import classification_batch, mlp, sequential_reference
from conftest import small_cnn as _cnn
from conftest import teacher_data as _data
from torch import nn
from torch.overrides import TorchFunctionMode

import lightning_grng as lg
from lightning_grng.curvature.kalman import KalmanFactors
from lightning_grng.curvature.kalman_identities import (
    add_floor,
    floor_terms,
    predict,
    sherman_morrison_update,
    woodbury_update,
)
from lightning_grng.curvature.kalman_measurement import KalmanAccumulator

F64 = torch.float64


def _spd(n: int, groups: int = 2, shift: float = 0.5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(groups, n, n, generator=g, dtype=F64)
    return X @ X.mT / n + shift * torch.eye(n, dtype=F64)


# ---------------------------------------------------------------- the identities (float64)
def test_sherman_morrison_and_blocked_woodbury_equal_the_explicit_inverse():
    L = _spd(7)
    P = torch.linalg.inv(L)
    U = torch.randn(2, 7, 5, dtype=F64)
    c = torch.tensor([0.7, 3.0], dtype=F64)
    expected = torch.linalg.inv(L + U @ U.mT / c[:, None, None])
    sequential = P
    for j in range(5):
        sequential = sherman_morrison_update(sequential, U[..., j], c)
    torch.testing.assert_close(sequential, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(woodbury_update(P, U, c), expected, rtol=1e-10, atol=1e-12)


def test_predict_is_forgetting_of_the_precision():
    L = _spd(4)
    torch.testing.assert_close(torch.linalg.inv(predict(torch.linalg.inv(L), 0.8)), 0.8 * L)


@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.5])
def test_floor_series_meets_its_error_bound_and_never_under_floors(ratio):
    L = _spd(6, shift=1.0)
    P = torch.linalg.inv(L)
    norm = torch.linalg.matrix_norm(P, ord=2)
    c = ratio / norm  # c‖P‖ = ratio exactly
    exact = L + c[:, None, None] * torch.eye(6, dtype=F64)
    for terms in (1, 3, 5):
        added = torch.linalg.eigvalsh(torch.linalg.inv(add_floor(P, c, terms)) - exact)
        rel = added / c[:, None]
        bound = (1 + ratio) * ratio**terms / (1 - ratio ** (terms + 1))
        assert rel.min() > -1e-9  # odd K: the floor is never under-applied
        assert rel.max() <= bound * (1 + 1e-6)
    k = floor_terms(ratio, 1e-9)
    err = torch.linalg.inv(add_floor(P, c, k)) - exact
    assert float(torch.linalg.matrix_norm(err, ord=2).max() / c.min()) <= 1e-9


def test_sketch_is_an_unbiased_measurement_and_rows_are_exact_when_few():
    rows = torch.randn(1, 40, 5, dtype=F64)
    gram = rows[0].T @ rows[0]
    acc = KalmanAccumulator("sketch", size=8, seed_fn=lambda: 0)
    draws = []
    for _ in range(400):
        U = acc._compress(rows)
        draws.append(U[0] @ U[0].T)
    mean = torch.stack(draws).mean(0)
    assert float((mean - gram).norm() / gram.norm()) < 0.1
    exact = KalmanAccumulator("rows", size=64, seed_fn=lambda: 0)._compress(rows)
    torch.testing.assert_close(exact[0] @ exact[0].T, gram)


# ---------------------------------------------------------------- property 5: exact Bayes
def _ridge_problem(n=48, d=4, noise=0.5):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(n, d, generator=g, dtype=F64)
    w = torch.randn(d, generator=g, dtype=F64)
    y = X @ w + 0.3 + math.sqrt(noise) * torch.randn(n, generator=g, dtype=F64)
    return X, y[:, None]


@pytest.mark.parametrize(
    "sizes,shuffle",
    [([48], False), ([16, 16, 16], False), ([5, 11, 1, 20, 11], True), ([1] * 6 + [42], True)],
)
def test_linear_gaussian_filter_equals_closed_form_ridge_posterior(sizes, shuffle):
    """Mean and covariance after all data equal the Bayesian ridge posterior, for any split and
    order: prior N(θ₀, (N₀λ)⁻¹ I), likelihood N(y; Xθ, σ²)."""
    noise, prior_count, damping = 0.5, 2.0, 0.25
    X, y = _ridge_problem(noise=noise)
    if shuffle:
        perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(sum(sizes)))
        X, y = X[perm], y[perm]
    torch.manual_seed(0)
    layer = nn.Linear(4, 1).double()
    theta0 = torch.cat([layer.weight.detach()[0], layer.bias.detach()])
    opt = lg.RKalman(
        layer.parameters(),
        lr=1.0,
        momentum=0.0,
        kl_clip=None,
        rho=0.0,
        forgetting=1.0,
        prior_count=prior_count,
        damping=damping,
        observation_noise=noise,
        loss_reduction="sum",
        measurement="rows",
        measurement_size=64,
        curvature_every=1,
    )
    lg.attach(layer, opt)
    start = 0
    for size in sizes:
        xb, yb = X[start : start + size], y[start : start + size]
        start += size
        opt.zero_grad()
        (0.5 * (layer(xb) - yb).pow(2).sum() / noise).backward()
        opt.step()
    assert start == X.shape[0]

    Xb = torch.cat([X, torch.ones(X.shape[0], 1, dtype=F64)], 1)
    prior_precision = prior_count * damping
    precision = prior_precision * torch.eye(5, dtype=F64) + Xb.T @ Xb / noise
    cov = torch.linalg.inv(precision)
    mean = cov @ (prior_precision * theta0 + Xb.T @ y[:, 0] / noise)
    theta = torch.cat([layer.weight.detach()[0], layer.bias.detach()])
    torch.testing.assert_close(theta, mean, rtol=1e-9, atol=1e-10)
    state = opt.filter("0")
    assert state.P_G.shape == (1, 1, 1)
    torch.testing.assert_close(state.covariance()[0], cov, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- property 5: P = Λ⁻¹
def _floors(mA, mG, lam):
    pi = math.sqrt(mA / mG)
    return pi * math.sqrt(lam), math.sqrt(lam) / pi


@pytest.mark.parametrize("rho,prior_count", [(0.0, None), (0.3, 3.0)])
def test_factors_equal_explicit_inverse_of_their_precision_after_many_updates(rho, prior_count):
    """An independent dense recursion Λ̄ ← (1−γ)Λ̄ + βδ(λ)I + γ(S + [δ(λ+ρ‖g‖²) − δ(λ)]I)
    (S: the exact batch factors of a hand-written backward; δ: the π split of a damping)
    inverted with linalg.inv equals the maintained P after 30 updates with forgetting, for
    ρ = 0 at the stationary prior count and ρ > 0 with a prior count that makes β ≠ γ."""
    eps_f, lam, steps = 0.9, 0.05, 30
    model = mlp()
    opt = lg.RKalman(
        model.parameters(),
        lr=0.5,
        momentum=0.0,
        damping=lam,
        rho=rho,
        forgetting=eps_f,
        measurement="rows",
        measurement_size=8,
        curvature_every=1,
        floor_tol=1e-13,
        prior_count=prior_count,
    )
    lg.attach(model, opt)
    ref: list[dict] = []
    prior = 1.0 / (1.0 - eps_f) if prior_count is None else prior_count
    count = prior
    for step in range(steps):
        x, y = classification_batch()
        x = x + 0.1 * step
        _, refs = sequential_reference(model, x, y)
        grad_sq = sum(float(V.pow(2).sum()) for _, _, V in refs)
        new_count = eps_f * count + 1.0
        gain, beta = 1.0 / new_count, (1.0 - eps_f) * prior / new_count
        for i, (A, G, _) in enumerate(refs):
            nA, nG = A.shape[0], G.shape[0]
            if step == 0:
                dA, dG = _floors(float(A.trace()) / nA, float(G.trace()) / nG, lam)
                ref.append(
                    dict(
                        LA=dA * torch.eye(nA, dtype=F64),
                        LG=dG * torch.eye(nG, dtype=F64),
                        mA=float(A.trace() / nA),
                        mG=float(G.trace() / nG),
                    )
                )
            r = ref[i]
            r["mA"] = (1 - gain) * r["mA"] + gain * float(A.trace()) / nA
            r["mG"] = (1 - gain) * r["mG"] + gain * float(G.trace()) / nG
            pA, pG = _floors(r["mA"], r["mG"], lam)
            tA, tG = _floors(r["mA"], r["mG"], lam + rho * grad_sq)
            incA, incG = beta * pA + gain * (tA - pA), beta * pG + gain * (tG - pG)
            r["LA"] = (1 - gain) * r["LA"] + incA * torch.eye(nA, dtype=F64) + gain * A
            r["LG"] = (1 - gain) * r["LG"] + incG * torch.eye(nG, dtype=F64) + gain * G
        count = new_count
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for key, r in zip(["0", "2"], ref, strict=True):
        state = opt.filter(key)
        assert state.updates == steps and state.count == pytest.approx(count, rel=1e-12)
        assert state.floor_resets == 0
        torch.testing.assert_close(state.P_A[0], torch.linalg.inv(r["LA"]), rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(state.P_G[0], torch.linalg.inv(r["LG"]), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("forgetting", [0.95, 1.0])
def test_rho_enters_the_filter_and_rho_zero_is_the_plain_filter(forgetting):
    runs = {}
    x, y = classification_batch()
    for name, kw in {
        "plain": dict(rho=0.0),
        "noise0": dict(rho=0.0, rho_mode="noise"),
        "damping": dict(rho=5.0),
        "noise": dict(rho=5.0, rho_mode="noise"),
    }.items():
        model = mlp()
        before = torch.cat([p.detach().flatten() for p in model.parameters()])
        opt = lg.RKalman(
            model.parameters(),
            curvature_every=1,
            momentum=0.0,
            kl_clip=None,
            forgetting=forgetting,
            prior_count=4.0,
            **kw,
        )
        lg.attach(model, opt)
        for _ in range(2):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        runs[name] = (opt.filter("0"), float((after - before).norm()), after)
    plain, plain_step, plain_params = runs["plain"]
    # ρ = 0: both modes are the plain filter, bit for bit
    assert torch.equal(runs["noise0"][0].P_A, plain.P_A)
    assert torch.equal(runs["noise0"][2], plain_params)
    # damping mode: the GR curvature is absorbed as information, also without forgetting
    damping = runs["damping"][0]
    assert not torch.equal(damping.P_A, plain.P_A)
    assert float(damping.P_A.diagonal(dim1=-2, dim2=-1).sum()) < float(
        plain.P_A.diagonal(dim1=-2, dim2=-1).sum()
    )
    # noise mode: the batch counts less (smaller information count), and the mean moves less
    assert runs["noise"][0].count < plain.count
    assert runs["noise"][1] < plain_step


@pytest.mark.parametrize("measurement", ["rows", "sketch"])
def test_gradient_accumulation_measures_the_whole_batch(measurement):
    """Two micro-batches before one step: rows are exactly the full batch's; a sketch adds the
    micro-batches' sketches (same k columns, expectation the full batch's statistic)."""
    x, y = classification_batch(16)
    states = []
    for chunks in (1, 2):
        model = mlp()
        opt = lg.RKalman(model.parameters(), measurement=measurement, measurement_size=16)
        lg.attach(model, opt)
        for xb, yb in zip(x.chunk(chunks), y.chunk(chunks), strict=True):
            (nn.functional.cross_entropy(model(xb), yb) / chunks).backward()
        acc = opt._capture.accumulators["0"]
        meas = acc.measurement(mean_reduction=True)
        assert meas.samples == 16 and meas.U_A.shape[-1] == 16
        opt.step()
        states.append((meas, opt.filter("0")))
    (full, f1), (split, f2) = states
    torch.testing.assert_close(split.trace_a, full.trace_a)
    torch.testing.assert_close(split.trace_g, full.trace_g)
    if measurement == "rows":
        torch.testing.assert_close(split.U_A @ split.U_A.mT, full.U_A @ full.U_A.mT)
        torch.testing.assert_close(split.U_G @ split.U_G.mT, full.U_G @ full.U_G.mT)
        torch.testing.assert_close(f2.P_A, f1.P_A)


# ---------------------------------------------------------------- property 5: no inversion
_FORBIDDEN = ("inv", "solve", "cholesky", "eigh", "eigvals", "pinv", "svd", "qr", "lstsq", "lu")
_FORBIDDEN_TORCH = ("inverse", "cholesky", "cholesky_inverse", "cholesky_solve", "pinverse")


class _Recorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        module = getattr(func, "__module__", "") or ""
        qualified = f"{module}.{name}"
        linalg = module.startswith("torch.linalg") or name.startswith("linalg_")
        if (linalg and any(f in name for f in _FORBIDDEN)) or name in _FORBIDDEN_TORCH:
            self.calls.append(qualified)
        return func(*args, **(kwargs or {}))


def _make(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LayerNorm fallback warning
        opt = lg.RKalman(model.parameters(), **kw)
        lg.attach(model, opt)
    return opt


def _train(opt, model, x, y, steps, start=0, batch=32, scale=1.0):
    losses = []
    for i in range(start, start + steps):
        idx = torch.arange(i * batch, (i + 1) * batch) % x.shape[0]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        (loss * scale).backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_recorder_sees_decompositions():
    with _Recorder() as rec:
        torch.linalg.eigh(torch.eye(3))
        torch.linalg.solve(torch.eye(2), torch.ones(2))
        torch.eye(2).inverse()
    assert len(rec.calls) == 3, rec.calls


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(measurement="rows", rho_mode="noise"), dict(curvature_every=1, rho=50.0)],
    ids=["sketch", "rows-noise", "every-step-large-rho"],
)
def test_training_steps_call_no_inversion_or_decomposition(kw):
    model = _cnn()
    x, y = _data()
    opt = _make(model, **kw)
    with _Recorder() as rec:
        _train(opt, model, x, y, steps=12)
    assert rec.calls == []
    assert all(f.updates > 0 for f in opt.filters.values())
    # the recorder does see KFAC's eigendecompositions
    kfac_model = _cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kfac = lg.KFAC(kfac_model.parameters(), curvature_every=1, inverse_every=1)
        lg.attach(kfac_model, kfac)
    with _Recorder() as rec:
        _train(kfac, kfac_model, x, y, steps=1)
    assert any("eigh" in c for c in rec.calls)


# ---------------------------------------------------------------- float32 robustness
def _assert_spd(P):
    assert torch.equal(P, P.mT), "not symmetric"
    assert torch.isfinite(P).all()
    assert float(torch.linalg.eigvalsh(P.double()).min()) > 0.0


def test_covariance_stays_spd_in_float32_with_tiny_and_huge_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(512, 6, generator=g), torch.randint(0, 4, (512,), generator=g)
    opt = _make(model, curvature_every=1, rho=0.0)  # ρ‖g‖² would hide the scale (floor ∝ ‖g‖²)
    # scales of the loss, so of the gradients: ~1e-20 (G ~ 1e-40 underflows float32), ~1e8
    phases = [1.0, 1e-20, 1e8, 1e-20, 1.0, 1e8, 1.0]
    for phase, scale in enumerate(phases):
        for i in range(12):
            _train(opt, model, x, y, steps=1, start=phase * 12 + i, scale=scale)
            for state in opt.filters.values():
                _assert_spd(state.P_A)
                _assert_spd(state.P_G)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.skipped_steps == 0 and opt.filter_failures == 0
    # the jumps in scale were handled by the documented reset, not by breaking SPD
    assert sum(f.floor_resets for f in opt.filters.values()) > 0
    losses = _train(opt, model, x, y, steps=10, start=1000)
    assert math.isfinite(losses[-1])


# ---------------------------------------------------------------- optimizer contract
def test_smoke_loss_falls():
    model = _cnn()
    x, y = _data()
    opt = _make(model)
    losses = _train(opt, model, x, y, steps=40)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.diagnostics["damping"] > 0.1  # λ + ρ‖g‖²


def test_plain_attach_smoke_mlp():
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = lg.RKalman(model.parameters(), measurement="rows", curvature_every=2)
    handle = lg.attach(model, opt)
    assert set(handle.blocks) == {"0", "2"}
    x, y = classification_batch(64, dtype=torch.float32)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
    assert float(loss.detach()) < first
    assert opt.filter("0").updates == 15
    handle.remove()
    assert len(model[0]._forward_hooks) == 0


@pytest.mark.parametrize("kw", [dict(), dict(measurement="rows", curvature_every=2)])
def test_state_dict_round_trip_mid_run_continues_identically(kw, tmp_path):
    x, y = _data()
    model = _cnn()
    opt = _make(model, **kw)
    _train(opt, model, x, y, steps=7)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    reference = _train(opt, model, x, y, steps=8, start=7)
    ref_params = [p.detach().clone() for p in model.parameters()]

    model2 = _cnn()
    ckpt = torch.load(path, weights_only=True)
    model2.load_state_dict(ckpt["model"])
    opt2 = lg.RKalman(model2.parameters(), **kw)
    opt2.load_state_dict(ckpt["opt"])  # before attach: applied when the hooks are attached
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lg.attach(model2, opt2)
    saved = ckpt["opt"]["grng"]["blocks"]["0"]
    assert {"P_A", "P_G", "count", "prior_count", "lo_A", "mean_G"} <= set(saved)
    resumed = _train(opt2, model2, x, y, steps=8, start=7)
    assert resumed == reference
    for a, b in zip(ref_params, model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_filter_dtype_survives_checkpoints_and_bf16_params_filter_in_float32():
    model = _cnn(torch.bfloat16)
    x, y = _data(dtype=torch.bfloat16)
    opt = _make(model, curvature_every=1)
    _train(opt, model, x, y, steps=2)
    state = opt.state_dict()
    opt.detach_hooks()
    opt2 = _make(model, curvature_every=1)
    opt2.load_state_dict(state)
    for key in opt2.blocks:
        assert opt2.filter(key).P_A.dtype == torch.float32
        assert opt2.filter(key).lo_A.dtype == torch.float32


def test_checkpoints_of_other_optimizers_and_models_are_rejected():
    small, big = nn.Linear(3, 2), nn.Linear(5, 2)
    opt_small = lg.RKalman(small.parameters(), curvature_every=1)
    lg.attach(small, opt_small)
    small(torch.randn(4, 3)).sum().backward()
    opt_small.step()
    opt_big = lg.RKalman(big.parameters())
    lg.attach(big, opt_big)
    with pytest.raises(ValueError, match="filter factor P_A of module '' has shape"):
        opt_big.load_state_dict(opt_small.state_dict())
    with pytest.raises(ValueError, match="saved by KFAC, not RKalman"):
        opt_small.load_state_dict(lg.KFAC(small.parameters()).state_dict())


def test_corrupted_filter_restarts_from_the_prior_and_bad_statistics_are_rejected():
    model = nn.Linear(3, 2)
    opt = lg.RKalman(model.parameters(), curvature_every=1)
    lg.attach(model, opt)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))

    def step(inp):
        opt.zero_grad()
        nn.functional.cross_entropy(model(inp), y).backward()
        opt.step()

    step(x)
    state = opt.filter("0")
    state.P_A[0, 0, 0] = float("nan")
    step(x)  # the NaN state is detected and restarted, not propagated
    assert state.failures == 1 and torch.isfinite(state.P_A).all()
    good = state.P_A.clone()
    bad = x.clone()
    bad[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        step(bad)
    assert torch.equal(state.P_A, good)
    assert torch.isfinite(model.weight).all()


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(lr=-1.0), "lr=-1.0"),
        (dict(momentum=1.0), "momentum=1.0"),
        (dict(damping=0.0), "damping=0.0"),
        (dict(rho=-0.5), "rho=-0.5"),
        (dict(rho_mode="hessian"), "rho_mode='hessian'"),
        (dict(forgetting=0.0), "forgetting=0.0"),
        (dict(forgetting=1.5), "forgetting=1.5"),
        (dict(forgetting=1.0), "prior_count=None"),
        (dict(prior_count=0.0), "prior_count=0.0"),
        (dict(observation_noise=-1.0), "observation_noise=-1.0"),
        (dict(measurement="full"), "measurement='full'"),
        (dict(measurement_size=0), "measurement_size=0"),
        (dict(floor_tol=1.0), "floor_tol=1.0"),
        (dict(curvature_every=0), "curvature_every=0"),
        (dict(kl_clip=0.0), "kl_clip=0.0"),
        (dict(fisher="true"), "fisher='true'"),
        (dict(loss_reduction="avg"), "loss_reduction='avg'"),
        (dict(seed=-1), "seed=-1"),
    ],
)
def test_invalid_hyperparameters_name_value_and_range(kwargs, fragment):
    with pytest.raises(ValueError, match="allowed") as info:
        lg.RKalman(nn.Linear(2, 2).parameters(), **kwargs)
    assert fragment in str(info.value) and "RKalman" in str(info.value)


def test_factors_state_dict_keeps_dtypes():
    f = KalmanFactors(F64)
    f.P_A = torch.eye(2, dtype=F64)[None]
    f.P_G = torch.eye(3, dtype=torch.float32)[None]
    f.count = 3.5
    g = KalmanFactors(torch.float32)
    g.load_state_dict(f.state_dict(), torch.device("cpu"))
    assert g.P_A.dtype == F64 and g.P_G.dtype == torch.float32 and g.count == 3.5
