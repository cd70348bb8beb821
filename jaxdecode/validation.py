"""Validation shared by the config and the processors: runs on concrete values
before anything is traced, and names the offending parameter, its value and the
allowed range in a `ValueError`."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

__all__ = ["is_concrete", "check_range", "static_int", "eos_ids", "parse_sequences"]


def is_concrete(value: Any) -> bool:
    return not isinstance(value, jax.core.Tracer)


def check_range(
    name: str,
    value: Any,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    integer: bool = False,
) -> None:
    """Raises ValueError naming `name` when a concrete `value` leaves the range."""
    if not is_concrete(value):
        return  # traced inside a user's jit: validated by whoever made it concrete
    arr = np.asarray(value)
    if arr.ndim > 1:
        raise ValueError(
            f"{name} must be a scalar or one value per row [batch], got shape {arr.shape}"
        )
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if integer and not np.all(np.equal(np.mod(arr, 1), 0)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    bad = ~np.isfinite(arr.astype(np.float64))
    if lo is not None:
        bad |= (arr <= lo) if lo_open else (arr < lo)
    if hi is not None:
        bad |= (arr >= hi) if hi_open else (arr > hi)
    if np.any(bad):
        left = "-inf" if lo is None else f"{lo}"
        right = "inf" if hi is None else f"{hi}"
        opening = "(" if lo_open or lo is None else "["
        closing = ")" if hi_open or hi is None else "]"
        raise ValueError(f"{name} must be in {opening}{left}, {right}{closing}, got {value!r}")


def static_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def eos_ids(value: Any, name: str = "eos_token_id") -> tuple[int, ...]:
    """Normalises an int / list / None EOS setting to a tuple of ints."""
    if value is None:
        return ()
    arr = np.asarray(value).reshape(-1)
    if arr.size == 0 or not np.issubdtype(arr.dtype, np.integer) or np.any(arr < 0):
        raise ValueError(
            f"{name} must be a token id or a non-empty list of them (ints >= 0), got {value!r}"
        )
    return tuple(int(t) for t in arr)


def parse_sequences(name: str, entries: Any) -> list[tuple[tuple[int, ...], float]]:
    """Accepts transformers' forms: `{(ids...): bias}` or `[[[ids...], bias], ...]`."""
    if isinstance(entries, dict):
        items = list(entries.items())
    elif isinstance(entries, (list, tuple)):
        items = []
        for e in entries:
            if not (isinstance(e, (list, tuple)) and len(e) == 2):
                raise ValueError(f"{name} entries must be [token_ids, bias] pairs, got {e!r}")
            items.append((e[0], e[1]))
    else:
        raise ValueError(f"{name} must be a dict or a list of [token_ids, bias], got {entries!r}")
    if not items:
        raise ValueError(f"{name} must not be empty, got {entries!r}")
    out = []
    for ids, bias in items:
        ids = tuple(ids) if isinstance(ids, (list, tuple)) else (ids,)
        if not ids or not all(
            isinstance(t, (int, np.integer)) and not isinstance(t, bool) and t >= 0 for t in ids
        ):
            raise ValueError(
                f"{name} keys must be non-empty token id sequences (ints >= 0), got {ids!r}"
            )
        if isinstance(bias, bool) or not isinstance(bias, (int, float, np.floating, np.integer)):
            raise ValueError(f"{name} biases must be numbers, got {bias!r} for {ids!r}")
        if math.isnan(float(bias)):
            raise ValueError(f"{name} biases must not be NaN (entry {ids!r})")
        out.append((tuple(int(t) for t in ids), float(bias)))
    return out
