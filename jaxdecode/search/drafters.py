"""Drafters for speculative decoding: who proposes the K tokens a round verifies.

* `PromptLookup` (transformers' `prompt_lookup_num_tokens`): matches each row's
  last n tokens (n from `max_matching_ngram_size` down to 1) against the row's
  own history (prompt and generated text) and proposes the K tokens that
  followed the most recent earlier occurrence. No model; a deterministic draft
  (its distribution q is one-hot). All in-graph, static shapes.
* `DraftModel` (transformers' `assistant_model`): any `Decoder` with the target's
  vocabulary, with its own KV cache, run K one-token steps per round through
  the same processor chain as the target (so its draft distribution q is the
  *processed* one the acceptance rule needs).

Both are static (hashable) descriptions; the arrays they work on are passed in.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxdecode import sampling
from jaxdecode.cache import gather_rows, rewind_rows
from jaxdecode.context import DecodeContext
from jaxdecode.models.base import Decoder, positions_from_mask
from jaxdecode.processors import Chain

Array = jax.Array

__all__ = [
    "next_assistant_tokens",
    "PromptLookup",
    "DraftModel",
    "DEFAULT_NGRAM",
    "HEURISTIC_MAX_TOKENS",
    "draft_key",
]

# The heuristic assistant schedules' largest K (unless the first K is larger):
# transformers lets K grow by 2 after every round whose drafts were all accepted,
# bounded only by the tokens left; a compiled round has a static width (the
# verification covers K + 1 positions, the draft model runs up to K steps), so a
# bound of max_new_tokens - 1 made every round of a long output that wide. At 32
# a draft that keeps up grows from the default 20 for six rounds in a row first.
HEURISTIC_MAX_TOKENS = 32

# transformers' prompt lookup matches n-grams up to this size when
# `max_matching_ngram_size` is unset.
DEFAULT_NGRAM = 2

# Per-token key streams: token index t of a row draws its acceptance test, its
# residual sample and its draft sample from `fold_in(fold_in(row_key, t), tag)`.
ACCEPT, RESIDUAL, DRAFT = 1, 2, 3


def draft_key(row_keys: Array, index: Array, tag: int) -> Array:
    """`[rows]` keys for token index `index: [rows]` of each row and a purpose tag."""
    keys = jax.vmap(jax.random.fold_in)(row_keys, index)
    return jax.vmap(lambda k: jax.random.fold_in(k, tag))(keys)


@dataclasses.dataclass(frozen=True)
class PromptLookup:
    """n-gram lookup in the row's own history.

    Attributes:
        k: draft tokens per round (`prompt_lookup_num_tokens`).
        max_ngram: longest n-gram matched (`max_matching_ngram_size`, default 2).
    """

    k: int
    max_ngram: int = DEFAULT_NGRAM

    def propose(self, ctx: DecodeContext) -> tuple[Array, Array]:
        """Drafts for every row from its history in `ctx`.

        For n = max_ngram .. 1: the row's last n tokens are compared with every
        earlier window of its history (left padding and bucket padding excluded)
        that has at least one token after it; the longest n with a match wins,
        and among its matches the most recent. The proposal is the K tokens
        after that match, continued periodically when the match is so recent
        that fewer than K tokens follow it (text that repeats with period P
        keeps repeating: `draft[i] = history[start + i mod P]`).

        Args:
            ctx: the decode context; the history ends at each row's `write_col`.

        Returns:
            `(drafts [rows, K] int32, found [rows] bool)`; rows without a match
            have `found` False (their drafts are ignored).
        """
        seq = ctx.sequences
        rows, width = seq.shape
        end = ctx.write_col  # [rows] exclusive end of the history
        first = jnp.maximum(ctx.prompt_start, ctx.offset)  # first real column
        length = end - first
        starts = jnp.arange(width)[None, :]
        found = jnp.zeros((rows,), bool)
        begin = jnp.zeros((rows,), jnp.int32)  # column after the match
        for n in range(1, self.max_ngram + 1):  # larger n overrides smaller n
            if n > width - 1:
                break
            windows = width - n + 1
            s = starts[:, :windows]
            # transformers tries n-grams only up to length - 1 of the input.
            ok = (s >= first[:, None]) & (s + n < end[:, None]) & (length[:, None] > n)
            for i in range(n):
                tail = jnp.take_along_axis(seq, jnp.clip(end - n + i, 0)[:, None], axis=1)
                ok = ok & (seq[:, i : i + windows] == tail)
            hit = jnp.any(ok, axis=1)
            last = jnp.max(jnp.where(ok, s, -1), axis=1).astype(jnp.int32)  # most recent
            found = found | hit
            begin = jnp.where(hit, last + n, begin)
        period = jnp.maximum(end - begin, 1)
        cols = begin[:, None] + jnp.arange(self.k)[None, :] % period[:, None]
        drafts = jnp.take_along_axis(seq, jnp.clip(cols, 0, width - 1), axis=1)
        return drafts.astype(jnp.int32), found


@dataclasses.dataclass(frozen=True, eq=False)
class DraftModel:
    """A smaller (or truncated) model with the target's vocabulary.

    Its cache always lags the target's history by two tokens at the start of a
    round: the round feeds `[prev, last]` (the last two tokens of the row), then
    K - 1 single draft tokens, so that after any number of accepted tokens a
    rewind leaves it consistent without a variable-length input.

    Attributes:
        decoder: the draft model's `Decoder`.
        k: draft tokens per round at most (the static shape of a round):
            `num_assistant_tokens`, or with a heuristic schedule the most a
            round can use (`max_new_tokens - 1`, at most `HEURISTIC_MAX_TOKENS`
            unless `num_assistant_tokens` is larger).
        start: each row's first K (`num_assistant_tokens`).
        schedule: `num_assistant_tokens_schedule` ("constant", "heuristic",
            "heuristic_transient").
    """

    decoder: Decoder
    k: int
    start: int = 0
    schedule: str = "constant"

    def __hash__(self) -> int:
        return hash((self.decoder, self.k, self.start, self.schedule))

    def __eq__(self, other: object) -> bool:
        # By value, as the Decoder: a reloaded draft model compiles nothing.
        return (
            isinstance(other, DraftModel)
            and other.decoder == self.decoder
            and (other.k, other.start, other.schedule) == (self.k, self.start, self.schedule)
        )

    @property
    def first_k(self) -> int:
        """Each row's K in its first round."""
        return min(self.start or self.k, self.k)

    def prefill(self, params: Any, ids: Array, mask: Array, expand: int, max_len: int) -> Any:
        """The draft cache after the prompt *minus its last two tokens* (rewound by
        two slots: the first round feeds them as `prev, last`), one row per
        decoding row (`expand` rows per prompt).

        Args:
            params: the draft model's parameters.
            ids: `[batch, bucket]` left-padded prompt.
            mask: `[batch, bucket]` 0 on padding.
            expand: rows per prompt (returned sequences).
            max_len: cache slots.
        """
        cache = self.decoder.init_cache(ids.shape[0], max_len, None)
        # Only the cache is kept: the LM head runs on the last position alone.
        _, cache = self.decoder.prefill_last(params, ids, positions_from_mask(mask), cache, mask)
        back = min(2, ids.shape[1])  # a one-column prompt: its one token
        cache = rewind_rows(cache, jnp.full((ids.shape[0],), back, jnp.int32), width=back)
        if expand > 1:
            cache = gather_rows(cache, jnp.repeat(jnp.arange(ids.shape[0]), expand))
        return cache

    def propose(
        self,
        params: Any,
        cache: Any,
        prev: Array,
        last: Array,
        position: Array,
        ctx: DecodeContext,
        proc_state: Any,
        processor: Chain,
        row_keys: Array | None,
        lengths: Array,
        max_position: int | None,
        steps: Array | None = None,
    ) -> tuple[Array, Array, Any]:
        """K draft tokens per row, each chosen from the draft model's processed
        distribution given the row's history and the drafts before it. Over ~80
        lines: one scan body of draft steps, whose carry must stay in one place.

        Args:
            params: the draft model's parameters.
            cache: its cache, holding the history before `prev`.
            prev: `[rows]` the token before `last`.
            last: `[rows]` the row's last token (not in either cache).
            position: `[rows]` position id of `last`.
            ctx: the context whose history ends with `last`.
            proc_state: the processor state for that history.
            processor: the target's processor chain (applied to the draft's logits).
            row_keys: `[rows]` key streams when sampling, None for greedy.
            lengths: `[rows]` tokens generated so far (`last` included): the
                token index of draft j is `lengths + j`.
            max_position: the model's position limit (positions are clipped below it).
            steps: `[]` int32 how many drafts any row needs this round (1 .. K;
                default K): the draft model runs that many steps (a while loop),
                so a round whose rows want few drafts costs few steps whatever
                the static K; drafts past it are 0 with q 0.

        Returns:
            `(drafts [rows, K] int32, q [rows, K, V] float32 processed draft
            scores, cache)`; the cache then holds `prev, last` and the first
            `steps - 1` drafts.
        """
        clip = (
            (lambda p: p) if max_position is None else (lambda p: jnp.minimum(p, max_position - 1))
        )
        rows = last.shape[0]

        def choose(scores: Array, j: int | Array) -> Array:
            if row_keys is None:
                return sampling.greedy(scores)
            return sampling.categorical(draft_key(row_keys, lengths + j, DRAFT), scores)

        two = jnp.stack([prev, last], axis=1)
        pos = clip(jnp.stack([jnp.maximum(position - 1, 0), position], axis=1))
        # `last` at position 0 (a one-token prompt's first round): no `prev`.
        real = jnp.stack([position > 0, jnp.ones_like(position, bool)], axis=1)
        logits, cache = self.decoder.apply(params, two, pos, cache, real.astype(jnp.int32))
        scores = processor(logits[:, -1].astype(jnp.float32), ctx, proc_state)
        token = choose(scores, 0)

        drafts = jnp.zeros((rows, self.k), jnp.int32).at[:, 0].set(token)
        q = jnp.zeros((rows, self.k, scores.shape[-1]), jnp.float32).at[:, 0].set(scores)

        def step(j, carry):
            cache, ctx, state, token, drafts, q = carry
            ctx = ctx.append(token)
            state = processor.update(state, token)
            logits, cache = self.decoder.apply(
                params,
                token[:, None],
                clip(position + j)[:, None],
                cache,
                jnp.ones((rows, 1), jnp.int32),
            )
            scores = processor(logits[:, 0].astype(jnp.float32), ctx, state)
            new = choose(scores, j)
            drafts = jax.lax.dynamic_update_slice_in_dim(drafts, new[:, None], j, axis=1)
            q = jax.lax.dynamic_update_slice_in_dim(q, scores[:, None], j, axis=1)
            return cache, ctx, state, new, drafts, q

        end = self.k if steps is None else jnp.clip(steps, 1, self.k)
        cache, _, _, _, drafts, q = jax.lax.fori_loop(
            1, end, step, (cache, ctx, proc_state, token, drafts, q)
        )
        return drafts.astype(jnp.int32), q, cache


def next_assistant_tokens(k: Array, accepted: Array, drafted: Array, schedule: str) -> Array:
    """Each row's K for the next round, transformers' rule
    (`AssistedCandidateGenerator.update_candidate_strategy`): with a heuristic
    schedule, K + 2 when every one of the round's `drafted` candidates was
    accepted, else max(1, K - 1); "constant" keeps K.

    Args:
        k: `[rows]` int32 this round's K.
        accepted: `[rows]` int32 drafts accepted this round.
        drafted: `[rows]` int32 candidates this round (K, or fewer when the
            confidence threshold stopped the draft).
        schedule: "constant", "heuristic" or "heuristic_transient".
    """
    if schedule == "constant":
        return k
    return jnp.where(accepted == drafted, k + 2, jnp.maximum(1, k - 1)).astype(jnp.int32)
