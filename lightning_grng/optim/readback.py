"""The step's single host read-back, and the failure boost of the damping.

A step leaves its flags on the device (non-finite statistics, failed decompositions, filter
plans) and :class:`ReadBack` reads them all in ONE synchronisation (``torch.stack(...).tolist()``)
once the device work that produces them is queued. ``SyncCounter`` tests count it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

#: Upper bound of the damping boost (2^20: a run that keeps failing stays finite).
MAX_DAMPING_BOOST = 2.0**20

OnHost = Callable[[float], None]


def read_back(values: list[Tensor]) -> list[float]:
    """ONE host synchronisation for all 0-dim ``values`` (float64 on the host)."""
    if not values:
        return []
    device = values[0].device
    stacked = torch.stack(
        [t.detach().to(device=device, dtype=torch.float64).reshape(()) for t in values]
    )
    return stacked.tolist()


class ReadBack:
    """The ledger of one step: device values and what to do with each once it is on the host.

    :meth:`open` starts a step with its ‖g‖² (whose finiteness decides whether the step goes
    on); :meth:`note` registers more values; :meth:`settle` reads them back together. A value
    noted after the read-back (e.g. the outcome of a filter update that needed it) is read with
    the next step's, or by :meth:`flush`.
    """

    def __init__(self) -> None:
        self._ledger: list[tuple[Tensor, OnHost]] = []
        self._late: list[tuple[Tensor, OnHost]] = []
        self.settled = True
        #: The step's device flag (0-dim bool): its gradient is finite. Updates of curvature
        #: state are masked with it, so a skipped step leaves no trace.
        self.step_ok: Tensor | None = None
        #: Host values of the last read-back.
        self.step_ok_host = True
        self.grad_sq_host = 0.0

    def open(self, grad_sq: Tensor) -> None:
        self.step_ok = torch.isfinite(grad_sq)
        self._ledger = [(grad_sq, self._set_grad_sq)]
        self.settled = False

    def _set_grad_sq(self, value: float) -> None:
        self.grad_sq_host = value

    def note(self, value: Tensor, on_host: OnHost) -> None:
        """``on_host(value)`` runs when ``value`` is read back: with this step's read-back if
        it has not happened yet (and is dropped if the step is skipped), else with the next."""
        (self._late if self.settled else self._ledger).append((value, on_host))

    def settle(self) -> tuple[list[tuple[OnHost, float]], list[tuple[OnHost, float]]]:
        """Reads back the late values of the last step and this step's: ``(late, current)``
        pairs of callback and host value; ``current[0]`` is ‖g‖²'s (already applied)."""
        late, self._late = self._late, []
        current, self._ledger = self._ledger, []
        values = read_back([t for t, _ in late + current])
        self.settled = True
        pairs = [(on_host, v) for (_, on_host), v in zip(late + current, values, strict=True)]
        late_pairs, current_pairs = pairs[: len(late)], pairs[len(late) :]
        on_grad_sq, grad_sq = current_pairs[0]
        on_grad_sq(grad_sq)
        return late_pairs, current_pairs

    def flush(self) -> None:
        """Reads back the values noted after the last step's read-back (outside ``step()``)."""
        if self.settled and self._late:
            late, self._late = self._late, []
            for (_, on_host), value in zip(late, read_back([t for t, _ in late]), strict=True):
                on_host(value)


class DampingBoost:
    """A factor on the damping after failures: doubled by each failure, halved by each good
    step, at most :data:`MAX_DAMPING_BOOST`. A skipped step restores the value it started
    with, then doubles it. Under DDP, ranks agree on the total of the step's doublings."""

    def __init__(self) -> None:
        self.value = 1.0
        self._before = 1.0  # the value before this step's relaxation
        self._at_start = 1.0  # the value after it
        self.doublings = 0  # failures counted in this step

    def begin_step(self) -> None:
        self._before = self.value
        self.value = max(1.0, self.value * 0.5)
        self._at_start = self.value
        self.doublings = 0

    def double(self) -> None:
        self.value = min(self.value * 2.0, MAX_DAMPING_BOOST)
        self.doublings += 1

    def carry_late(self, doublings_before: int) -> None:
        """Late failures of the previous step (read back now) also raise the value a skipped
        step restores."""
        late = self.doublings - doublings_before
        self._before = min(self._before * 2.0**late, MAX_DAMPING_BOOST)

    def restore(self) -> None:
        """The step is skipped: no relaxation."""
        self.value = self._before

    def agree(self, total_doublings: int) -> None:
        """DDP: the value every rank holds after the step's failures on all ranks."""
        self.value = min(self._at_start * 2.0**total_doublings, MAX_DAMPING_BOOST)

    def take_doublings(self) -> int:
        doublings, self.doublings = self.doublings, 0
        return doublings
