"""RKalman: the Bayesian member of the family, a Kronecker-factored Kalman filter that never
inverts the Fisher."""

from __future__ import annotations

from enum import Enum
from typing import Any, ClassVar

from torch import Tensor

from lightning_grng.curvature.block import KroneckerBlock
from lightning_grng.curvature.capture import LossReduction
from lightning_grng.curvature.inverse import working_dtype
from lightning_grng.curvature.kalman import (
    KalmanAccumulator,
    KalmanFactors,
    Measurement,
    MeasurementMethod,
)
from lightning_grng.optim.base import GROUP_RANGES, RHO_RANGE, GRNGOptimizer, ParamsT
from lightning_grng.optim.validation import check_choice, check_int, check_range


class RhoMode(str, Enum):
    """Where the gradient regularizer enters the filter."""

    DAMPING = "damping"
    NOISE = "noise"


class RKalman(GRNGOptimizer):
    """Regularized Kalman: natural gradient as a Kronecker-factored Kalman filter, no inversion.

    Per layer the optimizer keeps the posterior covariance of the weights as
    ``P_A ⊗ P_G / N`` (Ollivier 2018: an extended Kalman filter on static parameters is online
    natural gradient) and updates it with inversion-free recursions only: a predict step with
    forgetting (``P ← P/ε``), a damping floor that survives forgetting (a convergent power series
    for ``(Λ + cI)⁻¹``), and measurement steps that absorb k compressed activation / error
    vectors with scalar-innovation Sherman–Morrison updates. The mean step is
    ``θ ← θ − lr · P_G · mat(g) · P_A / N``: ``lr = 1`` is the Kalman (Bayesian) step, and with
    forgetting ε the step is ``lr·(1−ε)`` times KFAC's natural-gradient step with factored
    damping. See ``docs/algorithms.md §7`` for the derivation.

    Gradient regularization ``ℓ + ρ/2‖∇ℓ‖²`` enters the filter. ``rho_mode="damping"``
    (default): the GR curvature ``ρ‖g‖²I`` of each batch's quadratic model (RING's derivation)
    is absorbed with the batch as information, so the floor becomes ``λ + ρ·avg‖g‖²`` with the
    same memory as the statistics, and the mean step uses g. ``rho_mode="noise"``: the batch's
    observation noise is inflated by ``1 + ρ‖g‖²``, so a batch with a large gradient carries
    less information and moves the mean less. ``rho=0`` is the plain filter in both modes. ‖g‖
    is the global gradient norm.

    With ``forgetting=1``, ``observation_noise=σ²``, ``loss_reduction="sum"`` on the Gaussian
    negative log-likelihood, ``measurement="rows"`` with ``measurement_size`` >= the batch,
    ``lr=1``, no momentum and no KL-clip, a linear layer ends at the exact Bayesian (ridge)
    posterior with prior precision ``prior_count · damping``, whatever the batch split.

    Args:
        params: parameters or parameter groups.
        lr: learning rate; 1 is the Kalman step (the Bayesian posterior mean update).
        momentum: heavy-ball momentum on the preconditioned update, in [0, 1).
        weight_decay: decoupled weight decay (``θ ← θ·(1 − lr·wd)``), >= 0.
        damping: the floor λ > 0 on the per-sample Fisher (``Λ̄_A ⊗ Λ̄_G ≈ A ⊗ G + λI``, split
            between the factors as in KFAC); also sets the prior precision ``prior_count·λ``.
        rho: gradient-regularization strength ρ >= 0.
        rho_mode: ``"damping"`` (ρ‖g‖² is curvature absorbed with the batch) or ``"noise"``
            (it inflates the batch's observation noise).
        forgetting: ε in (0, 1]: the predict step keeps ``ε`` of the information per filter
            update (memory ``1/(1−ε)`` updates); 1 is exact Bayesian updating.
        prior_count: N₀ > 0, the prior's weight in units of information (filter updates for
            a mean-reduced loss, samples for a sum-reduced one); the prior precision is
            ``N₀·λ``. None: the stationary count ``c/(1−ε)`` (c: the first update's
            information), which makes the filter KFAC's moving average from the first step;
            required when ``forgetting=1``.
        observation_noise: σ² > 0 when the training loss is the Gaussian negative
            log-likelihood ``‖y − ŷ‖²/(2σ²)`` of each block's outputs with known noise: then
            ``P_G = σ²I`` is fixed and only ``P_A`` is filtered (exact for a linear-Gaussian
            layer; a one-sided preconditioner for hidden layers). None (default): ``P_G`` is
            filtered from the back-propagated errors (``fisher``).
        measurement: ``"sketch"`` (k signed sums of rows, ``XᵀΩ``, per factor) or ``"rows"``
            (k rows drawn at random; all rows, exactly, when a pass has at most k).
        measurement_size: k >= 1, measurement vectors per factor and pass.
        floor_tol: bound on the relative over-application of each damping-floor increment by
            its truncated power series, in (0, 1) (one matmul per factor at the default).
        curvature_every: run the filter (statistics and update) every this many steps.
        kl_clip: bound on the step's predicted KL change ``lr²·⟨U, g⟩``; None disables it.
        fisher: ``"empirical"`` (from the training loss's backward) or ``"mc"`` (labels sampled
            from the model; needs :meth:`mc_fisher_backward`).
        loss_reduction: how the training loss reduces over samples, ``"mean"`` or ``"sum"``;
            sets the unit of information (one update, or one sample).
        seed: seed of the measurement draws (sketches, row samples), >= 0.
        fallback: ``"adam"`` (default) or ``"sgd"``: the update of parameters without a block.
        fallback_lr: the Adam fallback's lr as a multiple of the group's ``lr``.
    """

    group_ranges: ClassVar[dict[str, tuple[float, float | None, bool, bool]]] = {
        **GROUP_RANGES,
        **RHO_RANGE,
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        damping: float = 0.1,
        rho: float = 0.01,
        rho_mode: str = "damping",
        forgetting: float = 0.95,
        prior_count: float | None = None,
        observation_noise: float | None = None,
        measurement: str = "sketch",
        measurement_size: int = 16,
        floor_tol: float = 0.1,
        curvature_every: int = 5,
        kl_clip: float | None = 1e-2,
        fisher: str = "empirical",
        loss_reduction: str = "mean",
        seed: int = 0,
        fallback: str = "adam",
        fallback_lr: float = 0.1,
    ) -> None:
        name = type(self).__name__
        self.forgetting = check_range(name, "forgetting", forgetting, 0.0, 1.0, low_open=True)
        if prior_count is not None:
            prior_count = check_range(name, "prior_count", prior_count, 0.0, low_open=True)
        elif self.forgetting == 1.0:
            raise ValueError(
                f"{name}: invalid prior_count=None with forgetting=1.0; allowed: a number in "
                "(0.0, inf) (without forgetting the prior's weight cannot default to the "
                "stationary count 1/(1 - forgetting))."
            )
        self.prior_count = prior_count
        if observation_noise is not None:
            observation_noise = check_range(
                name, "observation_noise", observation_noise, 0.0, low_open=True
            )
        self.observation_noise = observation_noise
        self.rho_mode = check_choice(name, "rho_mode", rho_mode, RhoMode)
        self.measurement = check_choice(name, "measurement", measurement, MeasurementMethod)
        self.measurement_size = check_int(name, "measurement_size", measurement_size)
        self.floor_tol = check_range(
            name, "floor_tol", floor_tol, 0.0, 1.0, low_open=True, high_open=True
        )
        self.seed = check_int(name, "seed", seed, low=0)
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
        self._add_group_default("rho", self._check_group_value("rho", rho))
        self._filters: dict[str, KalmanFactors] = {}
        self._pending: dict[str, Measurement] = {}
        self._accepted: dict[str, bool] = {}
        self._step_gain: dict[str, float] = {}

    # ------------------------------------------------------------------ statistics
    def _new_accumulator(self, block: KroneckerBlock) -> KalmanAccumulator:
        index = int(next(k for k, b in self._blocks.items() if b is block))
        return KalmanAccumulator(
            self.measurement,
            self.measurement_size,
            # Under DDP every rank draws its own sketches (rank 0's draws are the 1-process ones).
            seed_fn=lambda: (
                (self.seed * 65_537 + self.grng_step) * 4_099
                + index
                + 1_000_033 * (self._shard.rank if self._shard is not None else 0)
            ),
            need_g=self.observation_noise is None,
        )

    def _refuses_block(self, block: KroneckerBlock) -> str | None:
        if block.diagonal_input:
            return (
                "RKalman filters a dense P_A (n_in × n_in), which for an embedding would be "
                "vocab × vocab; KFAC, RING and RENG keep its A diagonal"
            )
        return None

    def filter(self, key: str) -> KalmanFactors | None:
        """The filter state of block ``key`` (None before its first update)."""
        return self._filters.get(key)

    @property
    def filters(self) -> dict[str, KalmanFactors]:
        """Filter states by block key (blocks that have had an update)."""
        return dict(self._filters)

    @property
    def filter_failures(self) -> int:
        """Filter updates rejected (non-finite or non-positive result) over all blocks."""
        self._flush()
        return sum(f.failures for f in self._filters.values())

    def _update_block(self, key: str, block: KroneckerBlock, accumulator: Any) -> Tensor:
        meas = accumulator.measurement(LossReduction(self.loss_reduction) is LossReduction.MEAN)
        finite = meas.finite_mask()
        # Absorbed after the step's read-back, and only if finite (see _refresh).
        self._pending[key] = meas
        self._note(finite, lambda value: self._accepted.__setitem__(key, bool(value)))
        return finite

    def _information(self, meas: Measurement) -> float:
        """c: one unit per update for a mean-reduced loss, one per sample for a sum."""
        if LossReduction(self.loss_reduction) is LossReduction.SUM:
            return float(max(meas.samples, 1))
        return 1.0

    def _noise_weight(self, group: dict[str, Any], grad_sq_norm: float | Tensor) -> Any:
        """``1/(1 + ρ‖g‖²)`` in ``"noise"`` mode (the batch's information and mean step)."""
        if self.rho_mode is RhoMode.NOISE and group["rho"] > 0.0:
            return 1.0 / (1.0 + group["rho"] * grad_sq_norm)
        return 1.0

    def _gr_damping(self, group: dict[str, Any], grad_sq_norm: float | Tensor) -> Any:
        """``ρ‖g‖²`` in ``"damping"`` mode (the GR curvature absorbed with the batch), else 0."""
        if self.rho_mode is RhoMode.DAMPING and group["rho"] > 0.0:
            return group["rho"] * grad_sq_norm
        return 0.0

    def _effective_damping(self, group: dict[str, Any], grad_sq_norm: float | Tensor) -> Any:
        """The product floor of this update, ``λ (+ ρ‖g‖²)``, times the failure boost."""
        return (group["damping"] + self._gr_damping(group, grad_sq_norm)) * self.damping_boost

    def _refresh(self, grad_sq_norm: Tensor) -> None:
        """Runs the filter update of every block measured this step.

        In two halves around the step's single read-back: :meth:`KalmanFactors.prepare` on the
        device for every block (its floor plan is read back with the step's flags), then
        :meth:`KalmanFactors.commit` with the host values. A result that is not sane keeps the
        last good state on the device; it is counted (and the damping raised) at the next
        read-back.
        """
        pending, self._pending = self._pending, {}
        group_of = {p: g for g in self.param_groups for p in g["params"]}
        plans: dict[str, tuple[KalmanFactors, dict[str, Any], list[float]]] = {}
        for key, meas in pending.items():
            block = self._blocks[key]
            group = group_of[block.weight]
            state = self._filters.get(key)
            if state is None:
                state = KalmanFactors(working_dtype(block.weight.dtype))
            plan = state.prepare(
                meas,
                information=self._information(meas) * self._noise_weight(group, grad_sq_norm),
                forgetting=self.forgetting,
                damping=group["damping"] * self.damping_boost,
                gr_damping=self._gr_damping(group, grad_sq_norm) * self.damping_boost,
                prior_count=self.prior_count,
                observation_noise=self.observation_noise,
            )
            values: list[float] = []
            for tensor in plan["readback"]:
                self._note(tensor, values.append)
            plans[key] = (state, plan, values)
        if not self._settle():
            return
        accepted, self._accepted = self._accepted, {}
        for key, (state, plan, values) in plans.items():
            if not accepted.get(key, False):
                continue  # non-finite statistics: rejected (counted at the read-back)
            ok = state.commit(plan, values, self.floor_tol)
            if state.ready:
                self._filters[key] = state
            self._note(ok, self._filter_outcome(state, plan))

    def _filter_outcome(self, state: KalmanFactors, plan: dict[str, Any]) -> Any:
        def book(ok: float) -> None:
            if not state.finish(plan, bool(ok)):
                # The last good filter was kept; make the next update better conditioned.
                self._raise_damping()

        return book

    # ------------------------------------------------------------------ the mean step
    def _precondition_block(
        self, key: str, block: KroneckerBlock, V: Tensor, group: dict[str, Any], grad_sq: Tensor
    ) -> Tensor | None:
        state = self._filters.get(key)
        if state is None or not state.ready:
            return None
        if not state.count > 0.0:
            return None
        # A non-finite gain gives a non-finite direction: the base falls back to the gradient.
        return state.precondition(V).mul_(self._noise_weight(group, grad_sq) / state.count)

    # ------------------------------------------------------------------ checkpoints
    def _block_state(self, key: str) -> dict[str, Any]:
        state = self._filters.get(key)
        return {} if state is None else state.state_dict()

    def _load_block_state(self, key: str, state: dict[str, Any]) -> None:
        block = self._blocks[key]
        if not state:
            self._filters.pop(key, None)
            return
        factors = KalmanFactors(working_dtype(block.weight.dtype))
        factors.load_state_dict(state, block.weight.device)
        self._check_factor_shapes(
            block,
            {"P_A": (factors.P_A, block.n_in), "P_G": (factors.P_G, block.n_out)},
            label="filter factor",
        )
        self._filters[key] = factors

    def _drop_block_state(self, key: str) -> None:
        self._filters.pop(key, None)

    def _curvature_store(self) -> dict[str, Any]:
        return self._filters

    def _reduce_statistics(self, capture: Any) -> None:
        self._shard.bind(self._blocks)
        self._shard.gather_kalman_statistics(self._blocks, capture.accumulators)
