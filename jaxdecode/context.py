"""The decode context: what a logits processor may know about the sequence so far.

Processors never see the model or the loop. They see a `DecodeContext`: the token
buffer, how much of it is filled, where the prompt ends, and two per-token tallies
that are kept up to date incrementally (one scatter per step) instead of being
recomputed from the whole history, and never as a `[batch, length, vocab]` one-hot.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array

__all__ = ["DecodeContext"]


@struct.dataclass
class DecodeContext:
    """Everything a processor may read at one decoding step.

    Prompts are left-padded to a common length, so all rows share the same
    `cur_len`. Lengths are *logical* (what transformers would see for the same
    batch); `offset` extra columns at the start of `sequences` (bucket padding
    added to avoid recompiling) are invisible to every processor: logical token
    `j` sits in column `offset + j`.

    Attributes:
        sequences: `[batch, buffer_len]` int32 token buffer; columns
            `>= offset + cur_len` are not filled yet (their content is ignored).
        cur_len: `[]` int32, logical length so far (padded prompt + generated).
        prompt_length: `[]` int32, padded prompt length (columns before generation).
        max_length: `[]` int32, total length the generation may reach.
        prompt_start: `[batch]` int32, first non-padding column of each row.
        seen: `[batch, vocab]` bool, tokens present in columns
            `prompt_start..cur_len` (prompt included), or None when no processor
            needs it (repetition penalty does).
        token_counts: `[batch, vocab]` int32, how often each token was *generated*
            (prompt excluded), or None when no processor needs it (frequency and
            presence penalties do).
        offset: `[]` int32, buffer columns before logical column 0.
    """

    sequences: Array
    cur_len: Array
    prompt_length: Array
    max_length: Array
    prompt_start: Array
    seen: Array | None = None
    token_counts: Array | None = None
    offset: Array = struct.field(default_factory=lambda: jnp.zeros((), jnp.int32))

    @property
    def write_col(self) -> Array:
        """Buffer column of the next token."""
        return self.offset + self.cur_len

    @classmethod
    def from_ids(
        cls,
        input_ids: Any,
        *,
        vocab_size: int,
        prompt_length: Any = None,
        max_length: Any = None,
        attention_mask: Any = None,
        track_seen: bool = True,
        track_counts: bool = True,
        offset: Any = 0,
    ) -> DecodeContext:
        """Builds the context for a full token history `input_ids: [batch, length]`.

        Args:
            input_ids: `[batch, length]` tokens so far (padded prompt, then generated).
            vocab_size: size of the logits' last axis.
            prompt_length: columns that belong to the (padded) prompt; defaults to
                `length` (nothing generated yet).
            max_length: total length allowed; defaults to `length + 1`.
            attention_mask: `[batch, >= prompt_length]`, 0 on left padding. Only the
                position of the first non-zero entry of each row is used (as
                transformers does for its repetition penalty).
            track_seen: build the `seen` tally.
            track_counts: build the `token_counts` tally.
            offset: leading columns of `input_ids` that are bucket padding, not
                part of the logical sequence (their mask must be 0).

        Returns:
            A `DecodeContext` with `cur_len = length - offset`.
        """
        ids = jnp.asarray(input_ids, jnp.int32)
        batch, length = ids.shape
        offset = jnp.asarray(offset, jnp.int32)
        cur_len = jnp.asarray(length, jnp.int32) - offset
        prompt_len = cur_len if prompt_length is None else jnp.asarray(prompt_length, jnp.int32)
        max_len = cur_len + 1 if max_length is None else jnp.asarray(max_length, jnp.int32)
        if attention_mask is None:
            start = jnp.zeros((batch,), jnp.int32)
        else:
            start = jnp.argmax(jnp.asarray(attention_mask) != 0, axis=-1).astype(jnp.int32)
        cols = jnp.arange(length)[None, :]
        rows = jnp.arange(batch)[:, None]
        seen = None
        if track_seen:
            in_history = cols >= jnp.maximum(start, offset)[:, None]
            seen = jnp.zeros((batch, vocab_size), bool).at[rows, ids].max(in_history, mode="drop")
        counts = None
        if track_counts:
            generated = jnp.broadcast_to(cols >= offset + prompt_len, ids.shape).astype(jnp.int32)
            counts = (
                jnp.zeros((batch, vocab_size), jnp.int32).at[rows, ids].add(generated, mode="drop")
            )
        return cls(
            sequences=ids,
            cur_len=cur_len,
            prompt_length=prompt_len,
            max_length=max_len,
            prompt_start=start,
            seen=seen,
            token_counts=counts,
            offset=offset,
        )

    def append(self, tokens: Array) -> DecodeContext:
        """Writes `tokens: [batch]` at column `write_col` and updates the tallies.

        The buffer must have room (`cur_len < buffer_len`); the decoding loops size
        it to `max_length`.
        """
        tokens = jnp.asarray(tokens, jnp.int32)
        rows = jnp.arange(tokens.shape[0])
        sequences = jax.lax.dynamic_update_slice(
            self.sequences, tokens[:, None], (jnp.int32(0), self.write_col)
        )
        seen = None if self.seen is None else self.seen.at[rows, tokens].set(True, mode="drop")
        counts = (
            None
            if self.token_counts is None
            else self.token_counts.at[rows, tokens].add(1, mode="drop")
        )
        return self.replace(
            sequences=sequences, cur_len=self.cur_len + 1, seen=seen, token_counts=counts
        )

    def reorder(self, indices: Array) -> DecodeContext:
        """Gathers rows (beam search's parent beams): `indices: [batch]`."""
        take = lambda x: None if x is None else jnp.take(x, indices, axis=0)
        return self.replace(
            sequences=take(self.sequences),
            prompt_start=take(self.prompt_start),
            seen=take(self.seen),
            token_counts=take(self.token_counts),
        )
