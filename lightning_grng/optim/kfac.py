"""K-FAC: the ρ = 0 member of the family and the base of RING and RENG."""

from __future__ import annotations

import warnings
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_grng.curvature.block import KroneckerBlock
from lightning_grng.curvature.capture import FactorAccumulator, LossReduction
from lightning_grng.curvature.inverse import batched_spd_eigh, working_dtype
from lightning_grng.curvature.kronecker import InverseMethod, KroneckerFactors
from lightning_grng.optim.base import GRNGOptimizer, ParamsT
from lightning_grng.optim.validation import check_choice, check_int, check_range


class DampingMode(str, Enum):
    """Units of ``damping`` (``docs/algorithms.md`` §2)."""

    #: γ = λ · (mean eigenvalue of the block's A ⊗ G): scale-free, the same default means the
    #: same thing on any model.
    RELATIVE = "relative"
    #: γ = λ in the units of the Fisher (the loss's units squared over the parameters').
    ABSOLUTE = "absolute"


class Preconditioner(str, Enum):
    """How a block's gradient is scaled in the Kronecker eigenbasis (``docs/algorithms.md`` §8)."""

    #: ``(A ⊗ G + γI)⁻¹``: the eigenvalue products ``s aᵀ`` (the paper's K-FAC; eigh or Newton).
    KFAC = "kfac"
    #: ``(D + γ)^(−power)`` in the eigenbasis of A and G, with D a running second moment of the
    #: rotated gradient (eigenvalue-corrected, EKFAC/SOAP-like; eigh only).
    EIGEN = "eigen"


#: Defaults that depend on the preconditioner mode (``docs/defaults.md``): the relative damping
#: λ and the Adam fallback's lr multiple (the eigen mode's lr has Adam's units).
MODE_DEFAULTS: dict[Preconditioner, dict[str, float]] = {
    Preconditioner.KFAC: dict(damping=100.0, fallback_lr=0.1),
    Preconditioner.EIGEN: dict(damping=1e-4, fallback_lr=1.0),
}


