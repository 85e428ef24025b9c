"""The optimizers compared by the benchmark, and how each one takes a training step.

Every entry builds its optimizer for a model and a learning rate, and knows the three ways the
optimizers differ in a step: GRNG optimizers are attached to the model (curvature hooks), RENG
backpropagates the regularized loss, and Sophia needs the graph of the gradient on the steps
where it refreshes its Hutchinson estimate. Everything else (data, model, schedule) is shared.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import lightning_grng as lg

Build = Callable[[nn.Module, float], torch.optim.Optimizer]


@dataclass(frozen=True)
class OptimizerSpec:
    """One compared optimizer: how to build it, its sweep grid and where it comes from."""

    name: str
    build: Build
    lr_grid: tuple[float, ...]
    description: str
    family: str  # "baseline", "kfac" (K-FAC family, ρ = 0), "grng" or "ablation" (a ρ = 0 twin)
    damping_kw: str | None = None  # keyword of the damping, for the stability grid
    twin_of: str | None = None  # an ablation twin runs at this optimizer's chosen lr, unswept
    tasks: tuple[str, ...] | None = None  # only these tasks (None: every task that takes it)

    def make(self, model: nn.Module, lr: float, damping: float | None = None) -> Optimizer:
        """The optimizer for ``model`` (attached when it is a GRNG optimizer)."""
        if damping is not None:
            if self.damping_kw is None:
                raise ValueError(f"{self.name} has no damping to set")
            opt = _with_kwargs(self.build, {self.damping_kw: damping})(model, lr)
        else:
            opt = self.build(model, lr)
        return Optimizer(opt, model)


def _with_kwargs(build: Build, kwargs: dict[str, object]) -> Build:
    return lambda model, lr: build(model, lr, **kwargs)  # type: ignore[call-arg]


class Optimizer:
    """A built optimizer plus the step protocol every benchmark loop uses."""

    def __init__(self, opt: torch.optim.Optimizer, model: nn.Module) -> None:
        self.opt = opt
        self.inner = opt.primary if isinstance(opt, _Composite) else opt
        self.grng = isinstance(opt, lg.GRNGOptimizer)
        self.sam = type(opt).__name__ == "SAM"
        # SAM around a GRNG optimizer (the GR study's SAM-KFAC): its base needs the hooks.
        attached = opt if self.grng else getattr(opt, "base_optimizer", None)
        if isinstance(attached, lg.GRNGOptimizer):
            with warnings.catch_warnings():
                # Embeddings/LayerNorms get the documented fallback update; no need to say so.
                warnings.simplefilter("ignore")
                lg.attach(model, attached)
        self.params = [p for p in model.parameters() if p.requires_grad]

    @property
    def param_groups(self) -> list[dict]:
        return self.opt.param_groups

    def _needs_graph(self) -> bool:
        # SophiaH refreshes its Hessian diagonal when its step count is a multiple of
        # update_period; only those steps pay for create_graph.
        sophia = self.inner
        if type(sophia).__name__ != "SophiaH":
            return False
        return sophia.param_groups[0].get("step", 0) % sophia.update_period == 0

    def step(self, loss_of: Callable[[], Tensor]) -> tuple[float, float]:
        """One training step; returns (loss, ‖∇ℓ‖ of the plain minibatch loss)."""
        self.opt.zero_grad(set_to_none=True)
        loss = loss_of()
        if self._finite_difference():
            # RENG's finite-difference route: a plain backward, and a closure for its extra pass.
            loss.backward()
            self.opt.step(lambda: self._closure(loss_of))
            return float(loss.detach()), self.opt.diagnostics.get("grad_norm", math.nan)
        if isinstance(self.opt, lg.RENG):
            lg.regularized_backward(loss, self.opt)
        else:
            loss.backward(create_graph=self._needs_graph())
        # GRNG optimizers report the plain gradient norm themselves (RENG's .grad holds the
        # regularized gradient, so it cannot be read off the parameters).
        norm = math.nan if self.grng else grad_norm(self.params)
        if self.sam:
            # SAM's second pass: the gradient at the perturbed weights, same batch.
            self.opt.step(lambda: loss_of().backward())
        else:
            self.opt.step()
        if self.grng:
            norm = self.opt.diagnostics.get("grad_norm", math.nan)
        return float(loss.detach()), norm

    def _finite_difference(self) -> bool:
        return isinstance(self.opt, lg.RENG) and self.opt.gr_mode.value == "finite_difference"

    def _closure(self, loss_of: Callable[[], Tensor]) -> Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = loss_of()
        loss.backward()
        return loss

    def state_bytes(self) -> int:
        """Bytes of every tensor in the optimizer's state dict (moments, factors, ...)."""
        return _tensor_bytes(self.opt.state_dict())


