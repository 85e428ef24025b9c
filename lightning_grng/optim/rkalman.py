"""RKalman: the Bayesian member of the family, a Kronecker-factored Kalman filter that never
inverts the Fisher."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from lightning_grng.curvature.block import KroneckerBlock
from lightning_grng.curvature.capture import LossReduction
from lightning_grng.curvature.inverse import working_dtype
from lightning_grng.curvature.kalman import (
    FilterPlan,
    KalmanAccumulator,
    KalmanFactors,
    Measurement,
    MeasurementMethod,
)
from lightning_grng.optim.arguments import documented, hyperparameters
from lightning_grng.optim.base import GROUP_RANGES, RHO_RANGE, GRNGOptimizer, ParamsT, StepGradients
from lightning_grng.optim.damping import RhoMode, kalman_gr
from lightning_grng.optim.validation import check_choice, check_int, check_range


@documented
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
    """

    group_ranges: ClassVar[dict[str, tuple[float, float | None, bool, bool]]] = {
        **GROUP_RANGES,
        **RHO_RANGE,
    }

    ARGUMENTS: ClassVar[dict[str, str]] = {
        "lr": "learning rate; 1 is the Kalman step (the Bayesian posterior mean update), "
        "typically 0.3-3.",
        "momentum": "heavy-ball momentum on the preconditioned update, in [0, 1).",
        "damping": "the floor lambda > 0 on the per-sample Fisher (A x G + lambda*I, split "
        "between the factors as in KFAC), absolute units; also sets the prior precision "
        "prior_count * lambda.",
        "rho": "gradient-regularization strength rho >= 0.",
        "rho_mode": "'damping' (rho |g|^2 is curvature absorbed with the batch) or 'noise' (it "
        "inflates the batch's observation noise).",
        "forgetting": "epsilon in (0, 1]: the predict step keeps epsilon of the information per "
        "filter update (memory 1/(1 - epsilon) updates); 1 is exact Bayesian updating.",
        "prior_count": "N0 > 0, the prior's weight in units of information (filter updates for "
        "a mean-reduced loss, samples for a sum-reduced one); the prior precision is "
        "N0 * lambda. None: the stationary count c/(1 - epsilon), which makes the filter KFAC's "
        "moving average from the first step; required when forgetting=1.",
        "observation_noise": "sigma^2 > 0 when the training loss is the Gaussian negative "
        "log-likelihood |y - y_hat|^2/(2 sigma^2) with known noise: then P_G = sigma^2 I is "
        "fixed and only P_A is filtered. None (default): P_G is filtered from the "
        "back-propagated errors.",
        "measurement": "'sketch' (k signed sums of rows per factor) or 'rows' (k rows drawn at "
        "random; all rows, exactly, when a pass has at most k).",
        "measurement_size": "k >= 1, measurement vectors per factor and pass.",
        "floor_tol": "bound on the relative over-application of each damping-floor increment "
        "by its truncated power series, in (0, 1).",
        "curvature_every": "run the filter (statistics and update) every this many steps.",
        "loss_reduction": "how the training loss reduces over samples, 'mean' or 'sum'; sets "
        "the unit of information (one update, or one sample).",
        "seed": "seed of the measurement draws (sketches, row samples), >= 0.",
        "fallback_lr": "the Adam fallback's lr as a multiple of the group's lr.",
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
        self._configure(params, hyperparameters(locals()))

    def _configure(self, params: ParamsT, hp: dict[str, Any]) -> None:
        name = type(self).__name__
        self.forgetting = check_range(name, "forgetting", hp.pop("forgetting"), 0.0, 1.0, True)
        prior_count = hp.pop("prior_count")
        if prior_count is not None:
            prior_count = check_range(name, "prior_count", prior_count, 0.0, low_open=True)
        elif self.forgetting == 1.0:
            raise ValueError(
                f"{name}: invalid prior_count=None with forgetting=1.0; allowed: a number in "
                "(0.0, inf) (without forgetting the prior's weight cannot default to the "
                "stationary count 1/(1 - forgetting))."
            )
        self.prior_count = prior_count
        noise = hp.pop("observation_noise")
        if noise is not None:
            noise = check_range(name, "observation_noise", noise, 0.0, low_open=True)
        self.observation_noise = noise
        self.rho_mode = check_choice(name, "rho_mode", hp.pop("rho_mode"), RhoMode)
        self.measurement = check_choice(
            name, "measurement", hp.pop("measurement"), MeasurementMethod
        )
        self.measurement_size = check_int(name, "measurement_size", hp.pop("measurement_size"))
        self.floor_tol = check_range(
            name, "floor_tol", hp.pop("floor_tol"), 0.0, 1.0, low_open=True, high_open=True
        )
        self.seed = check_int(name, "seed", hp.pop("seed"), low=0)
        rho = hp.pop("rho")
        super()._configure(params, hp)
        self._add_group_default("rho", self._check_group_value("rho", rho))
        self._filters: dict[str, KalmanFactors] = {}
        #: This step's measurements (absorbed after the read-back, if finite), and the plans
        #: of their filter updates between :meth:`_prepare` and :meth:`_commit`.
        self._pending: dict[str, Measurement] = {}
        self._accepted: dict[str, bool] = {}
        self._plans: dict[str, tuple[KalmanFactors, FilterPlan, list[float]]] = {}

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
                + 1_000_033 * (self._sharding.rank if self._sharding is not None else 0)
            ),
            need_g=self.observation_noise is None,
        )

    def refusal(self, block: KroneckerBlock) -> str | None:
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
        self._readback.flush()
        return sum(f.failures for f in self._filters.values())

    def _update_block(
        self, key: str, block: KroneckerBlock, accumulator: Any, grads: StepGradients
    ) -> Tensor:
        meas = accumulator.measurement(LossReduction(self.loss_reduction) is LossReduction.MEAN)
        finite = meas.finite_mask()
        # Absorbed after the step's read-back, and only if finite (see _commit).
        self._pending[key] = meas
        self._note(finite, lambda value: self._accepted.__setitem__(key, bool(value)))
        return finite

    def _information(self, meas: Measurement) -> float:
        """c: one unit per update for a mean-reduced loss, one per sample for a sum."""
        if LossReduction(self.loss_reduction) is LossReduction.SUM:
            return float(max(meas.samples, 1))
        return 1.0

    def _gr(self, group: dict[str, Any], grads: StepGradients) -> tuple[Any, Any]:
        """``(information weight, GR curvature)`` of this batch (``optim/damping.py``)."""
        return kalman_gr(group["rho"], self.rho_mode, grads.sq)

    def _reported_damping(self, group: dict[str, Any]) -> float | Tensor:
        """The product floor of the last update, ``(λ + ρ‖g‖²)·boost`` (absolute units)."""
        grad_sq = self._readback.grad_sq_host
        _, gr = kalman_gr(group["rho"], self.rho_mode, grad_sq if grad_sq == grad_sq else 0.0)
        return (group["damping"] + gr) * self.damping_boost

    def _prepare(self, grads: StepGradients) -> None:
        """The device half of every measured block's filter update
        (:meth:`KalmanFactors.prepare`); its plan's host values are read back with the step's.
        A result that is not sane keeps the last good state on the device; it is counted (and
        the damping raised) at the next read-back."""
        pending, self._pending = self._pending, {}
        group_of = {p: g for g in self.param_groups for p in g["params"]}
        self._plans = {}
        for key, meas in pending.items():
            block = self._blocks[key]
            group = group_of[block.weight]
            weight, gr_damping = self._gr(group, grads)
            state = self._filters.get(key)
            if state is None:
                state = KalmanFactors(working_dtype(block.weight.dtype))
            plan = state.prepare(
                meas,
                information=self._information(meas) * weight,
                forgetting=self.forgetting,
                damping=group["damping"] * self.damping_boost,
                gr_damping=gr_damping * self.damping_boost,
                prior_count=self.prior_count,
                observation_noise=self.observation_noise,
            )
            values: list[float] = []
            for tensor in plan.readback():
                self._note(tensor, values.append)
            self._plans[key] = (state, plan, values)

    def _commit(self, grads: StepGradients) -> None:
        """The host half: each finite measurement's update is applied with its plan's values."""
        plans, self._plans = self._plans, {}
        accepted, self._accepted = self._accepted, {}
        for key, (state, plan, values) in plans.items():
            if not accepted.get(key, False):
                continue  # non-finite statistics: rejected (counted at the read-back)
            ok = state.commit(plan, values, self.floor_tol)
            if state.ready:
                self._filters[key] = state
            self._note(ok, self._filter_outcome(state, plan))

    def _filter_outcome(self, state: KalmanFactors, plan: FilterPlan) -> Any:
        def book(ok: float) -> None:
            if not state.finish(plan, bool(ok)):
                # The last good filter was kept; make the next update better conditioned.
                self._raise_damping()

        return book

    # ------------------------------------------------------------------ the mean step
    def _precondition_block(
        self,
        key: str,
        block: KroneckerBlock,
        V: Tensor,
        group: dict[str, Any],
        grads: StepGradients,
    ) -> Tensor | None:
        state = self._filters.get(key)
        if state is None or not state.ready:
            return None
        if not state.count > 0.0:
            return None
        # A non-finite gain gives a non-finite direction: the base falls back to the gradient.
        weight, _ = self._gr(group, grads)
        return state.precondition(V).mul_(weight / state.count)

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
        self._sharding_bound().gather_kalman_statistics(self._blocks, capture.accumulators)
