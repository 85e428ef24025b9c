"""Checkpoints of a GRNG optimizer: the torch state plus every block's curvature state.

``state_dict()`` adds a ``"grng"`` entry (factors or filters in their own dtypes, counters);
``load_state_dict()`` checks that the state belongs to this optimizer class and this model and,
if anything is refused, leaves the optimizer exactly as it was. Under DDP,
``consolidate_state_dict()`` gathers every block to rank 0 before saving; loading re-shards.
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

from lightning_grng.curvature.block import KroneckerBlock
from lightning_grng.optim.fallback import ADAM_STATE


class CheckpointMixin(Optimizer):
    """The checkpoint half of :class:`~lightning_grng.GRNGOptimizer`.

    Subclasses provide the per-block state: :meth:`_block_state`, :meth:`_load_block_state`,
    :meth:`_drop_block_state` and :meth:`_curvature_store`.
    """

    # Provided by GRNGOptimizer (attributes, and the methods _owns, _curvature_due and
    # _sharding_bound); declared here for readers.
    _blocks: dict[str, KroneckerBlock]
    _consolidated: dict[str, Any] | None
    _pending_state: Any
    _gate: Any
    attached: bool
    grng_step: int
    skipped_steps: int
    rejected_statistics: int
    damping_boost: float

    # ------------------------------------------------------------------ per-block state
    def _block_state(self, key: str) -> dict[str, Any]:
        raise NotImplementedError

    def _load_block_state(self, key: str, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _drop_block_state(self, key: str) -> None:
        """Forgets block ``key``'s curvature state (DDP: another rank owns it)."""
        raise NotImplementedError

    def _curvature_store(self) -> dict[str, Any]:
        """The dict of per-block curvature objects that loading replaces (never mutates)."""
        raise NotImplementedError

    def _check_factor_shapes(
        self,
        block: KroneckerBlock,
        factors: dict[str, Any],
        label: str = "factor",
        diagonal: tuple[str, ...] = (),
    ) -> None:
        """Refuses a checkpoint whose factor ``name -> (tensor, n)`` is not ``(groups, n, n)``
        (``(groups, n)`` for the names in ``diagonal``: factors stored as their diagonal)."""
        for name, (value, n) in factors.items():
            expected = (block.groups, n) if name in diagonal else (block.groups, n, n)
            if value is not None and tuple(value.shape) != expected:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: {label} {name} of module "
                    f"'{block.name}' has shape {tuple(value.shape)}, expected "
                    f"{expected}; the checkpoint belongs to another model."
                )

    # ------------------------------------------------------------------ save
    def state_dict(self) -> dict[str, Any]:
        """The torch state (momentum, param groups) plus a ``"grng"`` entry with all curvature
        state: factors and their inverse representations in their own dtypes, counters."""
        state = super().state_dict()
        consolidated, self._consolidated = self._consolidated, None
        if consolidated is not None:  # DDP, rank 0 after consolidate_state_dict()
            blocks = {
                key: {"module": b.name, **consolidated.get(key, {})}
                for key, b in self._blocks.items()
            }
        else:
            blocks = {
                key: {"module": b.name, **self._block_state(key)} for key, b in self._blocks.items()
            }
        state["grng"] = {
            "optimizer": type(self).__name__,
            "step": self.grng_step,
            "skipped_steps": self.skipped_steps,
            "damping_boost": self.damping_boost,
            "rejected_statistics": self.rejected_statistics,
            "blocks": blocks,
        }
        return state

    def consolidate_state_dict(self, to: int = 0) -> None:
        """DDP: gathers every block's curvature state from its owner to rank 0, so that rank 0's
        next :meth:`state_dict` holds all blocks (a collective: call it on every rank; Lightning's
        ``Strategy.optimizer_state`` does). A no-op in one process."""
        sharding = self._sharding_bound()
        if sharding is None:
            return
        if to != 0:
            raise ValueError(f"consolidate_state_dict(to={to}): only rank 0 is supported.")
        states = {key: self._block_state(key) for key in self._blocks}
        self._consolidated = sharding.gather_block_states(states)

    # ------------------------------------------------------------------ load
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state saved by the same optimizer class; curvature state is applied now if
        the hooks are attached, otherwise when :func:`lightning_grng.attach` is called."""
        name = type(self).__name__
        if not isinstance(state_dict, dict) or "grng" not in state_dict:
            raise ValueError(
                f"{name}.load_state_dict: this state has no 'grng' entry, so it was not saved by "
                "a lightning_grng optimizer (a checkpoint from another optimizer?)."
            )
        grng = state_dict["grng"]
        saved_by = grng.get("optimizer")
        if saved_by != name:
            raise ValueError(
                f"{name}.load_state_dict: the state was saved by {saved_by}, not {name}; "
                "resume with the same optimizer or start a fresh run."
            )
        rest = {k: v for k, v in state_dict.items() if k != "grng"}
        before = self._snapshot()
        try:
            super().load_state_dict(rest)
            if self.attached:
                self._load_grng_state(grng)
            else:
                self._pending_state = (grng, before)
            self._check_momentum_shapes()
        except Exception:
            # A refused state leaves the optimizer exactly as it was.
            self._restore(before)
            raise

    def _apply_pending_state(self, blocks: dict[str, KroneckerBlock]) -> None:
        """At attach: the state loaded before attaching is applied to ``blocks``; if it does
        not fit the model, the optimizer goes back to how it was before that load."""
        previous_blocks = self._blocks
        self._blocks = blocks
        if self._pending_state is None:
            return
        (pending, before), self._pending_state = self._pending_state, None
        try:
            self._load_grng_state(pending)
        except Exception:
            self._blocks = previous_blocks
            self._restore(before)
            raise

    def _snapshot(self) -> dict[str, Any]:
        """Everything :meth:`load_state_dict` may change, by reference (loading builds new
        objects, so the old ones stay intact)."""
        return dict(
            state=self.state,
            param_groups=self.param_groups,
            curvature=dict(self._curvature_store()),
            counters=(self.grng_step, self.skipped_steps, self.damping_boost),
            rejected=self.rejected_statistics,
            pending=self._pending_state,
            wanted=self._gate.wanted,
        )

    def _restore(self, snapshot: dict[str, Any]) -> None:
        self.state = snapshot["state"]
        self.param_groups = snapshot["param_groups"]
        store = self._curvature_store()
        store.clear()
        store.update(snapshot["curvature"])
        self.grng_step, self.skipped_steps, self.damping_boost = snapshot["counters"]
        self.rejected_statistics = snapshot["rejected"]
        self._pending_state = snapshot["pending"]
        self._gate.wanted = snapshot["wanted"]

    def _check_momentum_shapes(self) -> None:
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in enumerate(params):
            for key in ("momentum_buffer", *ADAM_STATE):
                buf = self.state.get(p, {}).get(key)
                if buf is not None and buf.shape != p.shape:
                    raise ValueError(
                        f"{type(self).__name__}.load_state_dict: the {key} of parameter {i} "
                        f"has shape {tuple(buf.shape)}, expected {tuple(p.shape)}; the "
                        "checkpoint belongs to another model."
                    )

    def _load_grng_state(self, grng: dict[str, Any]) -> None:
        name = type(self).__name__
        saved = grng["blocks"]
        if set(saved) != set(self._blocks):
            expected = sorted(b.name for b in self._blocks.values())
            got = sorted(s.get("module", k) for k, s in saved.items())
            raise ValueError(
                f"{name}.load_state_dict: the checkpoint has curvature blocks {got} but the "
                f"model has {expected}; the checkpoint belongs to a different model."
            )
        for key, block_state in saved.items():
            if self._owns(key):  # DDP: re-shard on this world size
                self._load_block_state(key, block_state)
            else:
                self._drop_block_state(key)
        self.grng_step = int(grng["step"])
        self.skipped_steps = int(grng["skipped_steps"])
        self.damping_boost = float(grng["damping_boost"])
        self.rejected_statistics = int(grng.get("rejected_statistics", 0))
        self._gate.wanted = self._curvature_due()
