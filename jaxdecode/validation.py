"""Validation shared by the config and the processors: runs on concrete values
before anything is traced, and names the offending parameter, its value and the
allowed range in a `ConfigError` (a `ValueError`)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxdecode.errors import ConfigError

__all__ = [
    "Int",
    "Real",
    "Flag",
    "OneOf",
    "Token",
    "Tokens",
    "TokenLists",
    "BiasTable",
    "Strings",
    "DecayPenalty",
    "Joint",
    "is_concrete",
    "check_range",
    "static_int",
    "host_rows",
    "eos_ids",
    "parse_sequences",
    "normalize_schema",
    "parse_constraints",
]


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
    """Raises ConfigError naming `name` when a concrete `value` leaves the range."""
    if not is_concrete(value):
        return  # traced inside a user's jit: validated by whoever made it concrete
    arr = np.asarray(value)
    if arr.ndim > 1:
        raise ConfigError(
            f"{name} must be a scalar or one value per row [batch], got shape {arr.shape}"
        )
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if integer and not np.all(np.equal(np.mod(arr, 1), 0)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
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
        raise ConfigError(f"{name} must be in {opening}{left}, {right}{closing}, got {value!r}")


def static_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ConfigError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def host_rows(name: str, value: Any) -> np.ndarray:
    """A host copy of a `[batch, length]` table given as an array or as rows.

    Rows of different lengths (a list of unpadded prompts) are refused with the
    lengths named and what to do, instead of NumPy's "inhomogeneous shape".
    """
    if isinstance(value, (list, tuple)) and value:
        lengths = [len(r) if isinstance(r, (list, tuple, np.ndarray)) else None for r in value]
        if None not in lengths and len(set(lengths)) > 1:
            shown = ", ".join(map(str, lengths[:8])) + (", ..." if len(lengths) > 8 else "")
            raise ValueError(
                f"{name} rows have different lengths ({shown}); left-pad them to one length "
                f"({max(lengths)}) with the pad token and pass attention_mask (1 on the real "
                "tokens, 0 on the padding)"
            )
    return np.array(value, copy=True)


def eos_ids(value: Any, name: str = "eos_token_id") -> tuple[int, ...]:
    """Normalises an int / list / None EOS setting to a tuple of ints."""
    if value is None:
        return ()
    arr = np.asarray(value).reshape(-1)
    if arr.size == 0 or not np.issubdtype(arr.dtype, np.integer) or np.any(arr < 0):
        raise ConfigError(
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
                raise ConfigError(f"{name} entries must be [token_ids, bias] pairs, got {e!r}")
            items.append((e[0], e[1]))
    else:
        raise ConfigError(f"{name} must be a dict or a list of [token_ids, bias], got {entries!r}")
    if not items:
        raise ConfigError(f"{name} must not be empty, got {entries!r}")
    out = []
    for ids, bias in items:
        ids = tuple(ids) if isinstance(ids, (list, tuple)) else (ids,)
        if not ids or not all(
            isinstance(t, (int, np.integer)) and not isinstance(t, bool) and t >= 0 for t in ids
        ):
            raise ConfigError(
                f"{name} keys must be non-empty token id sequences (ints >= 0), got {ids!r}"
            )
        if isinstance(bias, bool) or not isinstance(bias, (int, float, np.floating, np.integer)):
            raise ConfigError(f"{name} biases must be numbers, got {bias!r} for {ids!r}")
        if math.isnan(float(bias)):
            raise ConfigError(f"{name} biases must not be NaN (entry {ids!r})")
        out.append((tuple(int(t) for t in ids), float(bias)))
    return out


def normalize_schema(schema: Any) -> str:
    """A JSON schema (a dict, or its JSON text) as compact JSON text. Key order is
    kept: it sets the order of the properties in the output.

    Raises:
        ConfigError: not JSON, or not a JSON object.
    """
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ConfigError(f"json_schema is not valid JSON ({e}): {schema[:80]!r}") from None
    if not isinstance(schema, Mapping):
        raise ConfigError(
            f"json_schema must be a JSON object (a dict or its JSON text), got {schema!r}"
        )
    try:
        return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"json_schema must hold JSON values only: {e}") from None


def _one_constraint(name: str, value: Any) -> tuple[str, Any]:
    """`(name, value)` checked without a tokenizer (the regex itself is checked
    when it is compiled)."""
    if name == "regex":
        if not isinstance(value, str) or not value:
            raise ConfigError(f"regex must be a non-empty string, got {value!r}")
        return name, value
    if name == "json_schema":
        # Checked now (every keyword enforced, or refused naming it), before any
        # model is loaded or traced; imported here: processors import this module.
        from jaxdecode.processors.schema import prepare_schema

        text = normalize_schema(value)
        prepare_schema(text)
        return name, text
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise ConfigError(f"choices must be a non-empty list of strings, got {value!r}")
    bad = next((i for i, c in enumerate(value) if not isinstance(c, str)), None)
    if bad is not None:
        raise ConfigError(
            f"choices must be a non-empty list of strings; choices[{bad}] is "
            f"{value[bad]!r} ({type(value[bad]).__name__})"
        )
    return name, tuple(value)


def _is_per_row(name: str, value: Any) -> bool:
    """A list of constraints, one per row (vs one constraint for every row)."""
    if name == "regex":
        return not isinstance(value, str)
    if name == "json_schema":
        return not isinstance(value, (str, Mapping))
    # choices: a list of strings is one constraint; a list of lists (or None) is per row.
    # A list with other entries (["a", 5]) is one constraint with a bad entry.
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and any(c is None or (isinstance(c, Sequence) and not isinstance(c, str)) for c in value)
    )


def parse_constraints(
    fields: Mapping[str, Any],
) -> tuple[bool, list[tuple[str, Any] | None]] | None:
    """The output constraint of a config's `regex` / `json_schema` / `choices`.

    Either one field holds one constraint for every row, or the fields hold
    per-row lists of equal length (one entry per prompt row, None for an
    unconstrained row) with at most one constraint per row.

    Returns:
        None (no constraint), else `(per_row, specs)`: `specs` are `(field,
        value)` pairs (or None), one for all rows, or one per row.

    Raises:
        ConfigError: naming the field and what is wrong.
    """
    given = {k: v for k, v in fields.items() if v is not None}
    if not given:
        return None
    per_row = {k: _is_per_row(k, v) for k, v in given.items()}
    if not any(per_row.values()):
        if len(given) > 1:
            raise ConfigError(
                f"set one of regex, json_schema, choices, got {' and '.join(sorted(given))} "
                "(per-row lists may mix them, one per row)"
            )
        ((name, value),) = given.items()
        return False, [_one_constraint(name, value)]
    if not all(per_row.values()):
        raise ConfigError(
            f"{', '.join(sorted(given))}: a per-row list cannot be combined with one constraint "
            "for every row"
        )
    lengths = {k: len(v) for k, v in given.items()}
    if len(set(lengths.values())) != 1:
        raise ConfigError(f"per-row constraint lists must have equal lengths, got {lengths}")
    specs: list[tuple[str, Any] | None] = []
    for row in range(next(iter(lengths.values()))):
        here = {k: v[row] for k, v in given.items() if v[row] is not None}
        if len(here) > 1:
            raise ConfigError(f"row {row} has {' and '.join(sorted(here))}: at most one per row")
        try:
            specs.append(_one_constraint(*next(iter(here.items()))) if here else None)
        except ValueError as e:
            raise ConfigError(f"row {row}: {e}") from None
    if all(s is None for s in specs):
        return None
    return True, specs


# --------------------------------------------------------------------------- #
# Rules of single fields: the `check` of an entry of the option table
# (jaxdecode.fields). Each is called as `rule(name, value, vocab_size)` on a field
# that is set, and raises ConfigError naming the field, its value and what is allowed.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Int:
    """A Python or NumPy integer (not a bool) in `[lo, hi]`; with `top_n`, also at
    most the vocabulary size (a number of alternatives)."""

    lo: int
    hi: int | None = None
    top_n: bool = False

    def __call__(self, name: str, value: Any, vocab_size: int | None) -> None:
        integer = not isinstance(value, bool) and isinstance(value, (int, np.integer))
        if self.hi is not None:
            if not integer or not self.lo <= value <= self.hi:
                raise ConfigError(
                    f"{name} must be an integer in [{self.lo}, {self.hi}], got {value!r}"
                )
            return
        static_int(name, value, self.lo)
        if self.top_n and vocab_size is not None and value > vocab_size:
            raise ConfigError(f"{name} must be <= the vocabulary size {vocab_size}, got {value}")


@dataclasses.dataclass(frozen=True)
class Real:
    """A number, or one per row `[batch]`, in a range (`check_range`); `scalar`:
    one number only."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    scalar: bool = False

    def __call__(self, name: str, value: Any, vocab_size: int | None) -> None:
        if self.scalar and np.ndim(value) != 0:
            raise ConfigError(f"{name} must be a scalar, got {value!r}")
        check_range(
            name,
            value,
            lo=self.lo,
            hi=self.hi,
            lo_open=self.lo_open,
            hi_open=self.hi_open,
            integer=self.integer,
        )