def _tensor_bytes(obj: object) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        # Structured state objects (SINGD's K/C matrices) hold their tensors as attributes.
        return sum(_tensor_bytes(v) for v in vars(obj).values() if isinstance(v, Tensor))
    return 0


@torch.no_grad()
def grad_norm(params: Iterable[Tensor]) -> float:
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return math.nan
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))


class _Composite(torch.optim.Optimizer):
    """SINGD updates only Linear/Conv2d weights; the remaining parameters (embeddings,
    LayerNorms, positional tables) get AdamW at its default settings, as SINGD's authors do."""

    def __init__(self, primary: torch.optim.Optimizer, rest: torch.optim.Optimizer | None):
        self.primary, self.rest = primary, rest
        self.param_groups = primary.param_groups + (rest.param_groups if rest else [])
        self.defaults = primary.defaults
        self.state = primary.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self._parts():
            opt.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Tensor] | None = None) -> None:  # type: ignore[override]
        for opt in self._parts():
            opt.step()

    def state_dict(self) -> dict:  # type: ignore[override]
        return {f"part{i}": opt.state_dict() for i, opt in enumerate(self._parts())}

    def _parts(self) -> list[torch.optim.Optimizer]:
        return [self.primary] + ([self.rest] if self.rest else [])


def _singd(model: nn.Module, lr: float, damping: float = 1e-3) -> torch.optim.Optimizer:
    from singd.optim.optimizer import SINGD

    sequence = any(m.__class__.__name__ == "CausalSelfAttention" for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "unsupported layer" notices for the AdamW part
        primary = SINGD(
            model,
            lr=lr,
            damping=damping,
            loss_average="batch+sequence" if sequence else "batch",
            warn_unsupported=False,
        )
    covered = {id(p) for group in primary.param_groups for p in group["params"]}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in covered]
    return _Composite(primary, torch.optim.AdamW(rest) if rest else None)


def _soap(model: nn.Module, lr: float, **kw: object) -> torch.optim.Optimizer:
    from pytorch_optimizer import SOAP

    return SOAP(model.parameters(), lr=lr, **kw)


def heavyball_optimizer(
    name: str, model: nn.Module, lr: float, **kw: object
) -> torch.optim.Optimizer:
    """A heavyball optimizer as its authors ship it, with torch.compile off (on this CPU it
    costs minutes of compilation per model and did not pay back within a benchmark run)."""
    import heavyball

    heavyball.utils.compile_mode = None
    return getattr(heavyball, name)(model.parameters(), lr=lr, **kw)


MUON_ADAMW_RATIO = 1 / 3
"""Muon's AdamW part runs at this fraction of the swept (Muon) learning rate, so one sweep
tunes both: at Muon's usual 0.03 the AdamW part gets 0.01, AdamW's own best region."""


