"""Per-row values and which prompts may share a batch: one set of rules for the
engine's slots and the CLI's static batches.

A batch (or an engine's slots) runs one compiled program. Prompts may share it
when everything the program reads is equal: every option except the per-row
values (temperature, top_p, penalties, ...), the seed and the output constraint,
and which processors are present (the chain's tree structure). Per-row values
travel as `[rows]` arrays, packed by `row_values` in float64 so that a derived
value (top-p's cutoff `1 - p`) rounds exactly as it does for a scalar `p`: a
prompt's tokens never depend on the batch around it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxdecode.config import (
    CONSTRAINT_FIELDS,
    LENGTH_FIELDS,
    PER_PROMPT_FIELDS,
    PER_ROW_FIELDS,
    ROW_DTYPES,
    GenerationConfig,
)
from jaxdecode.processors import from_config

__all__ = [
    "per_prompt_fields",
    "unconstrained",
    "group_key",
    "arrayed_fields",
    "row_values",
]


def per_prompt_fields(*, lengths_per_row: bool) -> frozenset[str]:
    """The fields prompts of one batch may set differently (the option table's
    `varies`): the per-row values, the seed, the output constraint and, with
    `lengths_per_row` (each engine slot has its own length; a static batch shares
    one), the lengths."""
    fields = set(PER_PROMPT_FIELDS)
    return frozenset(fields | set(LENGTH_FIELDS) if lengths_per_row else fields)


def unconstrained(config: GenerationConfig) -> GenerationConfig:
    """`config` without its output constraint (`regex` / `json_schema` / `choices`):
    rows of different constraints share one automaton table."""
    return config.replace(**dict.fromkeys(CONSTRAINT_FIELDS))


@functools.lru_cache(maxsize=4096)
def _structure(config: GenerationConfig) -> Any:
    return jax.tree_util.tree_structure(from_config(config))


def group_key(config: GenerationConfig, *, lengths_per_row: bool) -> tuple:
    """What prompts must have in common to share one program.

    Args:
        config: a prompt's resolved config (scalar per-row values).
        lengths_per_row: True for the engine (each slot has its own
            `max_new_tokens`), False for a static batch (one length for all).

    Returns:
        A hashable key: the fixed fields' values and the processor chain's tree
        structure (which processors are present).
    """
    per_prompt = per_prompt_fields(lengths_per_row=lengths_per_row)
    fixed = tuple(
        (f.name, getattr(config, f.name))
        for f in dataclasses.fields(config)
        if f.name not in per_prompt
    )
    lengths = dict.fromkeys(LENGTH_FIELDS) if lengths_per_row else {}
    return fixed, _structure(unconstrained(config).replace(seed=None, **lengths))


def arrayed_fields(config: GenerationConfig, rows: int) -> tuple[str, ...]:
    """The per-row fields that can be `[rows]` arrays without changing which
    processors are present (an absent processor's neutral value stays a scalar,
    part of `group_key`)."""
    config = unconstrained(config)
    base = jax.tree_util.tree_structure(from_config(config))
    out = []
    for name in PER_ROW_FIELDS:
        value = getattr(config, name)
        if value is None:
            continue
        try:  # an array makes a processor present: it may refuse a neutral value
            arrayed = config.replace(**{name: np.full(rows, value)})
            arrayed.validate()
            trial = from_config(arrayed)
        except ValueError:
            continue
        if jax.tree_util.tree_structure(trial) == base:
            out.append(name)
    return tuple(out)


def row_values(configs: Sequence[GenerationConfig], arrayed: Sequence[str]) -> dict[str, Any]:
    """`{field: [rows] array}` of the configs' per-row values, in the field's
    `ROW_DTYPES` entry: int32 for integer values (`top_k`, `prompt_ignore_length`),
    float64 for the rest (so that a top-p cutoff `1 - p` is rounded from the same
    float64 as for a scalar p; the processors store float32)."""
    return {
        name: np.asarray([getattr(c, name) for c in configs], ROW_DTYPES[name]) for name in arrayed
    }