class KFAC(GRNGOptimizer):
    """Kronecker-factored natural gradient per layer, in one of two modes:

    * ``preconditioner="eigen"`` (default): ``U = Q (D + γ)^(−½) Qᵀ g`` with Q the eigenbasis
      of the Kronecker factors A and G and D a running second moment of the rotated gradient
      (eigenvalue-corrected; ``docs/algorithms.md`` §8). ``lr`` has Adam's units.
    * ``preconditioner="kfac"``: the paper's ``U = (A ⊗ G + γI)⁻¹ g`` (eigh or warm-started
      Newton–Schulz), with the KL-clip setting the step length.

    ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d``, ``nn.Embedding`` and ``nn.MultiheadAttention``
    layers (and registered types, :func:`lightning_grng.register_block`) get a Kronecker block;
    every other trainable parameter gets the fallback update. Hooks are attached with
    :func:`lightning_grng.attach` (plain PyTorch) or by :class:`lightning_grng.GRNGCallback`.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        momentum: momentum on the preconditioned update, in [0, 1): heavy ball in ``"kfac"``
            mode, an EMA (``m ← μm + (1 − μ)U``) in ``"eigen"`` mode.
        weight_decay: decoupled weight decay (``θ ← θ·(1 − lr·wd)``), >= 0.
        damping: Tikhonov damping λ > 0 added to the curvature, in the units of
            ``damping_mode``; None (default): 100 for ``preconditioner="kfac"``, 1e-4 for
            ``"eigen"`` (relative units).
        damping_mode: ``"relative"`` (default: γ = λ times the mean eigenvalue of each block's
            A ⊗ G, so λ is scale-free) or ``"absolute"`` (γ = λ).
        ema_decay: decay of the factor moving averages, in [0, 1).
        curvature_every: refresh the factor statistics every this many steps.
        inverse_every: refresh the inverse representation every this many steps.
        inverse: ``"eigh"`` (exact damping via eigendecompositions) or ``"newton"`` (warm-started
            Newton–Schulz inverses of factored-damped factors, matmuls only; ``"kfac"`` mode
            only). None (default): ``"eigh"``.
        newton_iters: maximum Newton–Schulz iterations per refresh.
        kl_clip: bound on the step's predicted KL change ``lr²·⟨U, g⟩``; None disables it.
        fisher: ``"empirical"`` (from the training loss's backward) or ``"mc"`` (labels sampled
            from the model; needs :meth:`mc_fisher_backward`).
        loss_reduction: how the training loss reduces over samples, ``"mean"`` or ``"sum"``;
            sets the scale of G (see ``docs/algorithms.md``).
        fallback: update of parameters without a Kronecker block: ``"adam"`` (default) or
            ``"sgd"`` (the raw gradient through momentum and the KL-clip).
        fallback_lr: the Adam fallback's learning rate as a multiple of the group's ``lr``
            (so it follows the same schedule); None (default): 1 in ``"eigen"`` mode, 0.1 in
            ``"kfac"`` mode.
        preconditioner: ``"eigen"`` (default: the eigenbasis of A and G with a running second
            moment of the rotated gradient in place of the eigenvalue products;
            ``docs/algorithms.md`` §8) or ``"kfac"`` (``(A ⊗ G + γI)⁻¹``, the paper's route).
        beta2: ``"eigen"`` mode: decay of the second moment, in [0, 1).
        power: ``"eigen"`` mode: the step is ``(D + γ)^(−power)`` in the eigenbasis, in (0, 1]
            (½: Adam's scaling; 1: the natural gradient's).
    """

    #: The ``inverse`` route when None is given (RING overrides it for ``"kfac"`` mode).
    default_inverse: ClassVar[InverseMethod] = InverseMethod.EIGH

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.02,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        damping: float | None = None,
        damping_mode: str = "relative",
        ema_decay: float = 0.95,
        curvature_every: int = 5,
        inverse_every: int = 20,
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
    ) -> None:
        name = type(self).__name__
        self.preconditioner = check_choice(name, "preconditioner", preconditioner, Preconditioner)
        self.beta2 = check_range(name, "beta2", beta2, 0.0, 1.0, high_open=True)
        self.power = check_range(name, "power", power, 0.0, 1.0, low_open=True)
        self.damping_mode = check_choice(name, "damping_mode", damping_mode, DampingMode)
        self.ema_decay = check_range(name, "ema_decay", ema_decay, 0.0, 1.0, high_open=True)
        self.inverse_every = check_int(name, "inverse_every", inverse_every)
        eigen = self.preconditioner is Preconditioner.EIGEN
        if inverse is None:
            inverse = InverseMethod.EIGH if eigen else self.default_inverse
        self.inverse = check_choice(name, "inverse", inverse, InverseMethod)
        if eigen and self.inverse is not InverseMethod.EIGH:
            raise ValueError(
                f"{name}: preconditioner='eigen' needs the eigenbasis of A and G, so "
                f"inverse={self.inverse.value!r} is not possible; use inverse='eigh' (or leave "
                "it None), or preconditioner='kfac' for the Newton–Schulz route."
            )
        mode_defaults = MODE_DEFAULTS[self.preconditioner]
        damping = mode_defaults["damping"] if damping is None else damping
        fallback_lr = mode_defaults["fallback_lr"] if fallback_lr is None else fallback_lr
        self.newton_iters = check_int(name, "newton_iters", newton_iters)
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            damping=damping,
            curvature_every=curvature_every,
            kl_clip=kl_clip,
            fisher=fisher,
            loss_reduction=loss_reduction,
            fallback=fallback,
            fallback_lr=fallback_lr,
        )
        self.momentum_ema = eigen
        self._factors: dict[str, KroneckerFactors] = {}
        self.inverse_failures = 0
        #: Stagger the blocks' inverse refreshes over ``inverse_every`` steps (see
        #: :meth:`_refresh_due`); False refreshes every block on the same step.
        self.stagger = True
        #: ``(width, k)``: blocks with a factor at least ``width`` wide refresh their inverse
        #: every ``k·inverse_every`` steps (the decomposition of a very wide factor, e.g. the
        #: 785-wide input factor of an MNIST MLP, dominates the amortized step cost on a CPU;
        #: ``docs/algorithms.md``). None (default): every block every ``inverse_every`` steps.
        self.wide_refresh: tuple[int, int] | None = None
        #: Blocks whose weight gets gradient from another use too (fallback update).
        self._foreign: set[str] = set()

    def _new_accumulator(self, block: KroneckerBlock) -> FactorAccumulator:
        return FactorAccumulator(block.n_in if block.diagonal_input else None)

    def factors(self, key: str) -> KroneckerFactors:
        """The factor state of block ``key`` (created on first use)."""
        if key not in self._factors:
            self._factors[key] = KroneckerFactors(working_dtype(self._blocks[key].weight.dtype))
        return self._factors[key]

    def _used_elsewhere(self, key: str, block: KroneckerBlock, accumulator: Any) -> bool:
        """A block whose weight provably gets gradient from another use as well (an embedding
        whose weight an output layer uses through ``F.linear``) keeps no factors: its
        parameters get the fallback update, said once. The test runs on the device; its flag
        is read with the step's one read-back, which drops the block before preconditioning."""
        if key in self._foreign:
            return True
        grad = block.weight.grad
        if grad is None or accumulator.a_sum is None:
            return False
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
            f"({self._fallback_text}). Tie modules instead (head.weight = embedding.weight), "
            "which attach() recognizes.",
            RuntimeWarning,
            stacklevel=6,
        )

    def _update_block(self, key: str, block: KroneckerBlock, accumulator: Any) -> Tensor:
        if self._used_elsewhere(key, block, accumulator):
            return torch.ones((), dtype=torch.bool, device=block.weight.device)
        A, G = accumulator.averaged(LossReduction(self.loss_reduction))
        # Non-finite statistics (and a step that turns out skipped) leave the factors as they
        # were; decided on the device, counted at the step's read-back.
        return self.factors(key).update(A, G, self.ema_decay, accept=self._step_ok)

    def _refresh_due(self, index: int, block: KroneckerBlock) -> bool:
        """Whether the ``index``-th block refreshes its inverse at this step.

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

    def _refresh(self, grad_sq_norm: Tensor) -> None:
        group_of = {p: g for g in self.param_groups for p in g["params"]}
        due: list[tuple[str, KroneckerBlock, KroneckerFactors]] = []
        for index, (key, block) in enumerate(self._blocks.items()):
            factors = self._factors.get(key)
            if factors is None or factors.updates == 0:
                continue
            if not factors.ready or self._refresh_due(index, block):  # the first one is immediate
                due.append((key, block, factors))
        if self.inverse is InverseMethod.EIGH:
            failed = self._refresh_eigh([f for _, _, f in due])
        else:
            failed = []
            for _, block, factors in due:
                damping = self._block_damping(key, block, factors, group_of[block.weight])
                failed.append(
                    factors.refresh(self.inverse, damping, self.newton_iters, self._step_ok)
                )
                if factors.unusable is not None:
                    self._note(factors.unusable, self._cold_start_setter(factors))
        for flag in failed:
            self._note(flag, self._count_inverse_failure)

    def _refresh_eigh(self, due: list[KroneckerFactors]) -> list[Tensor]:
        """Eigendecompositions of all due factors, batched by size (one call per size)."""
        inputs = [f.eigh_inputs() for f in due]
        # A diagonal A (an embedding's) is its own eigendecomposition: only G is decomposed.
        matrices = [
            m
            for (A, G, _), f in zip(inputs, due, strict=True)
            for m in (A, G)
            if not (m is A and f.a_is_diagonal)
        ]
        try:
            eigs = iter(batched_spd_eigh(matrices))
        except torch.linalg.LinAlgError:  # even the float64 retry: one block at a time
            return [f.refresh(InverseMethod.EIGH, 0.0, 0, self._step_ok) for f in due]
        failed = []
        for f, (A, _, ok) in zip(due, inputs, strict=True):
            eig_A = (A.clamp_min(0.0), None) if f.a_is_diagonal else next(eigs)
            failed.append(f.install_eigh(eig_A, next(eigs), ok, self._step_ok))
        return failed

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

    def _precondition_block(
        self, key: str, block: KroneckerBlock, V: Tensor, group: dict[str, Any], grad_sq: Tensor
    ) -> Tensor | None:
        factors = self._factors.get(key)
        if factors is None or not factors.ready:
            return None
        if self.preconditioner is Preconditioner.EIGEN:
            return self._precondition_eigen(block, factors, V, group)
        return factors.precondition(V, self._block_damping(key, block, factors, group))

    def _precondition_eigen(
        self, block: KroneckerBlock, factors: KroneckerFactors, V: Tensor, group: dict[str, Any]
    ) -> Tensor:
        """``Q (D + γ + C_GR)^(−power) Qᵀ vec(V)``: the eigen-corrected stage (§8).

        ``D`` is the bias-corrected second moment of the rotated gradient, γ the damping (in
        relative mode λ times the block's mean of D, per group) and ``C_GR`` the diagonal the
        gradient regularizer adds in this basis (:meth:`_eigen_gr_curvature`; 0 for KFAC)."""
        R = factors.to_eigenbasis(V)
        D = factors.observe_moment(R, self.beta2)
        ratio = torch.full(
            (D.shape[0],), group["damping"] * self.damping_boost, dtype=D.dtype, device=D.device
        )
        self._damping_ratios[block.name] = ratio.mean()
        relative = self.damping_mode is DampingMode.RELATIVE
        gamma = ratio * D.mean(dim=(-2, -1)) if relative else ratio
        curvature = D + gamma[:, None, None] + self._eigen_gr_curvature(block, group, R)
        curvature = curvature.clamp_min(torch.finfo(curvature.dtype).tiny)
        scale = curvature.rsqrt() if self.power == 0.5 else curvature.pow(-self.power)
        return factors.from_eigenbasis(R * scale, V.dtype)

    def _eigen_gr_curvature(
        self, block: KroneckerBlock, group: dict[str, Any], R: Tensor
    ) -> Tensor | float:
        """The gradient regularizer's curvature on the eigenbasis diagonal (KFAC: none)."""
        return 0.0

    def _block_damping(
        self, key: str, block: KroneckerBlock, factors: KroneckerFactors, group: dict[str, Any]
    ) -> float | Tensor:
        """γ of one block in the units of its A ⊗ G (per group in relative mode), boost
        included; records the damping-to-curvature ratio γ / mean eigenvalue for diagnostics."""
        scale = factors.mean_eigenvalue()
        if self.damping_mode is DampingMode.ABSOLUTE:
            gamma: float | Tensor = self._effective_damping(group, self._step_grad_sq)
            ratio = gamma / scale.clamp_min(torch.finfo(scale.dtype).tiny)
        else:
            ratio = self._relative_damping(block, group, scale) * self.damping_boost
            gamma = ratio * scale
        self._damping_ratios[block.name] = ratio.mean()
        return gamma

    def _relative_damping(
        self, block: KroneckerBlock, group: dict[str, Any], scale: Tensor
    ) -> Tensor:
        """γ / (mean eigenvalue of A ⊗ G) before the failure boost; KFAC: λ."""
        return torch.full_like(scale, group["damping"])

    def _block_state(self, key: str) -> dict[str, Any]:
        factors = self._factors.get(key)
        return {} if factors is None else factors.state_dict()

    def _load_block_state(self, key: str, state: dict[str, Any]) -> None:
        block = self._blocks[key]
        factors = KroneckerFactors(working_dtype(block.weight.dtype))
        factors.load_state_dict(state, block.weight.device)
        self._check_factor_shapes(
            block,
            {"A": (factors.A, block.n_in), "G": (factors.G, block.n_out)},
            diagonal=("A",) if block.diagonal_input else (),
        )
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