@dataclasses.dataclass(frozen=True)
class Flag:
    """True or False."""

    def __call__(self, name: str, value: Any, vocab_size: int | None) -> None:
        if not isinstance(value, (bool, np.bool_)):
            raise ConfigError(f"{name} must be True or False, got {value!r}")


@dataclasses.dataclass(frozen=True)
class OneOf:
    """One of `values`; empty: the values of the field's `Literal[...]` type (filled
    in by `GenerationConfig`'s table)."""

    values: tuple[Any, ...] = ()

    def __call__(self, name: str, value: Any, vocab_size: int | None) -> None:
        if value not in self.values:
            allowed = [repr(v) if isinstance(v, str) else str(v) for v in self.values]
            raise ConfigError(
                f"{name} must be {', '.join(allowed[:-1])} or {allowed[-1]}, got {value!r}"
            )


def _check_ids(name: str, ids: Any, vocab_size: int | None) -> None:
    """Token ids: integers >= 0, and < `vocab_size` when given; one id or a flat list."""
    if isinstance(ids, (list, tuple)) and any(isinstance(t, (list, tuple)) for t in ids):
        raise ConfigError(f"{name} must be a token id or a flat list of them, got {ids!r}")
    for t in np.asarray(ids, dtype=object).reshape(-1):
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0:
            raise ConfigError(f"{name} must hold token ids (integers >= 0), got {ids!r}")
        if vocab_size is not None and t >= vocab_size:
            raise ConfigError(
                f"{name} contains {int(t)}, outside the vocabulary [0, {vocab_size - 1}]"
            )