def _muon_hidden(model: nn.Module) -> set[int]:
    """Ids of the hidden weight matrices: the weights of every ``Linear`` and convolution but
    the output layer (the last ``Linear``). Embeddings, positional tables, biases and norms go
    to AdamW, as Muon's authors recommend."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)]
    head = [m for m in layers if isinstance(m, nn.Linear)][-1:]
    return {id(m.weight) for m in layers if m not in head}


def _muon(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    from pytorch_optimizer import Muon

    hidden = _muon_hidden(model)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        dict(params=[p for p in params if id(p) in hidden], use_muon=True, lr=lr),
        dict(
            params=[p for p in params if id(p) not in hidden],
            use_muon=False,
            lr=lr * MUON_ADAMW_RATIO,
        ),
    ]
    return Muon([g for g in groups if g["params"]])


def _sam(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    from pytorch_optimizer import SAM

    return SAM(model.parameters(), base_optimizer=torch.optim.SGD, rho=0.05, lr=lr, momentum=0.9)


def _sophia(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    from pytorch_optimizer import SophiaH

    return SophiaH(model.parameters(), lr=lr)


def _ours(cls: type[lg.GRNGOptimizer], grid: tuple[float, ...], what: str) -> OptimizerSpec:
    """This project's optimizers at their defaults; all but KFAC regularize the gradient. KFAC,
    RING and RENG are pinned to the paper's ``preconditioner="kfac"`` route."""
    pinned = {} if cls is lg.RKalman else {"preconditioner": "kfac"}
    return OptimizerSpec(
        cls.__name__,
        lambda m, lr, **kw: cls(m.parameters(), lr=lr, **{**pinned, **kw}),
        grid,
        f"lightning_grng {what}, defaults" + (", preconditioner='kfac'" if pinned else ""),
        "kfac" if cls is lg.KFAC else "grng",
        damping_kw="damping",
    )


#: The eigen specs (``RING-eigen`` …) keep the statistics they were measured with (issue 12):
#: K-FAC's, momentum on the direction. The library's eigen-mode defaults moved to gradient
#: statistics with Adam-order momentum (issue 23), which is ``RING-grad-adam`` below.
KFAC_STATISTICS = dict(curvature="kfac", momentum_on="direction")


def _twin(
    cls: type[lg.GRNGOptimizer], mode: str | None = None, tasks: tuple[str, ...] | None = None
) -> OptimizerSpec:
    """GR's own effect: the same optimizer, route and every other setting, with ρ = 0."""
    name = cls.__name__ if mode is None else f"{cls.__name__}-{mode}"
    extra = {} if mode is None else {"preconditioner": mode}
    if mode == "eigen":
        extra |= KFAC_STATISTICS
    return OptimizerSpec(
        f"{name}-rho0",
        lambda m, lr, **kw: cls(m.parameters(), lr=lr, rho=0.0, **extra, **kw),
        (),
        f"{name} with rho=0, everything else identical (at {name}'s chosen lr)",
        "ablation",
        damping_kw="damping" if mode is None else None,
        twin_of=name,
        tasks=tasks,
    )


def _eigen(
    cls: type[lg.GRNGOptimizer], what: str, tasks: tuple[str, ...] | None = None
) -> OptimizerSpec:
    """The eigenvalue-corrected mode (issue 12) over K-FAC statistics (its defaults until
    issue 23)."""
    return OptimizerSpec(
        f"{cls.__name__}-eigen",
        lambda m, lr: cls(m.parameters(), lr=lr, preconditioner="eigen", **KFAC_STATISTICS),
        (3e-3, 1e-2, 3e-2, 0.1),
        f"lightning_grng {what}, preconditioner='eigen', K-FAC statistics, momentum on the "
        "direction (the defaults before issue 23)",
        "kfac" if cls is lg.KFAC else "grng",
        tasks=tasks,
    )


def _variant(
    name: str,
    build: Build,
    grid: tuple[float, ...],
    what: str,
    family: str = "baseline",
    twin_of: str | None = None,
) -> OptimizerSpec:
    """A setting of an optimizer's other knobs, swept over lr like any spec (issue 23)."""
    return OptimizerSpec(name, build, () if twin_of else grid, what, family, twin_of=twin_of)


EIGEN_GRID = (3e-3, 1e-2, 3e-2, 0.1)
GRADIENT = dict(curvature="gradient", curvature_every=1)
#: Gradient statistics with momentum on the direction (the "-grad" variants without "-adam").
GRADIENT_DIRECTION = dict(GRADIENT, momentum_on="direction")

