"""K-FAC: the ρ = 0 member of the family and the base of RING and RENG."""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.profiler import record_function

from lightning_grng.curvature.block import KroneckerBlock
from lightning_grng.curvature.capture import CurvatureCapture, FactorAccumulator, LossReduction
from lightning_grng.curvature.gradient import (
    column_squares,
    gradient_factors,
    output_factor,
    split_input_factors,
)
from lightning_grng.curvature.inverse import working_dtype
from lightning_grng.curvature.kronecker import InverseMethod, KroneckerFactors, update_stacked
from lightning_grng.distributed.assignment import block_cost
from lightning_grng.optim.arguments import documented, hyperparameters
from lightning_grng.optim.base import BlockItem, GRNGOptimizer, ParamsT, StepGradients
from lightning_grng.optim.batching import same_keys
from lightning_grng.optim.damping import DampingArgs, DampingMode, GRForm
from lightning_grng.optim.lazy_rows import RowUpdate, TouchedRows, touched_rows
from lightning_grng.optim.routes import (
    SOURCE_DEFAULTS,
    BasisRefresh,
    CurvatureSource,
    Due,
    EigenRoute,
    MomentumOn,
    OneSided,
    Preconditioner,
    Route,
    check_basis_options,
    refuse_without_eigenbasis,
    route_for,
)
from lightning_grng.optim.validation import check_choice, check_int, check_range

log = logging.getLogger("lightning_grng")

#: A factor at least this wide makes a refresh slow enough on a CPU to be announced (eigh of a
#: 2048-wide factor takes about 2 s on two cores, O(n³)).
WIDE_FACTOR = 2048
#: Default ``split_conv`` with gradient statistics: a convolution whose weight columns
#: (C_in·kh·kw) are wider than this keeps channel and tap factors instead of one dense factor
#: (ResNet-18's 3×3 convolutions from 128 channels on: 1152–4608 wide, against ≤ 512 per
#: dimension; the measurement is in docs/defaults.md).
SPLIT_CONV = 512
#: Default ``max_factor`` of the eigen mode: a factor wider than this is kept as its diagonal
#: (an LM head's vocabulary side: 50,257 wide for GPT-2, a 10 GB dense factor), as heavyball's
#: SOAP keeps dimensions above its ``max_precond_dim`` (2048) unrotated.
EIGEN_MAX_FACTOR = 2048
#: Default ``stagger_first`` of the eigen mode: a block that decomposes a factor at least this
#: wide gets its first eigenbasis on its staggered slot, so the first step does not decompose
#: every wide factor at once (GPT-2-shaped, scaled: first step 4.1x the median step without it,
#: 1.2x with it; benchmarks/results/step_cost/stagger.md). No benchmark model has a factor
#: this wide.
EIGEN_STAGGER_FIRST = 512


