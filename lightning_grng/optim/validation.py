"""Hyperparameter checks: every message names the optimizer, the value and the allowed range."""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

E = TypeVar("E", bound=Enum)


def _fail(owner: str, name: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"{owner}: invalid {name}={value!r}; allowed: {allowed}.")


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
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise _fail(owner, name, value, f"a number in {allowed}")
    if low is not None and (value < low or (low_open and value == low)):
        raise _fail(owner, name, value, allowed)
    if high is not None and (value > high or (high_open and value == high)):
        raise _fail(owner, name, value, allowed)
    if value in (float("inf"), float("-inf")):
        raise _fail(owner, name, value, f"a finite number in {allowed}")
    return float(value)


def check_int(owner: str, name: str, value: int, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(owner, name, value, f"an integer >= {low}")
    return value


def check_choice(owner: str, name: str, value: str | E, enum: type[E]) -> E:
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in enum)
        raise _fail(owner, name, value, f"one of {choices}") from None