#: Full-strength settings of the baselines (refresh frequency and betas, not only lr) and of
#: the eigen mode (curvature source, statistics/refresh schedule, KL-clip): issue 23.
STRENGTH: tuple[OptimizerSpec, ...] = (
    _variant(
        "SOAP-hb-f10",
        lambda m, lr: heavyball_optimizer("SOAP", m, lr, precondition_frequency=10),
        (1e-3, 3e-3, 1e-2, 3e-2),
        "heavyball SOAP, basis refresh every 10 steps (else as shipped)",
    ),
    _variant(
        "SOAP-hb-b95",
        lambda m, lr: heavyball_optimizer("SOAP", m, lr, betas=(0.95, 0.95)),
        (1e-3, 3e-3, 1e-2, 3e-2),
        "heavyball SOAP, betas (0.95, 0.95) (else as shipped)",
    ),
    _variant(
        "RING-grad",
        lambda m, lr: lg.RING(m.parameters(), lr=lr, inverse_every=10, **GRADIENT_DIRECTION),
        EIGEN_GRID,
        "RING, eigen mode, curvature='gradient' (statistics every step, basis every 10)",
        "grng",
    ),
    _variant(
        "RING-grad-f2",
        lambda m, lr: lg.RING(m.parameters(), lr=lr, inverse_every=2, **GRADIENT_DIRECTION),
        EIGEN_GRID,
        "RING, eigen mode, curvature='gradient', basis every 2 steps (SOAP's refresh)",
        "grng",
    ),
    _variant(
        "RING-grad-noclip",
        lambda m, lr: lg.RING(
            m.parameters(), lr=lr, inverse_every=10, kl_clip=None, **GRADIENT_DIRECTION
        ),
        EIGEN_GRID,
        "RING-grad without the KL-clip",
        "grng",
    ),
    _variant(
        "KFAC-grad",
        lambda m, lr: lg.KFAC(m.parameters(), lr=lr, inverse_every=10, **GRADIENT_DIRECTION),
        EIGEN_GRID,
        "KFAC (rho = 0), eigen mode, curvature='gradient' (statistics every step, basis every 10)",
        "kfac",
    ),
    _variant(
        "RING-eigen-s1",
        lambda m, lr: lg.RING(
            m.parameters(), lr=lr, curvature_every=1, inverse_every=10, **KFAC_STATISTICS
        ),
        EIGEN_GRID,
        "RING, eigen mode, K-FAC statistics every step, basis every 10",
        "grng",
    ),
    _variant(
        "RING-grad-adam",
        lambda m, lr: lg.RING(
            m.parameters(), lr=lr, inverse_every=10, momentum_on="gradient", **GRADIENT
        ),
        EIGEN_GRID,
        "RING-grad with SOAP's order: the gradient's first moment, preconditioned",
        "grng",
    ),
    _variant(
        "RING-grad-adam-f2",
        lambda m, lr: lg.RING(
            m.parameters(), lr=lr, inverse_every=2, momentum_on="gradient", **GRADIENT
        ),
        EIGEN_GRID,
        "RING-grad-adam with the basis refreshed every 2 steps",
        "grng",
    ),
    _variant(
        "KFAC-grad-adam",
        lambda m, lr: lg.KFAC(
            m.parameters(), lr=lr, inverse_every=10, momentum_on="gradient", **GRADIENT
        ),
        EIGEN_GRID,
        "KFAC (rho = 0) with gradient statistics and SOAP's order of momentum",
        "kfac",
    ),
    _variant(
        "RING-grad-rho0",
        lambda m, lr: lg.RING(
            m.parameters(), lr=lr, rho=0.0, inverse_every=10, **GRADIENT_DIRECTION
        ),
        (),
        "RING-grad with rho = 0, everything else identical (at RING-grad's chosen lr)",
        "ablation",
        twin_of="RING-grad",
    ),
)


def _sam_adamw(model: nn.Module, lr: float, radius: float) -> torch.optim.Optimizer:
    from pytorch_optimizer import SAM

    return SAM(model.parameters(), base_optimizer=torch.optim.AdamW, rho=radius, lr=lr)


def _sam_kfac(model: nn.Module, lr: float, radius: float) -> torch.optim.Optimizer:
    """SAM (pytorch-optimizer's) around KFAC at the library's defaults: the eigen step of the
    gradient at the perturbed weights, two passes per step as RENG's double backprop."""
    from pytorch_optimizer import SAM

    return SAM(model.parameters(), base_optimizer=lg.KFAC, rho=radius, lr=lr)


def _gr_twin(name: str, base: str, what: str, build: Build) -> OptimizerSpec:
    """A GR-study variant run at ``base``'s chosen lr (no sweep of its own): the paired
    difference over seeds against ``base`` and its ρ = 0 twin is the effect of the change."""
    return OptimizerSpec(name, build, (), what, "ablation", twin_of=base)