@documented
class KFAC(GRNGOptimizer):
    """Kronecker-factored natural gradient per layer, in one of two modes:

    * preconditioner='eigen' (default): U = Q (D + gamma)^(-1/2) Q^T g with Q the eigenbasis
      of the Kronecker factors A and G and D a running second moment of the rotated gradient
      (eigenvalue-corrected; docs/algorithms.md section 8). lr has Adam's units.
    * preconditioner='kfac': the paper's U = (A x G + gamma*I)^-1 g (eigh or warm-started
      Newton-Schulz), with the KL-clip setting the step length.

    nn.Linear, nn.Conv1d/nn.Conv2d, nn.Embedding and nn.MultiheadAttention layers (and types
    given a block with lightning_grng.register_block) get a Kronecker block; every other
    trainable parameter gets the fallback update. The hooks are attached by
    lightning_grng.attach (plain PyTorch) or by lightning_grng.GRNGCallback (Lightning).
    """

    #: The kfac mode's ``inverse`` when None is given (RING's is Newton–Schulz).
    kfac_inverse: ClassVar[InverseMethod] = InverseMethod.EIGH
    #: Whether ρ enters the damping (RING); KFAC has no ρ, RENG's enters its gradient.
    gr_as_damping: ClassVar[bool] = False
    #: Where RING's GR curvature enters the eigen mode (``optim/damping.py``); KFAC has none.
    gr_form: GRForm = GRForm.DIAGONAL

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.02,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        damping: float | None = None,
        damping_mode: str = "relative",
        ema_decay: float = 0.95,
        curvature_every: int | None = None,
        inverse_every: int | None = None,
        inverse: str | None = None,
        newton_iters: int = 30,
        kl_clip: float | None = 1e-2,
        fisher: str = "empirical",
        loss_reduction: str = "mean",
        fallback: str = "adam",
        fallback_lr: float | None = None,
        preconditioner: str = "eigen",
        beta2: float = 0.95,
        power: float = 0.5,
        curvature: str | None = None,
        momentum_on: str | None = None,
        refresh: str = "eigh",
        stagger_first: int | None = None,
        max_factor: int | None = None,
        split_conv: int | None = None,
        one_sided: str | None = None,
        compile: bool = False,
        lazy_rows: bool | None = None,
        batch_blocks: bool = False,
    ) -> None:
        self._configure(params, hyperparameters(locals()))

    def _configure(self, params: ParamsT, hp: dict[str, Any]) -> None:
        name = type(self).__name__
        self.preconditioner = check_choice(
            name, "preconditioner", hp.pop("preconditioner"), Preconditioner
        )
        # The eigen mode's defaults are the measured best (gradient statistics, the gradient's
        # first moment preconditioned: docs/defaults.md); the kfac mode's are the paper's, and
        # so is the source of a Monte-Carlo Fisher (sampled labels feed K-FAC's captures).
        eigen = self.preconditioner is Preconditioner.EIGEN
        mc = hp["fisher"] == "mc"
        curvature = hp.pop("curvature") or ("gradient" if eigen and not mc else "kfac")
        self.curvature = check_choice(name, "curvature", curvature, CurvatureSource)
        if self.curvature is CurvatureSource.GRADIENT and mc:
            raise ValueError(
                f"{name}: fisher='mc' samples labels for K-FAC's captured statistics; gradient "
                "statistics come from the training gradient itself. Use curvature='kfac' with "
                "fisher='mc', or fisher='empirical'."
            )
        for key, value in SOURCE_DEFAULTS[self.curvature].items():
            if hp[key] is None:
                hp[key] = value
        if (
            self.curvature is CurvatureSource.GRADIENT
            and self.preconditioner is not Preconditioner.EIGEN
        ):
            raise ValueError(
                f"{name}: curvature='gradient' gives factors in the gradient's units squared, "
                "whose eigenbasis only the eigen mode uses; use preconditioner='eigen' with it, "
                "or curvature='kfac' for preconditioner='kfac'."
            )
        inverse = hp.pop("inverse")
        inverse = None if inverse is None else check_choice(name, "inverse", inverse, InverseMethod)
        refresh = check_choice(name, "refresh", hp.pop("refresh"), BasisRefresh)
        route_cls = route_for(name, self.preconditioner, inverse, self.kfac_inverse, refresh)
        #: Cost options of the eigh-based routes (None: off): blocks with a factor at least
        #: ``stagger_first`` wide take a stand-in basis until their staggered slot; factors
        #: wider than ``max_factor`` are kept as their diagonal.
        self.stagger_first, self.max_factor = check_basis_options(
            name, route_cls, hp.pop("stagger_first"), hp.pop("max_factor")
        )
        if issubclass(route_cls, EigenRoute):
            self.max_factor = self.max_factor or EIGEN_MAX_FACTOR
            self.stagger_first = self.stagger_first or EIGEN_STAGGER_FIRST
        self.split_conv = self._split_option(name, hp.pop("split_conv"))
        #: Precondition each block on one side only (the other kept diagonal); None: both.
        self.one_sided = self._one_sided_option(name, hp.pop("one_sided"), route_cls)
        momentum_on = hp.pop("momentum_on") or ("gradient" if eigen else "direction")
        self.momentum_on = check_choice(name, "momentum_on", momentum_on, MomentumOn)
        if self.momentum_on is MomentumOn.GRADIENT and not issubclass(route_cls, EigenRoute):
            raise ValueError(
                f"{name}: momentum_on='gradient' preconditions the gradient's first moment with "
                "the eigen mode's second moment; use it with preconditioner='eigen'."
            )
        compile = _eigen_only_flag(
            name, "compile", hp.pop("compile"), route_cls, "fuses the eigen mode's per-block update"
        )
        lazy = _eigen_only_flag(
            name, "lazy_rows", hp.pop("lazy_rows"), route_cls,
            "keeps an embedding's untouched rows out of the eigen mode's moments", off=None,
        )  # fmt: skip
        batch = _eigen_only_flag(
            name, "batch_blocks", hp.pop("batch_blocks"), route_cls,
            "batches the eigen mode's statistics and rotations of same-shaped blocks",
        )  # fmt: skip
        #: Same-shaped blocks share one batched pass of the gradient statistics and of the
        #: eigen mode's direction (``optim/batching.py``); False: one block at a time (the
        #: same arithmetic up to rounding; the tests compare the two).
        self.batch_blocks = batch
        #: Embeddings updated at O(rows touched) (``optim/lazy_rows.py``).
        self.lazy_rows = issubclass(route_cls, EigenRoute) if lazy is None else lazy
        self.route: Route = route_cls(
            beta2=check_range(name, "beta2", hp.pop("beta2"), 0.0, 1.0, high_open=True),
            power=check_range(name, "power", hp.pop("power"), 0.0, 1.0, low_open=True),
            newton_iters=check_int(name, "newton_iters", hp.pop("newton_iters")),
            first_moment=self.momentum_on is MomentumOn.GRADIENT,
            compile=compile,
        )
        self.inverse = InverseMethod.NEWTON if route_cls.name == "newton" else InverseMethod.EIGH
        self.damping_mode = check_choice(name, "damping_mode", hp.pop("damping_mode"), DampingMode)
        self.ema_decay = check_range(name, "ema_decay", hp.pop("ema_decay"), 0.0, 1.0, False, True)
        self.inverse_every = check_int(name, "inverse_every", hp.pop("inverse_every"))
        if hp["damping"] is None:
            hp["damping"] = route_cls.damping
        if hp["fallback_lr"] is None:
            hp["fallback_lr"] = route_cls.fallback_lr
        super()._configure(params, hp)
        self.momentum_ema = route_cls.momentum_ema
        self._factors: dict[str, KroneckerFactors] = {}
        self.inverse_failures = 0
        #: Stagger the blocks' refreshes over ``inverse_every`` steps (see
        #: :meth:`_refresh_due`); False refreshes every block on the same step.
        self.stagger = True
        #: ``(width, k)``: blocks with a factor at least ``width`` wide refresh every
        #: ``k·inverse_every`` steps (the decomposition of a very wide factor dominates the
        #: amortized step cost on a CPU; ``docs/algorithms.md``). None: every block alike.
        self.wide_refresh: tuple[int, int] | None = None
        #: Blocks whose weight gets gradient from another use too (fallback update).
        self._foreign: set[str] = set()
        #: This step's touched rows of the blocks updated lazily (``lazy_rows``).
        self._touched: dict[str, TouchedRows] = {}
        #: This step's squared row norms of the embeddings, from the gradient statistics.
        self._row_squares: dict[str, Tensor] = {}

    def _split_option(self, name: str, value: int | None) -> int | None:
        """``split_conv`` checked; None: :data:`SPLIT_CONV` with gradient statistics, off with
        K-FAC statistics (whose patch factor has no per-dimension form here)."""
        gradient = self.curvature is CurvatureSource.GRADIENT
        if value is None:
            return SPLIT_CONV if gradient else None
        value = check_int(name, "split_conv", value)
        if not gradient:
            raise ValueError(
                f"{name}: split_conv={value} splits gradient statistics per tensor dimension; "
                "it needs curvature='gradient' (K-FAC statistics keep the patch factor whole)."
            )
        return value

    @staticmethod
    def _one_sided_option(name: str, value: str | None, route: type[Route]) -> OneSided | None:
        """``one_sided`` checked: None, or a side rule with an eigh-based route (a diagonal
        side is an eigenbasis; Newton–Schulz keeps none)."""
        if value is None:
            return None
        rule = check_choice(name, "one_sided", value, OneSided)
        refuse_without_eigenbasis(name, f"one_sided={rule.value!r}", route, "one_sided=None")
        return rule

    @property
    def beta2(self) -> float:
        return self.route.beta2

    @property
    def power(self) -> float:
        return self.route.power

    @property
    def newton_iters(self) -> int:
        return self.route.newton_iters

    @property
    def captures_activations(self) -> bool:
        """Gradient statistics need no hooks on the layers' inputs and output gradients."""
        return self.curvature is CurvatureSource.KFAC

    def _new_accumulator(self, block: KroneckerBlock) -> Any:
        own = getattr(block, "new_accumulator", None)  # a block of several uses (tied weights)
        if own is not None:
            return own()
        return FactorAccumulator(block.n_in if block.diagonal_input else None)

    def factors(self, key: str) -> KroneckerFactors:
        """The factor state of block ``key`` (created on first use)."""
        if key not in self._factors:
            self._factors[key] = KroneckerFactors(working_dtype(self._blocks[key].weight.dtype))
        return self._factors[key]

    # ------------------------------------------------------------------ statistics
    def _used_elsewhere(self, key: str, block: KroneckerBlock, accumulator: Any) -> bool:
        """A block whose weight provably gets gradient from another use as well (an embedding
        whose weight an output layer uses through ``F.linear``) keeps no factors: its
        parameters get the fallback update, said once. The test runs on the device; its flag
        is read with the step's one read-back, which drops the block before preconditioning."""
        if key in self._foreign:
            return True
        grad = block.weight.grad
        if grad is None or getattr(accumulator, "a_sum", None) is None:
            return False  # no statistics yet, or a tied block's (its uses are known)
        flag = block.foreign_gradient(grad, accumulator.a_sum)
        if flag is not None:
            self._note(
                flag, lambda found, key=key, block=block: self._drop_foreign(key, block, found)
            )
        return False

    def _drop_foreign(self, key: str, block: KroneckerBlock, found: float) -> None:
        if not found or key in self._foreign:
            return
        self._foreign.add(key)
        self._factors.pop(key, None)
        warnings.warn(
            f"{type(self).__name__}: the weight of module '{block.name}' "
            f"({type(block.module).__name__}) gets gradient from outside the module (tied to "
            "an output layer through F.linear or a matmul?); one Kronecker block cannot "
            f"precondition a gradient summed over two uses, so it gets the fallback update "
            f"({self.fallback_description}). Tie modules instead (head.weight = "
            "embedding.weight), which attach() recognizes.",
            RuntimeWarning,
            stacklevel=6,
        )

    def _absorb_statistics(self, capture: CurvatureCapture, grads: StepGradients) -> None:
        """K-FAC statistics from the capture (the template's stage); gradient statistics from
        each block's gradient matrix (every rank holds the averaged gradient under DDP, so the
        owner needs no communication)."""
        if self.curvature is CurvatureSource.KFAC:
            super()._absorb_statistics(capture, grads)
            return
        owned = [
            (key, block)
            for key, block in self._blocks.items()
            if self._owns(key) and all(p in grads.of for p in block.params())
        ]
        keys = [self._statistics_key(key, block, grads) for key, block in owned]
        batches, alone = same_keys(keys)
        for i in alone:
            key, block = owned[i]
            factors = self.factors(key)
            A, G, K = self._gradient_statistics(block, grads.matrix(block), factors.dtype)
            if block.diagonal_input:  # each row's squared norm: the lazy update's rows
                self._row_squares[key] = A[0]
            ok = factors.update(A, G, self.ema_decay, accept=self._readback.step_ok, K_batch=K)
            self._note(~ok, self._rejection_counter(block))
        for batch in batches:  # same-shaped dense blocks: one batched pass (optim/batching.py)
            members = [owned[i] for i in batch]
            factors = [self._factors[key] for key, _ in members]
            V = torch.stack([grads.matrix(block) for _, block in members])
            A, G = gradient_factors(V, False, factors[0].dtype)
            ok = update_stacked(factors, A, G, self.ema_decay, accept=self._readback.step_ok)
            for (_, block), flag in zip(members, ok.unbind(0), strict=True):
                self._note(~flag, self._rejection_counter(block))

    def _statistics_key(
        self, key: str, block: KroneckerBlock, grads: StepGradients
    ) -> tuple[Any, ...] | None:
        """Which blocks' gradient statistics are absorbed as one batch: dense factors of equal
        shapes, updated at least once (None: on its own)."""
        factors = self._factors.get(key)
        if (
            not self.batch_blocks
            or factors is None
            or factors.A is None
            or factors.G is None
            or factors.K is not None
            or self._splits(block)
            or self._diagonal_factors(block)
        ):
            return None
        V = grads.matrix(block)
        return tuple(V.shape), V.dtype, factors.dtype, factors.A.shape, factors.G.shape

    def _update_block(
        self, key: str, block: KroneckerBlock, accumulator: Any, grads: StepGradients
    ) -> Tensor:
        if self._used_elsewhere(key, block, accumulator):
            return torch.ones((), dtype=torch.bool, device=block.weight.device)
        A, G = accumulator.averaged(LossReduction(self.loss_reduction))
        A, G = self._size_policy(block, A, G)
        # Non-finite statistics (and a step that turns out skipped) leave the factors as they
        # were; decided on the device, counted at the step's read-back.
        return self.factors(key).update(A, G, self.ema_decay, accept=self._readback.step_ok)

    def _size_policy(self, block: KroneckerBlock, A: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
        """The factors :meth:`_diagonal_factors` names are kept as their diagonal
        ``(groups, n)`` (their eigenbasis the identity, like an embedding's A); the others pass
        unchanged."""
        diagonal = self._diagonal_factors(block)
        return tuple(  # type: ignore[return-value]
            torch.diagonal(F, dim1=-2, dim2=-1).contiguous()
            if key in diagonal and F.dim() == 3
            else F
            for key, F in (("A", A), ("G", G))
        )

    def _gradient_statistics(
        self, block: KroneckerBlock, V: Tensor, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Gradient statistics ``(Vᵀ V, V Vᵀ, None)``, a side kept diagonal never formed
        dense; for a split convolution ``(A, V Vᵀ, K)``, the channel and tap factors."""
        if self._splits(block):
            A, K = split_input_factors(V, block.taps, dtype)
            return A, output_factor(V, dtype), K  # no dense C·k-wide column factor
        diagonal = self._diagonal_factors(block)
        if "G" not in diagonal:
            return (*gradient_factors(V, "A" in diagonal, dtype), None)
        V = V.to(dtype)
        A = column_squares(V) if "A" in diagonal else V.transpose(-1, -2) @ V
        return A, column_squares(V.mT), None

    def _splits(self, block: KroneckerBlock) -> bool:
        """Whether ``block``'s input side is split per dimension (``split_conv``): a
        convolution (more than one kernel tap) whose weight columns are wider than the cap."""
        cap = self.split_conv
        return cap is not None and block.taps > 1 and block.n_in - block.has_bias > cap

    def _diagonal_factors(self, block: KroneckerBlock) -> tuple[str, ...]:
        """The factors of ``block`` stored as their diagonal (``"A"``, ``"G"``): an
        embedding's A, a factor wider than ``max_factor`` and, with ``one_sided``, the side it
        does not keep of a block whose two sides are dense (a split convolution's sides are
        per dimension and stay)."""
        cap = math.inf if self.max_factor is None else self.max_factor
        split = self._splits(block)
        a_diagonal = block.diagonal_input or (block.n_in > cap and not split)
        g_diagonal = block.n_out > cap
        if self.one_sided is not None and not (a_diagonal or g_diagonal or split):
            # "narrower" keeps the input side on a tie.
            a_diagonal = self.one_sided is OneSided.NARROWER and block.n_in > block.n_out
            g_diagonal = not a_diagonal
        return ("A",) * a_diagonal + ("G",) * g_diagonal

    def _refresh_cost(self, block: KroneckerBlock) -> float:
        """The cost that balances owners across DDP ranks: a side kept as its diagonal costs
        its width, a split convolution's input side its channel and tap factors cubed."""
        diagonal = self._diagonal_factors(block)
        cost = block_cost(block.groups, block.n_in, block.n_out, "A" in diagonal, "G" in diagonal)
        if self._splits(block):  # replace the dense input side by its two factors
            channels = (block.n_in - block.has_bias) // block.taps
            cost += block.groups * (channels**3 + block.taps**3 - block.n_in**3)
        return cost

    # ------------------------------------------------------------------ refresh
    def _refresh_due(self, index: int, block: KroneckerBlock) -> bool:
        """Whether the ``index``-th block refreshes its representation at this step.

        Staggered: block i refreshes when ``(step + ⌊i·T/B⌋) mod T == 0`` (T = its refresh
        period, B = blocks), so each step pays for about B/T blocks instead of all B every T
        steps. The period is ``inverse_every``, times ``wide_refresh[1]`` for a block with a
        factor at least ``wide_refresh[0]`` wide (when :attr:`wide_refresh` is set).
        """
        period = self.inverse_every
        if self.wide_refresh is not None and max(block.n_in, block.n_out) >= self.wide_refresh[0]:
            period *= self.wide_refresh[1]
        offset = index * period // max(len(self._blocks), 1) if self.stagger else 0
        return (self.grng_step + offset) % period == 0

    def _stand_in_first(self, index: int, block: KroneckerBlock, factors: KroneckerFactors) -> bool:
        """``stagger_first``: a block that decomposes a factor at least that wide (one kept as
        its diagonal does not count), refreshed for the first time off its staggered slot,
        takes a stand-in basis (no decomposition) until the slot, so the first decompositions
        are spread like the later ones."""
        width = self.stagger_first
        if width is None or _decomposed_width(factors) < width:
            return False
        return not self._refresh_due(index, block)

    def _prepare(self, grads: StepGradients) -> None:
        """Refreshes, through the route, every block that is due (the first one at once)."""
        group_of = {p: g for g in self.param_groups for p in g["params"]}
        due = []
        for index, (key, block) in enumerate(self._blocks.items()):
            factors = self._factors.get(key)
            if factors is None or factors.updates == 0:
                continue
            if not factors.ready or self._refresh_due(index, block):
                damping = self._damping(block, group_of[block.weight], grads)
                stand_in = not factors.ready and self._stand_in_first(index, block, factors)
                due.append(Due(block, factors, damping, stand_in, self._rank_bound(block, factors)))
        self._announce_wide(due)
        with record_function("grng.refresh.route"):
            failures = self.route.refresh(due, self._readback.step_ok)
        for d, failed in zip(due, failures, strict=True):
            self._note(failed, self._count_inverse_failure)
            if d.factors.unusable is not None:
                self._note(d.factors.unusable, self._cold_start_setter(d.factors))
            for side, drifted in enumerate(d.factors.drifted):
                if drifted is not None:
                    self._note(drifted, self._full_eigh_setter(d.factors, side))
        self._note_touched_rows(grads)

    def _lazy(self, key: str, block: KroneckerBlock) -> bool:
        """Whether ``block`` is updated at O(rows touched): an embedding (its input side is its
        own eigenbasis) with ``lazy_rows``, preconditioned by this rank."""
        factors = self._factors.get(key)
        return (
            self.lazy_rows
            and block.diagonal_input
            and block.groups == 1
            and key not in self._foreign
            and self._owns(key)
            and factors is not None
            and factors.ready
            and factors.evec_A is None
            and factors.evec_K is None
        )

    def _note_touched_rows(self, grads: StepGradients) -> None:
        """The touched rows of each lazy block; their count comes with the step's read-back."""
        self._touched = {}
        squares, self._row_squares = self._row_squares, {}
        for key, block in self._blocks.items():
            params = block.params()
            if not self._lazy(key, block) or any(p not in grads.of for p in params):
                continue
            V = grads.matrix(block)
            rows, count = touched_rows(V, squares.get(key))
            self._touched[key] = rows
            self._note(count, rows.set_count)

    def _rank_bound(
        self, block: KroneckerBlock, factors: KroneckerFactors
    ) -> tuple[int | None, ...]:
        """Per side (A, G, K), a bound on the rank of gradient statistics while the factor may
        be rank-deficient, else None (and always None for K-FAC statistics, whose factors are
        left as eigh returns them). Each update adds one gradient matrix, of rank at least 1
        and at most min(n_out, n_in) (less with fewer samples than that: a gradient is a sum of
        per-sample outer products), so after k updates a side of width n may be deficient
        while k < n, and is certainly deficient, of rank ≤ k·min(n_out, n_in), while that is
        below n. The bound is then that product, else n (only eigenvalues at rounding level
        count as null: :func:`~lightning_grng.curvature.inverse.settle_null_space`)."""
        if self.curvature is not CurvatureSource.GRADIENT:
            return (None, None, None)
        # (width, rank of one update) per side; a split side's factors are the contractions
        # of the (C, k) weight tensor over the other modes.
        sides = [(block.n_in, block.n_out), (block.n_out, block.n_in)]
        if self._splits(block):
            C, k = (block.n_in - block.has_bias) // block.taps, block.taps
            sides = [(C, block.n_out * k), (block.n_out, block.n_in), (k, block.n_out * C)]
        updates = factors.updates
        return tuple(
            None if updates >= n else min(updates * min(n, per_update), n)
            for n, per_update in sides
        )

    def _announce_wide(self, due: list[Due]) -> None:
        """Says once, with the sizes, that a refresh decomposes very wide factors (the first
        step of a ResNet's 4608-wide conv factors takes tens of seconds on a CPU)."""
        wide = [(_decomposed_width(d.factors), d.block.name) for d in due if not d.stand_in]
        wide = [(n, name) for n, name in wide if n >= WIDE_FACTOR]
        if not wide or "wide" in self._warned:
            return
        self._warned.add("wide")
        width, name = max(wide)
        log.info(
            "%s: refreshing %d Kronecker block(s) with factors up to %d wide (the widest: "
            "'%s'); a decomposition is O(n³), so this step may take a while. Later refreshes "
            "are staggered over inverse_every steps.",
            type(self).__name__,
            len(wide),
            width,
            name,
        )

    def _count_inverse_failure(self, failed: float) -> None:
        if failed:
            # The last good preconditioner was kept; make the next one better conditioned.
            self.inverse_failures += 1
            self._raise_damping()

    @staticmethod
    def _cold_start_setter(factors: KroneckerFactors) -> Any:
        def set_cold(unusable: float) -> None:
            factors.cold_next = bool(unusable)

        return set_cold

    @staticmethod
    def _full_eigh_setter(factors: KroneckerFactors, side: int) -> Any:
        def set_full(drifted: float) -> None:
            factors.full_next[side] = bool(drifted)

        return set_full

    # ------------------------------------------------------------------ precondition
    def _damping(
        self, block: KroneckerBlock, group: dict[str, Any], grads: StepGradients
    ) -> DampingArgs:
        """The damping rule's arguments for one block (``optim/damping.py``)."""
        return DampingArgs(
            damping=group["damping"],
            rho=group["rho"] if self.gr_as_damping else 0.0,
            boost=self.damping_boost,
            mode=self.damping_mode,
            block_grad_sq=lambda: grads.block_sq(block),
            total_grad_sq=grads.sq,
            gr_form=self.gr_form,
        )

    def _precondition_block(
        self,
        key: str,
        block: KroneckerBlock,
        V: Tensor,
        group: dict[str, Any],
        grads: StepGradients,
    ) -> Tensor | RowUpdate | None:
        factors = self._factors.get(key)
        if factors is None or not factors.ready:
            return None
        damping = self._damping(block, group, grads)
        rows = self._touched.pop(key, None)  # noted before this step's read-back
        U, ratio = self.route.direction(block, factors, V, damping, group["momentum"], rows)
        if ratio is not None:
            self._damping_ratios[block.name] = ratio.mean()
        return U

    def _precondition_blocks(
        self, owned: list[BlockItem], grads: StepGradients
    ) -> list[Tensor | RowUpdate | None]:
        """Same-shaped blocks of the eigen mode get their directions as one batch (batched
        rotations, one elementwise pass: ``optim/batching.py``), the others one by one."""
        out: list[Tensor | RowUpdate | None] = [None] * len(owned)
        batches, alone = same_keys([self._direction_key(*item) for item in owned])
        for i in alone:
            out[i] = self._precondition_block(*owned[i], grads)
        for batch in batches:
            members = [owned[i] for i in batch]
            _, first_block, _, group = members[0]
            damping = self._damping(first_block, group, grads)
            U, ratio = self.route.stacked_direction(  # type: ignore[attr-defined]
                [self._factors[key] for key, *_ in members],
                torch.stack([V for _, _, V, _ in members]),
                damping,
                group["momentum"],
            )
            mean_ratio = ratio.mean()
            for i, (_, block, _, _), direction in zip(batch, members, U.unbind(0), strict=True):
                out[i] = direction
                self._damping_ratios[block.name] = mean_ratio
        return out

    def _direction_key(
        self, key: str, block: KroneckerBlock, V: Tensor, group: dict[str, Any]
    ) -> tuple[Any, ...] | None:
        """Which blocks' eigen-mode directions are computed as one batch: both bases dense and
        of equal shapes, moments of the gradient's shape with equal step counts (their bias
        corrections are then equal), the same param group (None: on its own)."""
        factors = self._factors.get(key)
        if not self.batch_blocks:  # (only the eigen route takes it: refused elsewhere)
            return None
        if factors is None or not factors.ready or key in self._touched:
            return None
        Q_A, Q_G, moment = factors.evec_A, factors.evec_G, factors.moment
        if Q_A is None or Q_G is None or factors.evec_K is not None:
            return None
        if moment is None or moment.shape != V.shape or not moment.is_contiguous():
            return None
        first = factors.rotated_first_moment
        counts = (factors.moment_count,)
        if self.route.first_moment:
            if first is None or first.shape != V.shape:
                return None
            counts += (factors.first_count,)
        dtypes = (V.dtype, Q_A.dtype, Q_G.dtype, moment.dtype, factors.dtype)
        return tuple(V.shape), dtypes, Q_A.shape, Q_G.shape, id(group), counts

    def _momentum_carried(self, directions: dict[Tensor, Tensor]) -> set[Tensor]:
        """The parameters whose direction already holds the gradient's first moment (the
        route keeps it: ``momentum_on="gradient"``), so the template adds no momentum."""
        if not self.route.first_moment:
            return set()
        return {p for b in self._blocks.values() for p in b.params() if p in directions}

    def _reported_damping(self, group: dict[str, Any]) -> float | Tensor:
        """Relative mode: the mean over blocks of γ / mean curvature (λ·boost, plus RING's GR
        share in the kfac mode); absolute mode: γ of the first group, ``(λ + ρ‖g‖²)·boost``."""
        if self.damping_mode is DampingMode.ABSOLUTE:
            rho = group["rho"] if self.gr_as_damping else 0.0
            grad_sq = self._readback.grad_sq_host  # not finite on a skipped step: no GR term
            gr = rho * grad_sq if math.isfinite(grad_sq) else 0.0
            return (group["damping"] + gr) * self.damping_boost
        if self._damping_ratios:
            return torch.stack([r.double() for r in self._damping_ratios.values()]).mean()
        return group["damping"] * self.damping_boost

    # ------------------------------------------------------------------ checkpoints
    def _block_state(self, key: str) -> dict[str, Any]:
        factors = self._factors.get(key)
        return {} if factors is None else factors.state_dict()

    def _load_block_state(self, key: str, state: dict[str, Any]) -> None:
        block = self._blocks[key]
        factors = KroneckerFactors(working_dtype(block.weight.dtype))
        factors.load_state_dict(state, block.weight.device)
        widths = {"A": (factors.A, block.n_in), "G": (factors.G, block.n_out)}
        if self._splits(block):
            channels = (block.n_in - block.has_bias) // block.taps
            widths |= {"A": (factors.A, channels), "K": (factors.K, block.taps)}
        elif factors.K is not None:
            widths["K"] = (factors.K, 0)  # a split factor where this optimizer splits none
        self._check_factor_shapes(block, widths, diagonal=self._diagonal_factors(block))
        moment = factors.moment
        if moment is not None and tuple(moment.shape) != (block.groups, block.n_out, block.n_in):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the second moment (moment) of module "
                f"'{block.name}' has shape {tuple(moment.shape)}, expected "
                f"{(block.groups, block.n_out, block.n_in)}; the checkpoint belongs to another "
                "model."
            )
        self._factors[key] = factors

    def _drop_block_state(self, key: str) -> None:
        self._factors.pop(key, None)

    def _curvature_store(self) -> dict[str, Any]:
        return self._factors


def _eigen_only_flag(
    owner: str, key: str, value: Any, route: type[Route], purpose: str, off: bool | None = False
) -> bool | None:
    """An on/off option that only the eigen mode has, checked: a bool (or None where ``off``
    is None, "the mode's default"), and not True with another route."""
    if not (isinstance(value, bool) or (off is None and value is None)):
        allowed = "True or False" if off is not None else "True, False or None"
        raise TypeError(f"{owner}: {key} must be {allowed}, got {value!r}.")
    if value and not issubclass(route, EigenRoute):
        raise ValueError(
            f"{owner}: {key}=True {purpose}; the kfac mode has none. Use "
            f"preconditioner='eigen' with it, or {key}={off}."
        )
    return value


def _decomposed_width(factors: KroneckerFactors) -> int:
    """The width of the widest factor a refresh decomposes (one stored as its diagonal is not)."""
    return max(
        (F.shape[-1] for F in (factors.A, factors.G, factors.K) if F is not None and F.dim() == 3),
        default=0,
    )
