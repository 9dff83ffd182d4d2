"""Parameter checks made at the door, before any table is touched.

Each raises :class:`ParameterError` (a ValueError) naming the parameter, the
allowed range and the value received.
"""

from __future__ import annotations

import numbers
import re


class ParameterError(ValueError):
    """A parameter outside its allowed range or set."""


class UnknownImage(ParameterError):
    """An image id that is not in the images table."""


def distance(name: str, value) -> float:
    """A cosine distance: a number from 0 to 2."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ParameterError(f"{name} must be a number from 0 to 2; got {value!r}") from None
    if not 0.0 <= value <= 2.0:
        raise ParameterError(f"{name} must be from 0 to 2; got {value}")
    return value


def ratio(name: str, value) -> float:
    """A number strictly between 0 and 1."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ParameterError(f"{name} must be a number in (0, 1); got {value!r}") from None
    if not 0.0 < value < 1.0:
        raise ParameterError(f"{name} must be in (0, 1); got {value}")
    return value


def between(name: str, value, low: float, high: float, low_included: bool = True) -> float:
    """A finite number from ``low`` (or above it, when not ``low_included``) to ``high``."""
    shown = f"{'from' if low_included else 'above'} {low:g} to {high:g}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ParameterError(f"{name} must be a number {shown}; got {value!r}")
    value = float(value)
    if not (low <= value if low_included else low < value) or not value <= high:
        raise ParameterError(f"{name} must be {shown}; got {value}")
    return value


def count(name: str, value, minimum: int = 0) -> int:
    """A whole number not below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ParameterError(f"{name} must be a whole number >= {minimum}; got {value!r}")
    if int(value) < minimum:
        raise ParameterError(f"{name} must be >= {minimum}; got {value}")
    return int(value)


MAX_SEED = 2**31 - 1  # what every store (PostgreSQL int4) and scikit-learn can keep


def seed(name: str, value) -> int:
    """A whole number from 0 to 2**31 - 1, as a plain int."""
    value = count(name, value, 0)
    if value > MAX_SEED:
        raise ParameterError(f"{name} must be <= {MAX_SEED}; got {value}")
    return value


def choice(name: str, value, allowed) -> str:
    """One of ``allowed``."""
    if value not in allowed:
        raise ParameterError(
            f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")
    return value


def ks(name: str, values) -> list[int]:
    """A non-empty list of at most 50 distinct whole numbers from 1 to 1000, sorted."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ParameterError(f"{name} must be a list of whole numbers; got {values!r}")
    values = sorted({count(name, v, 1) for v in values})
    if not values:
        raise ParameterError(f"{name} must name at least one k")
    if len(values) > 50 or values[-1] > 1000:
        raise ParameterError(f"{name} must be at most 50 values from 1 to 1000; got "
                             f"{len(values)} up to {values[-1]}")
    return values


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def identifier(name: str, value) -> str:
    """A plain SQL identifier (letters, digits, underscores; at most 63 characters)."""
    if not isinstance(value, str) or not _IDENTIFIER.match(value):
        raise ParameterError(
            f"{name} must be a plain identifier (letters, digits, _; at most 63); got {value!r}")
    return value
