"""Penalties that read the history: repetition, frequency/presence, no-repeat
n-grams, sequence bias and bad words.

The repetition and frequency/presence penalties keep their tallies as processor
state (`[batch, vocab]`, built once from the prompt by `init`, then updated with
one scatter per token), never as a `[batch, length, vocab]` one-hot."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxdecode import pytree
from jaxdecode.context import DecodeContext
from jaxdecode.processors.base import (
    NEG_INF,
    LogitsProcessor,
    divide,
    float_leaf,
    int_leaf,
    row,
)
from jaxdecode.validation import parse_sequences, static_int

Array = jax.Array

__all__ = [
    "RepetitionPenalty",
    "FrequencyPresencePenalty",
    "NoRepeatNGram",
    "SequenceBias",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "frequency_presence_penalty",
    "no_repeat_ngram_size",
    "sequence_bias",
    "bad_words_ids",
]


def _scatter_tally(ctx: DecodeContext, columns: Array, vocab: int, dtype: Any) -> Array:
    """`[batch, vocab]`: per row, the tokens at the True `columns: [batch, buffer]`
    marked (bool) or counted (int)."""
    ids = ctx.sequences
    rows = jnp.arange(ids.shape[0])[:, None]
    empty = jnp.zeros((ids.shape[0], vocab), dtype)
    if dtype is bool:
        return empty.at[rows, ids].max(columns, mode="drop")
    return empty.at[rows, ids].add(columns.astype(dtype), mode="drop")


@pytree.dataclass
class RepetitionPenalty(LogitsProcessor):
    """Penalises every token already present (prompt included, left padding not),
    except in the first `prompt_ignore_length` logical columns of each row.

    Attributes:
        penalty: `[]` or `[batch]` float32.
        prompt_ignore_length: `[]` or `[batch]` int32, leading logical columns
            (left padding included, as transformers counts them) whose tokens
            are not penalised; 0 ignores nothing.
    """

    row_fields: ClassVar[dict[str, str]] = {
        "penalty": "repetition_penalty",
        "prompt_ignore_length": "prompt_ignore_length",
    }

    penalty: Array
    prompt_ignore_length: Array = pytree.field(default_factory=lambda: jnp.zeros((), jnp.int32))
    form: str = pytree.field(pytree_node=False, default="hf")

    def init(self, ctx: DecodeContext) -> Array:
        """`[batch, vocab]` bool: tokens in the history (prompt without its left
        padding and its first `prompt_ignore_length` columns, then generated
        tokens)."""
        cols = jnp.arange(ctx.sequences.shape[1])[None, :]
        first = (ctx.offset + jnp.asarray(self.prompt_ignore_length, jnp.int32))[:, None]
        return _scatter_tally(ctx, ctx.history_mask() & (cols >= first), ctx.vocab_size, bool)

    def update(self, state: Array, tokens: Array) -> Array:
        rows = jnp.arange(tokens.shape[0])
        return state.at[rows, tokens].set(True, mode="drop")

    def apply(self, logits: Array, ctx: DecodeContext, state: Array) -> Array:
        seen = state
        theta = row(self.penalty, logits.dtype)
        if self.form == "ctrl":
            penalised = divide(logits, theta)
        else:
            penalised = jnp.where(logits < 0, logits * theta, divide(logits, theta))
        return jnp.where(seen, penalised, logits)


def repetition_penalty(
    penalty: Any, *, form: str = "hf", prompt_ignore_length: Any = 0
) -> RepetitionPenalty:
    """Repetition penalty, penalty > 0 (1.0 = none), applied once per distinct token.

    Args:
        penalty: scalar or `[batch]`.
        prompt_ignore_length: integer >= 0 (scalar or `[batch]`): tokens in the
            first this-many columns of each row (left padding included) are not
            penalised, as transformers' `RepetitionPenaltyLogitsProcessor(...,
            prompt_ignore_length=)`; the prompt's own length penalises generated
            tokens only.
        form: "hf" (default): `x * penalty` if `x < 0` else `x / penalty`, which
            always lowers a seen token's probability for penalty > 1.
            "ctrl": the CTRL paper's `x / penalty` for every seen token, which
            *raises* negative logits for penalty > 1.
    """
    if form not in ("hf", "ctrl"):
        raise ValueError(f"repetition_penalty_form must be 'hf' or 'ctrl', got {form!r}")
    return RepetitionPenalty(
        penalty=float_leaf("repetition_penalty", penalty, lo=0.0, lo_open=True),
        prompt_ignore_length=int_leaf("prompt_ignore_length", prompt_ignore_length, lo=0),
        form=form,
    )


@pytree.dataclass
class FrequencyPresencePenalty(LogitsProcessor):
    """OpenAI/vLLM penalties over *generated* tokens: `x -= f * count + p * (count > 0)`."""

    row_fields: ClassVar[dict[str, str]] = {
        "frequency": "frequency_penalty",
        "presence": "presence_penalty",
    }

    frequency: Array
    presence: Array

    def init(self, ctx: DecodeContext) -> Array:
        """`[batch, vocab]` int32: how often each token was generated."""
        return _scatter_tally(ctx, ctx.generated_mask(), ctx.vocab_size, jnp.int32)

    def update(self, state: Array, tokens: Array) -> Array:
        rows = jnp.arange(tokens.shape[0])
        return state.at[rows, tokens].add(1, mode="drop")

    def apply(self, logits: Array, ctx: DecodeContext, state: Array) -> Array:
        counts = state
        counts = counts.astype(logits.dtype)
        penalty = row(self.frequency, logits.dtype) * counts + row(self.presence, logits.dtype) * (
            counts > 0
        ).astype(logits.dtype)
        return logits - penalty


def frequency_penalty(value: Any) -> FrequencyPresencePenalty:
    """Frequency penalty in [-2, 2] (OpenAI's range), scalar or `[batch]`."""
    return FrequencyPresencePenalty(
        frequency=float_leaf("frequency_penalty", value, lo=-2.0, hi=2.0),
        presence=jnp.zeros((), jnp.float32),
    )


def presence_penalty(value: Any) -> FrequencyPresencePenalty:
    """Presence penalty in [-2, 2] (OpenAI's range), scalar or `[batch]`."""
    return FrequencyPresencePenalty(
        frequency=jnp.zeros((), jnp.float32),
        presence=float_leaf("presence_penalty", value, lo=-2.0, hi=2.0),
    )


def frequency_presence_penalty(
    frequency: Any = 0.0, presence: Any = 0.0
) -> FrequencyPresencePenalty:
    """Both OpenAI penalties in one processor (one pass over the counts)."""
    return FrequencyPresencePenalty(
        frequency=float_leaf("frequency_penalty", frequency, lo=-2.0, hi=2.0),
        presence=float_leaf("presence_penalty", presence, lo=-2.0, hi=2.0),
    )


@pytree.dataclass
class NoRepeatNGram(LogitsProcessor):
    """Bans any token that would complete an n-gram already in the sequence."""

    n: int = pytree.field(pytree_node=False, default=3)

    def apply(self, logits: Array, ctx: DecodeContext, state: Any) -> Array:
        n = self.n
        seq = ctx.sequences
        batch, buf = seq.shape
        if buf < n:
            return logits
        num_windows = buf - n + 1
        end = ctx.write_col[:, None]  # [B, 1]
        # Each row's current (n-1)-token suffix, matched against the head of every
        # window that lies wholly in the row's logical sequence.
        suffix_cols = jnp.maximum(end - (n - 1) + jnp.arange(n - 1)[None, :], 0)
        suffix = jnp.take_along_axis(seq, suffix_cols, axis=1)  # [B, n-1]
        starts = jnp.arange(num_windows)[None, :]
        match = (starts >= ctx.offset[:, None]) & (starts <= end - n)
        for i in range(n - 1):
            match = match & (seq[:, i : i + num_windows] == suffix[:, i : i + 1])
        rows = jnp.arange(batch)[:, None]
        banned = jnp.zeros(logits.shape, bool).at[rows, seq[:, n - 1 :]].max(match, mode="drop")
        return jnp.where(banned, NEG_INF, logits)


def no_repeat_ngram_size(n: int) -> NoRepeatNGram:
    """No n-gram occurs twice (prompt included); n >= 1 is static."""
    return NoRepeatNGram(n=static_int("no_repeat_ngram_size", n, 1))


@pytree.dataclass
class SequenceBias(LogitsProcessor):
    """Adds a bias to a token, or to the last token of a multi-token sequence when
    the sequence so far ends with the rest of it.

    Entries are stored as padded arrays: shapes are static, ids and biases traced.
    """

    single_ids: Array  # [S] int32
    single_bias: Array  # [S] float32
    prefixes: Array  # [M, P] int32, right-aligned, left-padded with 0
    prefix_len: Array  # [M] int32
    last_ids: Array  # [M] int32
    multi_bias: Array  # [M] float32

    def apply(self, logits: Array, ctx: DecodeContext, state: Any) -> Array:
        batch, vocab = logits.shape
        bias = jnp.zeros((vocab,), logits.dtype)
        bias = bias.at[self.single_ids].set(self.single_bias.astype(logits.dtype), mode="drop")
        bias = jnp.broadcast_to(bias, logits.shape)
        num, width = self.prefixes.shape
        if num:
            cols = ctx.write_col[:, None] - width + jnp.arange(width)[None, :]  # [B, P]
            tail = jnp.take_along_axis(ctx.sequences, jnp.clip(cols, 0), axis=1)  # [B, P]
            needed = jnp.arange(width)[None, :] >= width - self.prefix_len[:, None]  # [M, P]
            equal = (tail[:, None, :] == self.prefixes[None]) | ~needed[None]
            fits = self.prefix_len[None, :] <= ctx.cur_len[:, None]
            match = jnp.all(equal, axis=-1) & fits  # [B, M]
            add = jnp.where(match, self.multi_bias.astype(logits.dtype)[None], 0.0)
            rows = jnp.arange(batch)[:, None]
            bias = bias.at[rows, self.last_ids[None, :]].add(add, mode="drop")
        return logits + bias


def _sequence_bias_from_items(items: list[tuple[tuple[int, ...], float]]) -> SequenceBias:
    merged: dict[tuple[int, ...], float] = {}
    for ids, bias in items:  # later duplicates win, as in a dict
        merged[ids] = bias
    singles = [(ids[0], b) for ids, b in merged.items() if len(ids) == 1]
    multis = [(ids, b) for ids, b in merged.items() if len(ids) > 1]
    width = max((len(ids) - 1 for ids, _ in multis), default=0)
    prefixes = np.zeros((len(multis), width), np.int32)
    for i, (ids, _) in enumerate(multis):
        prefix = ids[:-1]
        prefixes[i, width - len(prefix) :] = prefix
    return SequenceBias(
        single_ids=jnp.asarray([t for t, _ in singles], jnp.int32).reshape(-1),
        single_bias=jnp.asarray([b for _, b in singles], jnp.float32).reshape(-1),
        prefixes=jnp.asarray(prefixes),
        prefix_len=jnp.asarray([len(ids) - 1 for ids, _ in multis], jnp.int32).reshape(-1),
        last_ids=jnp.asarray([ids[-1] for ids, _ in multis], jnp.int32).reshape(-1),
        multi_bias=jnp.asarray([b for _, b in multis], jnp.float32).reshape(-1),
    )


def sequence_bias(entries: Any) -> SequenceBias:
    """Biases tokens and token sequences.

    Args:
        entries: `{(id,): bias, (id1, id2, id3): bias}` or transformers' list form
            `[[[id], bias], [[id1, id2, id3], bias]]`. A single id is a constant
            bias; a longer sequence biases its last token only when the sequence
            so far ends with the rest of it.
    """
    return _sequence_bias_from_items(parse_sequences("sequence_bias", entries))


def bad_words_ids(words: Any, *, eos_token_id: Any = None) -> SequenceBias:
    """Forbids token sequences: a `-inf` sequence bias.

    Args:
        words: list of token id lists, e.g. `[[42], [7, 8]]`.
        eos_token_id: single-token entries equal to an EOS id are dropped, as
            transformers does, so that generation can still stop.
    """
    if not isinstance(words, (list, tuple)) or not words:
        raise ValueError(f"bad_words_ids must be a non-empty list of token id lists, got {words!r}")
    if any(not isinstance(w, (list, tuple)) for w in words):
        raise ValueError(f"bad_words_ids must be a list of lists, got {words!r}")
    eos = set() if eos_token_id is None else {int(t) for t in np.asarray(eos_token_id).reshape(-1)}
    kept = [list(w) for w in words if not (len(w) == 1 and int(w[0]) in eos)]
    items = parse_sequences("bad_words_ids", [[w, -math.inf] for w in kept]) if kept else []
    return _sequence_bias_from_items(items)