def _reng(lr: float, m: nn.Module, **kw: object) -> lg.RENG:
    return lg.RENG(m.parameters(), lr=lr, **kw)


def _default(cls: type[lg.GRNGOptimizer], what: str) -> OptimizerSpec:
    """An optimizer at the library's defaults: the eigen mode over gradient statistics with
    Adam-order momentum (issue 23), a wide conv split per dimension (issue 22)."""
    return OptimizerSpec(
        f"{cls.__name__}-default",
        lambda m, lr: cls(m.parameters(), lr=lr),
        EIGEN_GRID,
        f"lightning_grng {what} at its defaults (eigen mode, gradient statistics, "
        "momentum_on='gradient')",
        "kfac" if cls is lg.KFAC else "grng",
    )


#: What users get: KFAC, RING and RENG at the library's defaults, and the ρ = 0 twins of the
#: two that regularize (at their chosen lr).
DEFAULTS: tuple[OptimizerSpec, ...] = (
    _default(lg.KFAC, "KFAC (ρ = 0)"),
    _default(lg.RING, "RING"),
    _default(lg.RENG, "RENG (double backprop)"),
    *(
        _gr_twin(
            f"{cls.__name__}-default-rho0",
            f"{cls.__name__}-default",
            f"{cls.__name__}-default with rho = 0, everything else identical (at its chosen lr)",
            lambda m, lr, cls=cls: cls(m.parameters(), lr=lr, rho=0.0),
        )
        for cls in (lg.RING, lg.RENG)
    ),
)

#: The GR study (issue 21): the defaults with ρ on a grid at the same lr (ρ = 0: the twins
#: above), RENG's finite-difference route, and SAM around AdamW at two radii (SAM's quality
#: knob), all at equal backward passes per step (two).
#: Where ρ enters (issue 21, item 3): (optimizer, argument, value, short name, ρ grid); each
#: setting runs at its optimizer's default's lr, against the same ρ = 0 twin.
PLACEMENTS = (
    # Grids extended where the best ρ was on an edge (isotropic 3 then 1, preconditioned 30, RENG
    # unsquared 1).
    (lg.RING, "gr_form", "isotropic", "iso", (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)),
    (lg.RING, "gr_form", "unsquared", "unsq", (3.0, 10.0, 30.0)),
    (lg.RING, "gr_form", "preconditioned", "prec", (3.0, 10.0, 30.0, 100.0)),
    (lg.RENG, "gr_norm", "unsquared", "unsq", (0.3, 1.0, 3.0)),
)

#: SAM's radii: 0.05 (pytorch-optimizer's default) and 0.2 to start; the GR study extends a
#: regime's radius grid along this ladder where its best radius is on an edge.
SAM_RADII = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


def sam_name(family: str, radius: float) -> str:
    """``SAM-AdamW`` / ``SAM-KFAC`` at radius 0.05 (the default), ``<family>-r<radius>`` else."""
    return family if radius == 0.05 else f"{family}-r{radius:g}"


