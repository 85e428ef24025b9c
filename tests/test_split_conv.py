"""split_conv: a convolution's gradient statistics per tensor dimension (channels ⊗ kernel
taps), against dense Kronecker math in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_grng as lg
from lightning_grng.curvature.gradient import split_input_factors
from lightning_grng.curvature.kronecker import carry_moment

F64 = torch.float64
ONE_STEP = dict(lr=1.0, momentum=0.0, kl_clip=None, inverse_every=1, damping=1e-3)


def _conv_net(bias: bool = True) -> nn.Sequential:
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 3, 3, padding=1, bias=bias)
    return nn.Sequential(conv, nn.Flatten(), nn.Linear(3 * 5 * 5, 2)).double()


def _batch(seed: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 4, 5, 5, generator=g, dtype=F64), torch.randint(0, 2, (6,), generator=g)


def _conv_gradient(model: nn.Sequential, x, y) -> torch.Tensor:
    """The conv's gradient as ``[W | b]`` ``(3, 4·9 + 1)``, channel-major like the weight."""
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    conv = model[0]
    return torch.cat([conv.weight.grad.reshape(3, 36), conv.bias.grad[:, None]], 1).clone()


def _step(opt, model, x, y) -> None:
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _block_diag_kron(Q_C: torch.Tensor, Q_K: torch.Tensor, extra: int) -> torch.Tensor:
    """``diag(Q_C ⊗ Q_K, I_extra)``: the weight columns' basis, a bias column untouched."""
    kron = torch.kron(Q_C.contiguous(), Q_K.contiguous())
    return torch.block_diag(kron, torch.eye(extra, dtype=Q_C.dtype))