@dataclasses.dataclass(frozen=True)
class Token:
    """One token id."""

    def __call__(self, name: str, value: Any, vocab_size: int | None) -> None:
        if isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a single token id, got {value!r}")
        _check_ids(name, value, vocab_size)


@dataclasses.dataclass(frozen=True)
class Tokens:
    """One token id or a non-empty flat list of them."""

    def __call__(self, name: str, value: Any, vocab_size: int | None) -> None:
        if isinstance(value, (list, tuple)) and not value:
            raise ConfigError(f"{name} must not be an empty list")
        _check_ids(name, value, vocab_size)


@dataclasses.dataclass(frozen=True)
class TokenLists:
    """A non-empty list of non-empty token-id lists (`bad_words_ids`)."""

    def __call__(self, name: str, value: Any, vocab_size: int | None) -> None:
        for word in value if isinstance(value, (list, tuple)) and value else [None]:
            if not isinstance(word, (list, tuple)):
                raise ConfigError(f"{name} must be a list of token id lists, got {value!r}")
            if not word:
                raise ConfigError(f"{name} must be non-empty token id lists, got {value!r}")
            _check_ids(name, list(word), vocab_size)


@dataclasses.dataclass(frozen=True)
class BiasTable:
    """transformers' `sequence_bias` forms (see `parse_sequences`)."""

    def __call__(self, name: str, value: Any, vocab_size: int | None) -> None:
        for ids, _ in parse_sequences(name, value):
            _check_ids(name, list(ids), vocab_size)


@dataclasses.dataclass(frozen=True)
class Strings:
    """A non-empty string or a non-empty list of them."""

    def __call__(self, name: str, value: Any, vocab_size: int | None) -> None:
        strings = [value] if isinstance(value, str) else value
        if (
            not isinstance(strings, (list, tuple))
            or not strings
            or any(not isinstance(x, str) or not x for x in strings)
        ):
            raise ConfigError(
                f"{name} must be a string or a non-empty list of non-empty strings, got {value!r}"
            )


@dataclasses.dataclass(frozen=True)
class DecayPenalty:
    """A `(start_index >= 0, decay_factor >= 1)` pair."""

    def __call__(self, name: str, value: Any, vocab_size: int | None) -> None:
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise ConfigError(f"{name} must be a (start_index, decay_factor) pair, got {value!r}")
        check_range(f"{name}[0] (start_index)", value[0], lo=0, integer=True)
        check_range(f"{name}[1] (decay_factor)", value[1], lo=1.0)


@dataclasses.dataclass(frozen=True)
class Joint:
    """Checked together with other fields by `check` (a function of the whole
    config, e.g. the output constraints, at most one per row), or by the object's
    own `validate`; `what` says which, for the table's readers."""

    what: str
    check: Any = None  # (value) -> None, run on the field's value when given

    def __call__(self, name: str, value: Any, vocab_size: int | None) -> None:
        if self.check is not None:
            self.check(value)
