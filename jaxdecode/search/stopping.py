"""Stop strings, decided inside the compiled loop.

transformers' `stop_strings`: a row stops as soon as its text contains a stop
string that *ends inside the token just generated* (it may start in earlier
tokens, the prompt included, and the token may run past its end: "st" + "opera"
stops on "stop"; "stop" + "at" does not stop at "at"). The stop string stays in
the output, as transformers keeps it.

On the device: a table of every token's bytes `[vocab, L]`, and per row a
rolling window of the last `W = longest stop string + L` bytes of its text. Each
step appends the chosen token's bytes to the window (one gather) and compares
the window's tail with every stop string; no host round trip. Matching is on
UTF-8 bytes (transformers matches the tokens' decoded characters: the same for
any stop string, except across a token that splits a multi-byte character,
which transformers decodes to U+FFFD).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdecode import pytree
from jaxdecode.context import DecodeContext

Array = jax.Array

__all__ = ["StopStrings", "stop_strings", "token_tables"]


@pytree.dataclass
class StopStrings:
    """Stop strings as arrays (build with `stop_strings`).

    Attributes:
        token_bytes: `[vocab, L]` int32 each token's bytes, -1 after its end.
        token_len: `[vocab]` int32 bytes per token.
        strings: `[S, M]` int32 the stop strings' bytes, -1 after their end.
        lengths: static, bytes of each stop string.
    """

    token_bytes: Array
    token_len: Array
    strings: Array
    lengths: tuple[int, ...] = pytree.field(pytree_node=False)

    @property
    def width(self) -> int:
        """Bytes of text each row keeps: enough for a stop string that ends
        anywhere inside the last token."""
        return max(self.lengths) + self.token_bytes.shape[1]

    def _append(self, window: Array, tokens: Array, valid: Array | None = None) -> Array:
        take = self.token_len[tokens]  # [B]
        if valid is not None:
            take = jnp.where(valid, take, 0)
        joined = jnp.concatenate([window, self.token_bytes[tokens]], axis=1)  # [B, W + L]
        cols = take[:, None] + jnp.arange(self.width)[None, :]
        return jnp.take_along_axis(joined, cols, axis=1)

    def init(self, ctx: DecodeContext) -> Array:
        """`[batch, W]` int32: the last W bytes of each row's history (-1 before it)."""
        batch = ctx.batch
        window = jnp.full((batch, self.width), -1, jnp.int32)
        first = jnp.maximum(ctx.prompt_start, ctx.offset)
        rows = jnp.arange(batch)

        def add(window: Array, j: Array) -> tuple[Array, None]:
            # The last W tokens hold at least the last W bytes (a token has >= 0 bytes;
            # tokens without bytes just add nothing).
            col = ctx.write_col - self.width + j
            valid = (col >= first) & (col >= 0)
            tokens = ctx.sequences[rows, jnp.clip(col, 0)]
            return self._append(window, tokens, valid), None

        window, _ = jax.lax.scan(add, window, jnp.arange(self.width))
        return window

    def advance(self, window: Array, tokens: Array) -> tuple[Array, Array]:
        """Appends `tokens: [batch]`; returns the new window and `[batch]` bool: a
        stop string ends inside the token just appended."""
        window = self._append(window, tokens)
        width = self.width
        last = self.token_len[tokens][:, None]  # [B, 1]
        hit = jnp.zeros(tokens.shape, bool)
        for i, m in enumerate(self.lengths):
            ends = jnp.arange(m, width + 1)[None, :]  # exclusive end of a candidate match
            match = jnp.ones((tokens.shape[0], width - m + 1), bool)
            for j in range(m):
                match = match & (window[:, j : j + width - m + 1] == self.strings[i, j])
            inside = ends > width - last  # ends within the last token's bytes
            hit = hit | jnp.any(match & inside, axis=1)
        return window, hit


def _string_table(strings: Sequence[str]) -> tuple[np.ndarray, tuple[int, ...]]:
    encoded = [s.encode("utf-8") for s in strings]
    table = np.full((len(encoded), max(len(e) for e in encoded)), -1, np.int32)
    for i, e in enumerate(encoded):
        table[i, : len(e)] = np.frombuffer(e, np.uint8)
    return table, tuple(len(e) for e in encoded)


def _check_strings(strings: Any) -> list[str]:
    if isinstance(strings, str):
        strings = [strings]
    if not strings or any(not isinstance(s, str) or not s for s in strings):
        raise ValueError(
            f"stop_strings must be a non-empty list of non-empty strings, got {strings!r}"
        )
    return list(strings)


def token_tables(tokenizer: Any, vocab_size: int) -> tuple[Array, Array]:
    """`(token_bytes [vocab, L], token_len [vocab])` from `tokenizer`'s vocabulary
    (ids beyond the tokenizer's have no bytes)."""
    if tokenizer is None or not hasattr(tokenizer, "token_bytes"):
        raise ValueError(
            "stop_strings needs the model's tokenizer: use a CausalLM with a tokenizer, "
            "or pass generate(..., tokenizer=jaxdecode.Tokenizer)"
        )
    pieces = [tokenizer.token_bytes(i) for i in range(vocab_size)]
    table = np.full((vocab_size, max(1, max(len(p) for p in pieces))), -1, np.int32)
    for i, p in enumerate(pieces):
        table[i, : len(p)] = np.frombuffer(p, np.uint8)
    return jnp.asarray(table), jnp.asarray(np.array([len(p) for p in pieces], np.int32))


def stop_strings(
    strings: Sequence[str],
    tokenizer: Any = None,
    vocab_size: int | None = None,
    *,
    tables: tuple[Array, Array] | None = None,
) -> StopStrings:
    """Builds the device tables for `strings`.

    Args:
        strings: non-empty stop strings.
        tokenizer: a `jaxdecode.Tokenizer` (it maps every id to its bytes).
        vocab_size: the model's vocabulary size.
        tables: `token_tables(tokenizer, vocab_size)`, when already built.
    """
    table, lengths = _string_table(_check_strings(strings))
    token_bytes, token_len = tables if tables is not None else token_tables(tokenizer, vocab_size)
    return StopStrings(
        token_bytes=token_bytes, token_len=token_len, strings=jnp.asarray(table), lengths=lengths
    )