def test_split_factors_are_the_mode_unfoldings_products():
    """A = W₍C₎ W₍C₎ᵀ and K = W₍k₎ W₍k₎ᵀ for the mode unfoldings of W ``(out, C, taps)`` per
    group; the bias column enters neither."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(2, 3, 4, 9, generator=g, dtype=F64)  # (groups, out, C, taps)
    bias = torch.randn(2, 3, 1, generator=g, dtype=F64)
    A, K = split_input_factors(torch.cat([W.reshape(2, 3, 36), bias], -1), 9, F64)
    for group in range(2):
        unfold_C = W[group].permute(1, 0, 2).reshape(4, -1)
        unfold_K = W[group].permute(2, 0, 1).reshape(9, -1)
        torch.testing.assert_close(A[group], unfold_C @ unfold_C.T, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(K[group], unfold_K @ unfold_K.T, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("cls", "rho"), [(lg.KFAC, None), (lg.RING, 0.5)])
def test_first_step_is_the_eigen_step_in_the_channel_tap_kronecker_basis(cls, rho):
    model = _conv_net()
    x, y = _batch()
    V = _conv_gradient(model, x, y)
    W = V[:, :36].reshape(3, 4, 9)
    Q_G = torch.linalg.eigh(V @ V.T).eigenvectors
    Q_C = torch.linalg.eigh(torch.einsum("oct,odt->cd", W, W)).eigenvectors
    Q_K = torch.linalg.eigh(torch.einsum("oct,ocs->ts", W, W)).eigenvectors
    Q_A = _block_diag_kron(Q_C, Q_K, extra=1)
    R = Q_G.T @ V @ Q_A
    D = R * R
    expected = Q_G @ (R / torch.sqrt(D + 1e-3 * D.mean() + (rho or 0.0) * R * R)) @ Q_A.T

    before = torch.cat([model[0].weight.reshape(3, 36), model[0].bias[:, None]], 1).detach()
    before = before.clone()
    kw = {} if rho is None else {"rho": rho}
    opt = cls(model.parameters(), split_conv=1, **ONE_STEP, **kw)
    lg.attach(model, opt, report=False)
    _step(opt, model, x, y)
    after = torch.cat([model[0].weight.reshape(3, 36), model[0].bias[:, None]], 1).detach()
    factors = opt.factors(next(k for k, b in opt.blocks.items() if b.name == "0"))
    assert factors.A.shape == (1, 4, 4) and factors.K.shape == (1, 9, 9)
    torch.testing.assert_close(before - after, expected, rtol=1e-9, atol=1e-12)


def test_under_the_cap_a_convolution_keeps_its_whole_factor():
    """The default cap (512) leaves this 37-wide conv factor as it was: one dense Vᵀ V."""
    model = _conv_net()
    x, y = _batch()
    V = _conv_gradient(model, x, y)
    opt = lg.KFAC(model.parameters(), **ONE_STEP)
    assert opt.split_conv == 512
    lg.attach(model, opt, report=False)
    _step(opt, model, x, y)
    factors = opt.factors(next(k for k, b in opt.blocks.items() if b.name == "0"))
    assert factors.K is None and factors.evec_K is None
    torch.testing.assert_close(factors.A[0], V.T @ V, rtol=1e-12, atol=1e-14)


def test_carried_moment_of_a_split_side_is_the_dense_kronecker_carry():
    """Carrying D into new bases ``(Q_C, Q_K)`` equals the dense carry with ``Q_C ⊗ Q_K``."""
    g = torch.Generator().manual_seed(1)

    def orthogonal(n: int) -> torch.Tensor:
        return torch.linalg.qr(torch.randn(1, n, n, generator=g, dtype=F64)).Q

    moment = torch.rand(1, 3, 37, generator=g, dtype=F64)
    G, C, K = [(orthogonal(n), orthogonal(n)) for n in (3, 4, 9)]
    split = carry_moment(moment, C, G, K)
    dense_A = tuple(_block_diag_kron(c[0], k[0], 1)[None] for c, k in zip(C, K, strict=True))
    dense = carry_moment(moment, dense_A, G)
    torch.testing.assert_close(split, dense, rtol=1e-12, atol=1e-14)


def _train(opt, model, steps: int, start: int = 0) -> None:
    for i in range(start, start + steps):
        _step(opt, model, *_batch(seed=10 + i))


def test_checkpoint_round_trip_of_split_factors_continues_the_same_run():
    kw = dict(lr=0.05, split_conv=1, inverse_every=2)
    straight = _conv_net()
    opt = lg.RING(straight.parameters(), **kw)
    lg.attach(straight, opt, report=False)
    _train(opt, straight, 6)

    first = _conv_net()
    opt1 = lg.RING(first.parameters(), **kw)
    lg.attach(first, opt1, report=False)
    _train(opt1, first, 3)
    saved = opt1.state_dict()
    resumed = _conv_net()
    resumed.load_state_dict(first.state_dict())
    opt2 = lg.RING(resumed.parameters(), **kw)
    opt2.load_state_dict(saved)
    lg.attach(resumed, opt2, report=False)
    _train(opt2, resumed, 3, start=3)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_split_checkpoint_is_refused_where_the_factor_is_whole():
    model = _conv_net()
    opt = lg.RING(model.parameters(), split_conv=1)
    lg.attach(model, opt, report=False)
    _train(opt, model, 1)
    other = _conv_net()
    whole = lg.RING(other.parameters())  # 37 < 512: not split
    whole.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match=r"factor (A|K) of module '0' .* another model"):
        lg.attach(other, whole, report=False)


def test_split_conv_needs_gradient_statistics_and_a_width():
    params = _conv_net().parameters
    with pytest.raises(ValueError, match=r"split_conv=64 .* curvature='gradient'"):
        lg.RING(params(), curvature="kfac", split_conv=64)
    with pytest.raises(ValueError, match="split_conv"):
        lg.RING(params(), split_conv=0)
    assert lg.RING(params(), curvature="kfac").split_conv is None


def test_split_keeps_a_wide_convolutions_state_small():
    """A 128 → 128 3×3 conv: 1152-wide input factor against 128 and 9 per dimension."""
    sizes = {}
    for split in (None, 10_000):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(128, 128, 3, bias=False), nn.Flatten()).double()
        opt = lg.KFAC(model.parameters(), split_conv=split)
        lg.attach(model, opt, report=False)
        opt.zero_grad()
        model(torch.randn(2, 128, 3, 3, dtype=F64)).pow(2).sum().backward()
        opt.step()
        factors = opt.factors(next(iter(opt.blocks)))
        sizes[split] = (tuple(factors.evec_A.shape), factors.K is not None)
    assert sizes == {None: ((1, 128, 128), True), 10_000: ((1, 1152, 1152), False)}


def test_rotated_first_moment_of_a_split_conv_is_mapped_exactly_at_refreshes():
    """Adam's first moment in the channel ⊗ tap basis equals the plain EMA of the gradients
    rotated by the current bases, after steps that each refresh them."""
    model = _conv_net()
    beta1 = 0.9
    opt = lg.RING(model.parameters(), split_conv=1, **{**ONE_STEP, "lr": 0.01, "momentum": beta1})
    lg.attach(model, opt, report=False)
    m = None
    for i in range(4):
        x, y = _batch(seed=20 + i)
        V = _conv_gradient(model, x, y)
        m = (1 - beta1) * V if m is None else beta1 * m + (1 - beta1) * V
        _step(opt, model, x, y)
    f = opt.factors(next(k for k, b in opt.blocks.items() if b.name == "0"))
    Q_A = _block_diag_kron(f.evec_A[0], f.evec_K[0], extra=1)
    expected = f.evec_G[0].T @ m @ Q_A
    torch.testing.assert_close(f.rotated_first_moment[0], expected, rtol=1e-9, atol=1e-13)


def test_a_split_conv_never_forms_its_dense_column_factor():
    """The split side's cost is its factors': no matmul of a step makes the (C·k)² factor of
    the weight columns (37 × 37 here, with the bias column) that the split replaces."""
    from torch.profiler import ProfilerActivity, profile

    model = _conv_net()
    opt = lg.RING(model.parameters(), split_conv=8, inverse_every=1)
    lg.attach(model, opt)
    x, y = _batch()
    _step(opt, model, x, y)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        _step(opt, model, x, y)
    outputs = [
        (shapes[0][-2], shapes[1][-1])
        for e in prof.events()
        if e.name in ("aten::mm", "aten::bmm") and len(shapes := e.input_shapes) >= 2
    ]
    assert outputs  # the profiler saw the step's matmuls
    assert all(shape not in ((36, 36), (37, 37)) for shape in outputs), outputs
