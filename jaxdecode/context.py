"""The decode context: what a logits processor may know about the sequence so far.

Processors never see the model or the loop. They see a `DecodeContext`: the token
buffer, and per row how much of it is filled, where the prompt ends and where the
row may stop. Every length is per row (`[batch]`), so rows of one batch may sit at
different positions (a continuous-batching engine's slots, speculative decoding's
different numbers of accepted tokens) and each row sees exactly what it would see
alone. Per-token tallies (tokens seen, generated counts) are processor *state*
(see `jaxdecode.processors`), not part of the context.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxdecode import pytree
from jaxdecode.arrays import owned

Array = jax.Array

__all__ = ["DecodeContext"]


def _per_row(value: Any, batch: int) -> Array:
    return jnp.broadcast_to(jnp.asarray(value, jnp.int32), (batch,))


@pytree.dataclass
class DecodeContext:
    """Everything a processor may read at one decoding step, per row.

    Lengths are *logical* (what transformers would see for the same row: a
    left-padded prompt counts its padding, as transformers does); `offset[b]`
    extra columns at the start of row b's buffer (bucket padding added to avoid
    recompiling) are invisible to every processor: logical token `j` of row b
    sits in column `offset[b] + j`.

    Attributes:
        sequences: `[batch, buffer_len]` int32 token buffer; columns
            `>= offset + cur_len` of a row are not filled yet (their content is
            ignored).
        cur_len: `[batch]` int32, logical length so far (prompt + generated).
        prompt_length: `[batch]` int32, logical prompt length (padding included).
        max_length: `[batch]` int32, total length the row may reach.
        prompt_start: `[batch]` int32, first non-padding buffer column of each row.
        offset: `[batch]` int32, buffer columns before logical column 0.
        vocab_size: static, the size of the logits' last axis (stateful
            processors size their tallies with it).
    """

    sequences: Array
    cur_len: Array
    prompt_length: Array
    max_length: Array
    prompt_start: Array
    offset: Array
    vocab_size: int = pytree.field(pytree_node=False, default=0)

    @property
    def batch(self) -> int:
        return self.sequences.shape[0]

    @property
    def write_col(self) -> Array:
        """`[batch]` buffer column of each row's next token."""
        return self.offset + self.cur_len

    @property
    def generated(self) -> Array:
        """`[batch]` tokens generated so far (`cur_len - prompt_length`)."""
        return self.cur_len - self.prompt_length

    def history_mask(self) -> Array:
        """`[batch, buffer_len]` bool, True on the columns that hold the row's
        history (prompt without its left padding, then generated tokens)."""
        cols = jnp.arange(self.sequences.shape[1])[None, :]
        start = jnp.maximum(self.prompt_start, self.offset)[:, None]
        return (cols >= start) & (cols < self.write_col[:, None])

    def generated_mask(self) -> Array:
        """`[batch, buffer_len]` bool, True on the generated columns."""
        cols = jnp.arange(self.sequences.shape[1])[None, :]
        first = (self.offset + self.prompt_length)[:, None]
        return (cols >= first) & (cols < self.write_col[:, None])

    @classmethod
    def from_ids(
        cls,
        input_ids: Any,
        *,
        vocab_size: int,
        prompt_length: Any = None,
        max_length: Any = None,
        attention_mask: Any = None,
        offset: Any = 0,
        cur_len: Any = None,
    ) -> DecodeContext:
        """Builds the context for a full token history `input_ids: [batch, length]`.

        Args:
            input_ids: `[batch, length]` tokens so far (padded prompt, then generated).
            vocab_size: size of the logits' last axis.
            prompt_length: `[]` or `[batch]` logical prompt length; defaults to
                `cur_len` (nothing generated yet).
            max_length: `[]` or `[batch]` total length allowed; defaults to
                `cur_len + 1`.
            attention_mask: `[batch, >= prompt columns]`, 0 on left padding. Only
                the position of the first non-zero entry of each row is used (as
                transformers does for its repetition penalty).
            offset: `[]` or `[batch]` leading columns that are bucket padding, not
                part of the logical sequence (their mask must be 0).
            cur_len: `[]` or `[batch]` logical length; defaults to
                `length - offset` (the whole buffer is history).

        Returns:
            A `DecodeContext`.
        """
        ids = owned(input_ids, jnp.int32)
        batch, length = ids.shape
        offset = _per_row(owned(offset, jnp.int32), batch)
        cur = length - offset if cur_len is None else _per_row(owned(cur_len, jnp.int32), batch)
        prompt = cur if prompt_length is None else _per_row(owned(prompt_length, jnp.int32), batch)
        limit = cur + 1 if max_length is None else _per_row(owned(max_length, jnp.int32), batch)
        if attention_mask is None:
            start = jnp.zeros((batch,), jnp.int32)
        else:
            mask = owned(attention_mask)
            start = jnp.argmax(mask != 0, axis=-1).astype(jnp.int32)
        return cls(
            sequences=ids,
            cur_len=cur,
            prompt_length=prompt,
            max_length=limit,
            prompt_start=start,
            offset=offset,
            vocab_size=int(vocab_size),
        )

    def append(self, tokens: Array, n: Array | None = None) -> DecodeContext:
        """Writes tokens at each row's `write_col` and advances the rows.

        Args:
            tokens: `[batch]` one token per row, or `[batch, T]` several.
            n: `[batch]` int32, how many of the T tokens each row keeps (`0..T`);
                default all T. Tokens past `n` are written but stay outside the
                row's history (a later append overwrites them).

        The buffer must have room (`write_col + T <= buffer_len`); the decoding
        loops size it to the longest row plus the widest append.
        """
        tokens = owned(tokens, jnp.int32)
        if tokens.ndim == 1:
            tokens = tokens[:, None]
        t = tokens.shape[1]
        rows = jnp.arange(tokens.shape[0])[:, None]
        cols = self.write_col[:, None] + jnp.arange(t)[None, :]
        sequences = self.sequences.at[rows, cols].set(tokens, mode="drop")
        step = jnp.int32(t) if n is None else owned(n, jnp.int32)
        return self.replace(sequences=sequences, cur_len=self.cur_len + step)

    def reorder(self, indices: Array) -> DecodeContext:
        """Gathers rows (beam search's parent beams): `indices: [batch]`."""
        return jax.tree_util.tree_map(lambda x: jnp.take(x, indices, axis=0), self)
