"""Hyperparameter checks: every message names the optimizer, the value and the allowed range.

Python, numpy and one-element torch numbers are accepted (``np.float32(0.1)`` is a learning rate
like any other); the checked value is returned as a plain ``float`` / ``int``.
"""

from __future__ import annotations

import numbers
from enum import Enum
from typing import Any, TypeVar

from torch import Tensor

E = TypeVar("E", bound=Enum)


def _fail(owner: str, name: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"{owner}: invalid {name}={value!r}; allowed: {allowed}.")


def _as_number(value: Any, integral: bool = False) -> float | int | None:
    """``value`` as a Python number, or None when it is not a (real, non-bool) number."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        if value.dtype.is_floating_point and integral:
            return None
        value = value.item()
    if isinstance(value, bool):  # numpy's bool_ is no numbers.Real either
        return None
    kind = numbers.Integral if integral else numbers.Real
    if not isinstance(value, kind):
        return None
    return int(value) if integral else float(value)


def check_range(
    owner: str,
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Checks ``low <= value <= high`` (``<`` where open) and that value is a finite number."""
    lo = "-inf" if low is None else f"{low}"
    hi = "inf" if high is None else f"{high}"
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    allowed = f"{left}{lo}, {hi}{right}"
    number = _as_number(value)
    if number is None or number != number:
        raise _fail(owner, name, value, f"a number in {allowed}")
    if low is not None and (number < low or (low_open and number == low)):
        raise _fail(owner, name, value, allowed)
    if high is not None and (number > high or (high_open and number == high)):
        raise _fail(owner, name, value, allowed)
    if number in (float("inf"), float("-inf")):
        raise _fail(owner, name, value, f"a finite number in {allowed}")
    return float(number)


def check_int(owner: str, name: str, value: int, low: int = 1) -> int:
    number = _as_number(value, integral=True)
    if number is None or number < low:
        raise _fail(owner, name, value, f"an integer >= {low}")
    return int(number)


def check_choice(owner: str, name: str, value: str | E, enum: type[E]) -> E:
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in enum)
        raise _fail(owner, name, value, f"one of {choices}") from None