GR_STUDY: tuple[OptimizerSpec, ...] = (
    *(
        _variant(
            sam_name("SAM-AdamW", radius),
            lambda m, lr, radius=radius: _sam_adamw(m, lr, radius),
            (3e-4, 1e-3, 3e-3, 1e-2),
            f"pytorch-optimizer SAM around torch AdamW, radius {radius:g}; two passes per step",
        )
        for radius in SAM_RADII
    ),
    *(
        _variant(
            sam_name("SAM-KFAC", radius),
            lambda m, lr, radius=radius: _sam_kfac(m, lr, radius),
            EIGEN_GRID,
            f"pytorch-optimizer SAM around lightning_grng KFAC at its defaults, radius "
            f"{radius:g}; two passes per step (the same base preconditioner as RENG's)",
        )
        for radius in SAM_RADII
    ),
    _gr_twin(
        "RENG-default-fd",
        "RENG-default",
        "RENG-default with gr_mode='finite_difference' (Hg from a second gradient)",
        lambda m, lr: _reng(lr, m, gr_mode="finite_difference"),
    ),
    *(
        _gr_twin(
            f"{cls.__name__}-default-rho{rho:g}",
            f"{cls.__name__}-default",
            f"{cls.__name__}-default with rho = {rho:g}",
            lambda m, lr, cls=cls, rho=rho: cls(m.parameters(), lr=lr, rho=rho),
        )
        for cls, rhos in (
            (lg.RENG, (1.0, 3.0, 10.0)),
            (lg.RING, (1.0, 10.0, 30.0, 100.0, 300.0, 1000.0)),
        )
        for rho in rhos
    ),
    *(
        _gr_twin(
            f"{cls.__name__}-default-{short}-rho{rho:g}",
            f"{cls.__name__}-default",
            f"{cls.__name__}-default with {arg}={value!r}, rho = {rho:g}",
            lambda m, lr, cls=cls, rho=rho, arg=arg, value=value: cls(
                m.parameters(), lr=lr, rho=rho, **{arg: value}
            ),
        )
        for cls, arg, value, short, rhos in PLACEMENTS
        for rho in rhos
    ),
)


#: RENG costs two to three AdamW steps per step; its eigen mode runs on the language tasks.
LANGUAGE_TASKS = ("shakespeare", "imdb")


GENERALIZATION_TASKS = ("fashion_mnist_small",)


SPECS: tuple[OptimizerSpec, ...] = (
    OptimizerSpec(
        "SGD",
        lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9),
        (0.01, 0.03, 0.1, 0.3),
        "torch.optim.SGD, momentum 0.9",
        "baseline",
    ),
    OptimizerSpec(
        "SAM",
        _sam,
        (0.01, 0.03, 0.1, 0.3),
        "pytorch-optimizer SAM around SGD (momentum 0.9), radius 0.05; two passes per step",
        "baseline",
        tasks=GENERALIZATION_TASKS,
    ),
    OptimizerSpec(
        "AdamW",
        lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr),
        (3e-4, 1e-3, 3e-3, 1e-2),
        "torch.optim.AdamW, betas (0.9, 0.999), weight decay 0.01",
        "baseline",
    ),
    OptimizerSpec(
        "SOAP",
        _soap,
        (3e-3, 1e-2, 3e-2, 0.1),
        "pytorch-optimizer SOAP (betas (0.95, 0.95), basis refresh every 10 steps, wd 0.01)",
        "baseline",
    ),
    OptimizerSpec(
        "SOAP-hb",
        lambda m, lr: heavyball_optimizer("SOAP", m, lr),
        (1e-3, 3e-3, 1e-2, 3e-2),
        "heavyball SOAP as shipped (betas (0.9, 0.95), basis refresh every 2 steps, wd 0.01), "
        "torch.compile off",
        "baseline",
    ),
    OptimizerSpec(
        "PSGD-Kron",
        lambda m, lr: heavyball_optimizer("PSGDKron", m, lr),
        (3e-4, 1e-3, 3e-3, 1e-2),
        "heavyball PSGDKron as shipped (Kronecker-factored preconditioner fitted by PSGD), "
        "torch.compile off",
        "baseline",
    ),
    OptimizerSpec(
        "Muon-hb",
        lambda m, lr: heavyball_optimizer("MuonAdamW", m, lr),
        (1e-3, 3e-3, 1e-2, 3e-2),
        "heavyball MuonAdamW as shipped (Muon on ≥2-D parameters, AdamW on the rest), "
        "torch.compile off",
        "baseline",
    ),
    OptimizerSpec(
        "Muon",
        _muon,
        (0.01, 0.03, 0.1, 0.3),
        "pytorch-optimizer Muon (Nesterov 0.95, 5 Newton–Schulz steps) on hidden ≥2-D weights; "
        "AdamW (betas (0.9, 0.95)) at lr/3 on embeddings, output layer, biases and norms",
        "baseline",
    ),
    OptimizerSpec(
        "Sophia",
        _sophia,
        (0.02, 0.06, 0.2, 0.6),
        "pytorch-optimizer SophiaH (Hutchinson diagonal every 10 steps, clip p=0.01)",
        "baseline",
    ),
    OptimizerSpec(
        "SINGD",
        _singd,
        (0.03, 0.1, 0.3, 1.0),
        "singd SINGD (dense structured inverse-free K-FAC, T=10); AdamW for layers it skips",
        "kfac",
        damping_kw="damping",
    ),
    *(
        _ours(cls, grid, what)
        for cls, grid, what in (
            (lg.KFAC, (0.01, 0.03, 0.1, 0.3), "KFAC (ρ = 0)"),
            (lg.RING, (0.01, 0.03, 0.1, 0.3), "RING"),
            (lg.RENG, (0.01, 0.03, 0.1, 0.3), "RENG (double backprop)"),
            (lg.RKalman, (0.3, 1.0, 3.0, 10.0), "RKalman"),
        )
    ),
    *(_twin(cls) for cls in (lg.RING, lg.RENG, lg.RKalman)),
    *DEFAULTS,
)

