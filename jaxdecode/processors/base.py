"""The processor protocol, `chain`, and the validation every factory shares.

A processor is a frozen dataclass pytree, like an optax transform: numeric
hyper-parameters are *leaves* (a scalar or one value per row `[batch]`), so a
jitted function that takes a processor does not recompile when a value changes;
fields that set a shape or choose code are static. Three pure functions:

    init(ctx) -> state                         per-row memory, built from the history
    __call__(logits [B, V], ctx, state) -> logits
    update(state, tokens [B]) -> state         after each chosen token

Stateless processors keep the defaults (`()` state, `update` returns it). The
decoding loops call `init` once after the prompt and `update` once per token,
so a tally is never recomputed from the whole history; beam search reorders
every state by parent beam with one `tree_map` gather (states have the batch on
axis 0). Called without a state (`p(logits, ctx)`), a processor builds it from
`ctx` with `init`, so a processor also works as a plain function of the history.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxdecode import pytree, sampling
from jaxdecode.arrays import owned
from jaxdecode.context import DecodeContext
from jaxdecode.validation import check_range, is_concrete

Array = jax.Array

__all__ = [
    "LogitsProcessor",
    "Chain",
    "chain",
    "check_rows",
    "expand_rows",
    "stage_names",
    "processor_stages",
    "float_leaf",
    "int_leaf",
    "token_id_leaf",
    "row",
    "divide",
    "vocab_mask",
    "NEG_INF",
]

NEG_INF = -jnp.inf


def float_leaf(name: str, value: Any, **bounds: Any) -> Array:
    """A validated float32 leaf (scalar or `[batch]`), copied from host memory."""
    check_range(name, value, **bounds)
    return owned(value, jnp.float32)


def int_leaf(name: str, value: Any, **bounds: Any) -> Array:
    """A validated int32 leaf (scalar or `[batch]`), copied from host memory."""
    check_range(name, value, integer=True, **bounds)
    return owned(value, jnp.int32)


def token_id_leaf(name: str, ids: Any, *, allow_empty: bool = False) -> Array:
    """A 1-D int32 array of token ids (validated non-negative integers)."""
    if isinstance(ids, (int, np.integer)):
        ids = [int(ids)]
    if not is_concrete(ids):
        return jnp.asarray(ids, jnp.int32).reshape(-1)
    arr = np.array(list(ids) if not isinstance(ids, np.ndarray) else ids, copy=True)
    if arr.size == 0 and not allow_empty:
        raise ValueError(f"{name} must be a non-empty list of token ids, got {ids!r}")
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.ndim != 1 or np.any(arr < 0)):
        raise ValueError(f"{name} must be a list of token ids (integers >= 0), got {ids!r}")
    return jnp.asarray(arr.reshape(-1).astype(np.int32))


# --------------------------------------------------------------------------- #
# Small pieces the processors share.
# --------------------------------------------------------------------------- #


def row(value: Array, dtype: Any = jnp.float32) -> Array:
    """`[]` stays `[]`, `[batch]` becomes `[batch, 1]` to broadcast over the vocabulary."""
    return sampling.per_row(jnp.asarray(value, dtype))


def divide(x: Array, divisor: Array) -> Array:
    """`x / divisor` rounded as a true division.

    XLA rewrites `x / broadcast(d)` into `x * (1 / d)`, which differs from
    transformers' division in the last bit for ~10% of entries; the barrier keeps
    the divisor opaque so the division stays a division.
    """
    return x / jax.lax.optimization_barrier(jnp.broadcast_to(divisor, x.shape))


def vocab_mask(ids: Array, vocab: int) -> Array:
    """`[vocab]` bool, True at `ids` (ids outside the vocabulary are ignored)."""
    return jnp.zeros((vocab,), bool).at[ids].set(True, mode="drop")


# --------------------------------------------------------------------------- #
# The protocol and composition.
# --------------------------------------------------------------------------- #


class LogitsProcessor:
    """Base of all processors. Subclasses implement `apply`; stateful ones also
    `init` and `update`.

    State is a pytree whose leaves have the batch on axis 0 (so beam search can
    reorder it by parent beam), or `()`.

    `row_fields` names the fields that may hold one value per row (`[batch]`),
    with the config name each one comes from, so the front door can check their
    length and repeat them for beams and returned sequences.
    """

    row_fields: ClassVar[dict[str, str]] = {}

    def init(self, ctx: DecodeContext) -> Any:
        """The state for the history in `ctx` (default: no state)."""
        del ctx
        return ()

    def update(self, state: Any, tokens: Array) -> Any:
        """The state after each row appended `tokens: [batch]` (default: unchanged)."""
        del tokens
        return state

    def apply(self, logits: Array, ctx: DecodeContext, state: Any) -> Array:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} must implement apply()")

    def __call__(self, logits: Array, ctx: DecodeContext, state: Any = None) -> Array:
        """`logits: [batch, vocab]` -> processed logits; `state` defaults to `init(ctx)`."""
        if state is None:
            state = self.init(ctx)
        return self.apply(logits, ctx, state)


@pytree.dataclass
class Chain(LogitsProcessor):
    """Applies processors left to right; its state is the tuple of theirs.
    Build it with `chain(...)`."""

    processors: tuple[LogitsProcessor, ...] = ()

    def init(self, ctx: DecodeContext) -> tuple[Any, ...]:
        return tuple(p.init(ctx) for p in self.processors)

    def update(self, state: tuple[Any, ...], tokens: Array) -> tuple[Any, ...]:
        return tuple(p.update(s, tokens) for p, s in zip(self.processors, state, strict=True))

    def apply(self, logits: Array, ctx: DecodeContext, state: tuple[Any, ...]) -> Array:
        for p, s in zip(self.processors, state, strict=True):
            logits = p.apply(logits, ctx, s)
        return logits

    def stages(self, logits: Array, ctx: DecodeContext, state: Any = None) -> list[Array]:
        """The scores after each processor, in order (the last is `__call__`'s).

        What `jaxdecode.trace` records; the same calls as `__call__`.
        """
        state = self.init(ctx) if state is None else state
        out = []
        for p, s in zip(self.processors, state, strict=True):
            logits = p.apply(logits, ctx, s)
            out.append(logits)
        return out


def _members(processor: LogitsProcessor) -> tuple[LogitsProcessor, ...]:
    return processor.processors if isinstance(processor, Chain) else (processor,)


def check_rows(processor: LogitsProcessor, batch: int) -> None:
    """ValueError naming the field when a per-row value's length is not `batch`."""
    for p in _members(processor):
        for field, name in p.row_fields.items():
            value = getattr(p, field)
            if is_concrete(value) and np.ndim(value) == 1 and np.shape(value)[0] != batch:
                raise ValueError(
                    f"{name} has {np.shape(value)[0]} values; a per-row {name} needs one "
                    f"value per prompt row, {batch} here"
                )


def expand_rows(processor: LogitsProcessor, expand: int) -> LogitsProcessor:
    """Repeats every per-row value `expand` times (`[B] -> [B * expand]`), for the
    rows that beams or returned sequences add."""
    if expand == 1:
        return processor

    def expanded(p: LogitsProcessor) -> LogitsProcessor:
        changes = {
            field: jnp.repeat(getattr(p, field), expand, axis=0)
            for field in p.row_fields
            if jnp.ndim(getattr(p, field)) == 1
        }
        return dataclasses.replace(p, **changes) if changes else p

    if isinstance(processor, Chain):
        return Chain(processors=tuple(expanded(p) for p in processor.processors))
    return expanded(processor)


def stage_names(processor: LogitsProcessor) -> list[str]:
    """Names of the stages `processor_stages` returns (the processors' classes)."""
    return [type(p).__name__ for p in _members(processor)]


def processor_stages(
    processor: LogitsProcessor, logits: Array, ctx: DecodeContext, state: Any = None
) -> list[Array]:
    """`processor.stages(...)` for a `Chain`, `[processor(...)]` for one processor."""
    if isinstance(processor, Chain):
        return processor.stages(logits, ctx, state)
    return [processor(logits, ctx, state)]


def chain(*processors: LogitsProcessor) -> Chain:
    """Composes processors; nested chains are flattened.

    >>> chain(temperature(0.7), top_p(0.9))
    """
    flat: list[LogitsProcessor] = []
    for p in processors:
        if isinstance(p, Chain):
            flat.extend(p.processors)
        elif isinstance(p, LogitsProcessor):
            flat.append(p)
        else:
            raise ValueError(f"chain() takes LogitsProcessor objects, got {type(p).__name__}")
    return Chain(processors=tuple(flat))