#: The eigen mode over K-FAC statistics (the defaults from issue 12 to issue 23), kept by name
#: for the committed studies and `benchmarks/step_cost.py`.
EIGEN_KFAC: tuple[OptimizerSpec, ...] = (
    *(
        _eigen(cls, what, tasks)
        for cls, what, tasks in (
            (lg.KFAC, "KFAC", None),
            (lg.RING, "RING", None),
            (lg.RENG, "RENG (double backprop)", LANGUAGE_TASKS),
        )
    ),
    _twin(lg.RING, "eigen"),
    _twin(lg.RENG, "eigen", LANGUAGE_TASKS),
)

#: Issue 22: the defaults with an embedding's every row updated each step (``lazy_rows=False``,
#: the default until the lazy rows), for the lazy rows' quality check and step cost.
DENSE_ROWS: tuple[OptimizerSpec, ...] = (
    _variant(
        "RING-default-dense-rows",
        lambda m, lr: lg.RING(m.parameters(), lr=lr, lazy_rows=False),
        EIGEN_GRID,
        "RING-default with lazy_rows=False (every embedding row rotated and moved each step)",
        "grng",
    ),
)

#: Issue 22: the defaults with cheaper curvature upkeep, for the quality side of their step
#: cost: gradient statistics every second or third step, the basis kept by a warm start, and
#: statistics every second step with the warm start; and each weight preconditioned on one
#: side only (its narrower side: optimizer state <= 4x the parameters; or its input side).
COST_STUDY: tuple[OptimizerSpec, ...] = tuple(
    _variant(
        f"RING-default-{suffix}",
        lambda m, lr, options=options: lg.RING(m.parameters(), lr=lr, **options),
        EIGEN_GRID,
        f"RING-default with {what}",
        "grng",
    )
    for suffix, options, what in (
        ("stats2", dict(curvature_every=2), "curvature_every=2 (statistics every second step)"),
        ("stats3", dict(curvature_every=3), "curvature_every=3 (statistics every third step)"),
        ("warm", dict(refresh="warm"), "refresh='warm' (basis by orthogonal iteration)"),
        ("lean", dict(curvature_every=2, refresh="warm"), "curvature_every=2, refresh='warm'"),
        ("one-sided", dict(one_sided="narrower"), "one_sided='narrower' (narrower side only)"),
        ("input-side", dict(one_sided="input"), "one_sided='input' (input side only)"),
    )
)

BY_NAME = {
    spec.name: spec
    for spec in (*SPECS, *EIGEN_KFAC, *STRENGTH, *GR_STUDY, *DENSE_ROWS, *COST_STUDY)
}

# Sophia and SINGD are left out of the generalization task to keep `make bench` near two hours;
# SAM, the flat-minima baseline, runs only there.
SKIPPED_ON = {task: ("Sophia", "SINGD") for task in GENERALIZATION_TASKS}
# RENG costs two to three AdamW steps per step: not on the full Fashion-MNIST task (it runs on
# the language tasks and the generalization task, where GR is expected to matter).
SKIPPED_ON["fashion_mnist"] = ("RENG-default", "RENG-default-rho0")


def runs_on(spec: OptimizerSpec, task: str) -> bool:
    """Whether the suite runs ``spec`` on ``task``."""
    if spec.tasks is not None and task not in spec.tasks:
        return False
    return spec.name not in SKIPPED_ON.get(task, ())
