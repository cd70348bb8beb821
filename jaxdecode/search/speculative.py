"""Speculative decoding as one compiled program: draft K tokens per row, verify
every row with ONE target forward over K + 1 positions, accept a different
number of tokens per row, rewind each row's caches past its rejected tokens.

The loop (a `lax.while_loop` until every row is finished) keeps, per row, its
last emitted token `last` *outside* the target cache (and the two last tokens
outside the draft model's cache). A round:

1. the drafter proposes `d_1..d_K` (`jaxdecode.search.drafters`);
2. the target reads `[last, d_1..d_K]` at the row's positions: K + 1 raw
   distributions, the j-th for the token after `last, d_1..d_j`;
3. the processor chain runs over the K + 1 positions with its state advanced
   token by token along the drafts and the context extended by them, so every
   processor sees at position j exactly the history plain decoding would give
   it if `d_1..d_j` are accepted;
4. acceptance: greedy keeps the drafts equal to the processed argmax (the
   output is plain greedy's token for token); sampling accepts `d_j` with
   probability `min(1, p(d_j) / q(d_j))` and, at the first rejection, draws from
   `normalize(max(0, p - q))` (after the last draft: from p), with p, q the
   *processed* target and draft distributions (prompt lookup's q is one-hot).
   The emitted tokens have exactly the target's sampling distribution;
5. EOS, stop strings and the length limit cut a row's emitted tokens where
   plain decoding would stop; the context, processor state, stop window,
   outputs and both caches advance by each row's own count (`rewind`).

With prompt lookup, a round in which no row found a match is a plain one-token
step (a `lax.cond`), so text without repetitions costs what plain decoding does
plus the n-gram search.

The first round starts at the first new token, as transformers' assisted
generation: `last` is then the prompt's last token (taken out of the target
cache after the prefill), so round boundaries and each round's K are
transformers'.

Randomness: token index t of a row draws from `fold_in(row_key, t)` (per
purpose: acceptance, residual, draft), so a row's tokens never depend on the
batch around it.

Long (~560 lines): the round, its acceptance rule, the cut where decoding
stops, the output writes and prompt lookup's verify-or-step choice belong
together; each is its own function.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxdecode import pytree, sampling
from jaxdecode.cache import rewind_rows
from jaxdecode.context import DecodeContext
from jaxdecode.processors import TracedConfig
from jaxdecode.search.drafters import (
    ACCEPT,
    RESIDUAL,
    DraftModel,
    PromptLookup,
    draft_key,
    next_assistant_tokens,
)
from jaxdecode.search.loop import (
    GenerateOutput,
    Plan,
    eos_hit,
    with_prompt_logprobs,
)
from jaxdecode.search.program import prefill_program
from jaxdecode.search.record import FIELDS, PAD_FIELDS, token_record
from jaxdecode.search.sample import decode_step

Array = jax.Array

__all__ = ["SpecState", "speculative_program"]

Drafter = PromptLookup | DraftModel


@pytree.dataclass
class SpecState:
    """The loop state of speculative decoding (`rows = batch * R`).

    Attributes:
        ctx: the `DecodeContext` (history up to and including `last`).
        cache: the target's KV cache (history before `last`).
        draft_cache: the draft model's cache (history before `prev`), or None.
        last: `[rows]` int32 the last emitted token.
        prev: `[rows]` int32 the token before it.
        positions: `[rows]` int32 position id of `last`.
        done: `[rows]` bool, finished rows (EOS or stop string).
        lengths: `[rows]` int32 tokens generated (EOS included).
        row_keys: `[rows]` PRNG keys.
        proc_state: the processor chain's state for the history in `ctx`.
        stop_window: `[rows, W]` the stop strings' byte window, or None.
        drafted: `[rows]` int32 draft tokens verified so far.
        rate: `[rows]` float32 running accuracy of the row's prompt-lookup
            drafts (see `_lookup_round`).
        accepted: `[rows]` int32 draft tokens accepted so far.
        outs: output buffers `[rows, N + K + 1, ...]` by generated-token index.
        k_row: `[rows]` int32 each row's K for its next round (a draft model's
            `num_assistant_tokens_schedule`; at most the drafter's static K).
    """

    ctx: DecodeContext
    cache: Any
    draft_cache: Any
    last: Array
    prev: Array
    positions: Array
    done: Array
    lengths: Array
    row_keys: Array
    proc_state: Any
    stop_window: Array | None
    drafted: Array
    accepted: Array
    rate: Array
    outs: dict[str, Array]
    k_row: Array


def _select(stacked: Any, index: Array) -> Any:
    """Per row b, entry `index[b]` of a pytree whose leaves are `[T, rows, ...]`."""

    def pick(x: Array) -> Array:
        idx = index.reshape((1, -1) + (1,) * (x.ndim - 2))
        return jnp.take_along_axis(x, idx, axis=0)[0]

    return jax.tree_util.tree_map(pick, stacked)


def _where_rows(cond: Array, a: Any, b: Any) -> Any:
    """`a` on rows where `cond: [rows]`, else `b` (pytrees with rows on axis 0)."""
    return jax.tree_util.tree_map(
        lambda x, y: jnp.where(cond.reshape((-1,) + (1,) * (x.ndim - 1)), x, y), a, b
    )


def _leading(flags: Array) -> Array:
    """`[rows]` number of leading True entries of `flags: [rows, T]`."""
    return jnp.sum(jnp.cumprod(flags.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)


def _first(flags: Array, default: int) -> Array:
    """`[rows]` index of the first True of `flags: [rows, T]`, else `default`."""
    t = flags.shape[1]
    idx = jnp.where(flags, jnp.arange(t)[None, :], default)
    return jnp.min(idx, axis=1).astype(jnp.int32)


def _verify_scores(
    processor: Any, logits: Array, ctx: DecodeContext, state: Any, drafts: Array
) -> tuple[Array, Any]:
    """Processed scores at each of the W = K + 1 positions, with the context and
    the processor state advanced along the drafts.

    Returns `scores [rows, W, V]` and the states `[W, rows, ...]` (entry j: the
    state after `d_1..d_j`)."""
    rows = drafts.shape[0]
    # The token appended after position j is d_{j+1}; after the last position none.
    following = jnp.concatenate([drafts, jnp.zeros((rows, 1), jnp.int32)], axis=1)

    def one(carry, xs):
        ctx, state = carry
        logits_j, token = xs
        scores = processor(logits_j, ctx, state)
        return (ctx.append(token), processor.update(state, token)), (scores, state)

    _, (scores, states) = jax.lax.scan(one, (ctx, state), (logits.swapaxes(0, 1), following.T))
    return scores.swapaxes(0, 1), states


def _accept_sampled(
    scores: Array, drafts: Array, has: Array, q: Array | None, row_keys: Array, lengths: Array
) -> tuple[Array, Array]:
    """Speculative sampling's accept/reject rule on processed distributions.

    Draft j (token index `lengths + j`) is accepted with probability
    `min(1, p_j(d) / q_j(d))`; at the first rejection n the row draws from
    `normalize(max(0, p_n - q_n))`, after its last real draft from `p_n`.

    Args:
        scores: `[rows, W, V]` processed target scores (W = K + 1).
        drafts: `[rows, K]` draft tokens.
        has: `[rows]` real drafts per row (the rest are never accepted).
        q: `[rows, K, V]` processed draft scores, or None (one-hot drafts).
        row_keys: `[rows]` key streams.
        lengths: `[rows]` token index of the first draft.

    Returns:
        `(n [rows] accepted drafts, emitted [rows, W]: d_1..d_n then the drawn token)`.
    """
    rows, w, vocab = scores.shape
    k = w - 1
    logp = jax.nn.log_softmax(scores, axis=-1)
    if k:
        p_d = jnp.exp(jnp.take_along_axis(logp[:, :k], drafts[..., None], axis=-1)[..., 0])
        if q is None:
            q_logp = None
            q_d = jnp.ones_like(p_d)
        else:
            q_logp = jax.nn.log_softmax(q, axis=-1)
            q_d = jnp.exp(jnp.take_along_axis(q_logp, drafts[..., None], axis=-1)[..., 0])
        index = lengths[:, None] + jnp.arange(k)[None, :]
        u = jnp.stack(
            [
                jax.vmap(jax.random.uniform)(draft_key(row_keys, index[:, j], ACCEPT))
                for j in range(k)
            ],
            axis=1,
        )
        real = jnp.arange(k)[None, :] < has[:, None]
        n = _leading((u * q_d < p_d) & real)  # u < p / q, q > 0 for a drafted token
    else:
        n = jnp.zeros((rows,), jnp.int32)
    p_n = jnp.exp(_select(logp.swapaxes(0, 1), n))  # [rows, V]
    rejected = n < has  # a real draft at n was rejected: draw from max(0, p - q)
    if k:
        at = jnp.minimum(n, k - 1)
        if q_logp is None:
            q_n = jax.nn.one_hot(jnp.take_along_axis(drafts, at[:, None], 1)[:, 0], vocab)
        else:
            q_n = jnp.exp(_select(q_logp.swapaxes(0, 1), at))
        residual = jnp.maximum(p_n - jnp.where(rejected[:, None], q_n, 0.0), 0.0)
        # p == q everywhere makes a rejection impossible; guard the 0 / 0 anyway.
        residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p_n)
    else:
        residual = p_n
    new = sampling.categorical(draft_key(row_keys, lengths + n, RESIDUAL), jnp.log(residual))
    padded = jnp.concatenate([drafts, new[:, None]], axis=1)
    emitted = jnp.where(jnp.arange(w)[None, :] < n[:, None], padded, new[:, None])
    return n, emitted


def _cut(
    cfg: Any,
    traced: TracedConfig,
    emitted: Array,
    n: Array,
    lengths: Array,
    active: Array,
    window: Array | None,
    new_tokens: int,
) -> tuple[Array, Array, Array | None]:
    """Where plain decoding would stop inside the emitted tokens: after an EOS, a
    stop string's end, or the length limit.

    Returns `count [rows]` tokens kept (0 for finished rows), `stopped [rows]`
    (an EOS or stop string among them), and the stop window after them.
    """
    w = emitted.shape[1]
    count = jnp.minimum(n + 1, new_tokens - lengths)
    eos = eos_hit(emitted, cfg.eos_token_id)
    count = jnp.minimum(count, _first(eos, w) + 1)
    if traced.stop is not None:

        def advance(win, j):
            win, hit = traced.stop.advance(win, emitted[:, j])
            return win, (win, hit)

        _, (windows, hits) = jax.lax.scan(advance, window, jnp.arange(w))
        count = jnp.minimum(count, _first(hits.T, w) + 1)
    count = jnp.where(active, count, 0)
    kept = jnp.arange(w)[None, :] < count[:, None]
    stopped = jnp.any(eos & kept, axis=1)
    if traced.stop is not None:
        stopped = stopped | jnp.any(hits.T & kept, axis=1)
        window = _where_rows(count > 0, _select(windows, jnp.maximum(count - 1, 0)), window)
    return count, stopped, window


def _write_outputs(
    cfg: Any,
    outs: dict[str, Array],
    scores: Array,
    logits: Array,
    emitted: Array,
    kept: Array,
    lengths: Array,
) -> dict[str, Array]:
    """Writes each kept position's outputs at its generated-token index.

    Args:
        cfg: the static config (which outputs exist).
        outs: the buffers `[rows, N + K + 1, ...]`.
        scores: `[rows, W, V]` processed scores; logits: `[rows, W, V]` raw.
        emitted: `[rows, W]` tokens; kept: `[rows, W]` which of them are kept.
        lengths: `[rows]` tokens generated before this round.
    """
    outs = dict(outs)
    rows, w = emitted.shape
    chosen = token_record(cfg, scores, logits, emitted)
    row_idx = jnp.arange(rows)[:, None]
    cols = lengths[:, None] + jnp.arange(w)[None, :]
    where = jnp.where(kept, cols, outs["tokens"].shape[1])  # the rest is dropped
    for name, value in chosen.items():
        outs[name] = outs[name].at[row_idx, where].set(value.astype(outs[name].dtype), mode="drop")
    return outs


def _round(
    plan: Plan,
    drafter: Drafter,
    params: Any,
    draft_params: Any,
    traced: TracedConfig,
    s: SpecState,
    drafts: Array,
    has: Array,
    q: Array | None,
    draft_written: Array | None = None,
) -> SpecState:
    """One verify-and-accept round with W = drafts.shape[1] + 1 target positions.

    Args:
        drafts: `[rows, W - 1]` proposed tokens (W = 1: a plain step).
        has: `[rows]` int32 how many leading drafts are real proposals.
        q: `[rows, W - 1, V]` processed draft scores (draft model), else None
            (a deterministic draft: q is one-hot).
        draft_written: `[]` int32 tokens the draft model wrote into its cache
            this round (`prev`, `last` and its drafts but the last), default W.

    A function over ~80 lines: draft, verify, accept and rewind of one round share
    the round's arrays.
    """
    cfg = plan.config
    processor = traced.processor
    k = drafts.shape[1]
    w = k + 1
    rows = s.last.shape[0]
    new_tokens = plan.new_tokens
    active = ~s.done & (s.lengths < new_tokens)
    # transformers' candidates: at most max_new_tokens - 1 - generated (the round
    # emits one more), up to the first EOS (the assistant stops there).
    has = jnp.minimum(has, jnp.maximum(new_tokens - s.lengths - 1, 0))
    if k:
        has = jnp.minimum(has, _first(eos_hit(drafts, cfg.eos_token_id), k) + 1)
    has = jnp.where(active, has, 0).astype(jnp.int32)

    tokens_in = jnp.concatenate([s.last[:, None], drafts], axis=1)  # [rows, W]
    pos_in = s.positions[:, None] + jnp.arange(w)[None, :]
    if plan.decoder.max_positions is not None:  # draft tokens past the limit are never kept
        pos_in = jnp.minimum(pos_in, plan.decoder.max_positions - 1)
    logits, cache = plan.decoder.apply(
        params, tokens_in, pos_in, s.cache, jnp.ones((rows, w), jnp.int32)
    )
    logits = logits.astype(jnp.float32)
    scores, states = _verify_scores(processor, logits, s.ctx, s.proc_state, drafts)
    real = jnp.arange(k)[None, :] < has[:, None]  # [rows, K]
    if cfg.do_sample:
        n, emitted = _accept_sampled(scores, drafts, has, q, s.row_keys, s.lengths)
    else:
        best = sampling.greedy(scores.reshape(rows * w, -1)).reshape(rows, w)
        n = _leading((drafts == best[:, :k]) & real)
        emitted = best  # the accepted drafts are the argmax tokens themselves

    count, stopped, window = _cut(
        cfg, traced, emitted, n, s.lengths, active, s.stop_window, new_tokens
    )
    kept = jnp.arange(w)[None, :] < count[:, None]  # [rows, W] emitted and kept

    # Processor state after the kept tokens: the drafts' states up to n, then the
    # token drawn at n (when kept).
    at_new = count == n + 1
    base = _select(states, jnp.where(at_new, n, count))
    last = jnp.take_along_axis(emitted, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
    proc_state = _where_rows(at_new, processor.update(base, last), base)
    prev = jnp.where(
        count >= 2,
        jnp.take_along_axis(emitted, jnp.maximum(count - 2, 0)[:, None], axis=1)[:, 0],
        s.last,
    )

    outs = _write_outputs(cfg, s.outs, scores, logits, emitted, kept, s.lengths)

    target_cache = rewind_rows(cache, w - jnp.where(active, count, 0), width=w)
    draft_cache = s.draft_cache
    if isinstance(drafter, DraftModel):
        # It holds prev, last and the drafts of this round but the last; it
        # keeps `count` of them (prev, last, the kept drafts but the last).
        written = w if draft_written is None else draft_written
        draft_cache = rewind_rows(draft_cache, written - jnp.where(active, count, 0), width=w)
    # transformers' count: the drafts kept before the round's last kept token
    # (an accepted draft that ends the row, EOS or the length, is that token).
    accepted = jnp.maximum(jnp.minimum(n, count - 1), 0)
    return s.replace(
        ctx=s.ctx.append(emitted, count),
        cache=target_cache,
        draft_cache=draft_cache,
        last=jnp.where(count > 0, last, s.last),
        prev=jnp.where(count > 0, prev, s.prev),
        positions=s.positions + count,
        done=s.done | stopped,
        lengths=s.lengths + count,
        proc_state=proc_state,
        stop_window=window,
        drafted=s.drafted + has,
        accepted=s.accepted + jnp.where(active, accepted, 0),
        outs=outs,
    )


# Prompt lookup verifies a round only when the rows' drafts are expected to
# yield at least this many accepted tokens per active row: a forward pass over
# K + 1 positions costs ~3x a one-token step on a 2-core CPU (SmolLM2-135M,
# measured: 37 ms vs 110 ms), so a verification that accepts less than ~2
# tokens per row is slower than plain decoding.
VERIFY_GAIN = 2.0
# Weight of the newest observation in each row's running draft accuracy, and
# its start: optimistic, so that the first rounds verify (a grounded row keeps
# verifying; a row whose drafts miss falls back after a miss or two).
RATE_STEP = 0.3
RATE_START = 0.9


def _lookup_round(
    plan: Plan,
    drafter: PromptLookup,
    params: Any,
    traced: TracedConfig,
    s: SpecState,
    active: Array,
) -> SpecState:
    """A prompt-lookup round: verify the drafts, or take a plain one-token step
    when they are not worth a (K + 1)-position forward pass.

    Each row keeps `rate`, a running estimate of how often its lookup draft's
    next token is right, observed every round it has a draft: a verified round
    counts its accepted drafts and its rejection, a plain step checks the
    draft's first token for free. With per-token accuracy r, a draft is expected to yield `r / (1 - r)` accepted tokens; the
    round verifies when their sum over rows reaches `VERIFY_GAIN` per active
    row. The choice depends only on the history, never on this round's draws,
    so sampling stays exact.
    """
    k = drafter.k
    drafts, found = drafter.propose(s.ctx)
    drafting = found & active
    has = jnp.where(drafting, k, 0).astype(jnp.int32)
    expected = jnp.where(drafting, jnp.minimum(s.rate / (1.0 - s.rate), k), 0.0)
    rows_active = jnp.maximum(jnp.sum(active), 1).astype(jnp.float32)
    verify = jnp.sum(expected) >= VERIFY_GAIN * rows_active
    new = jax.lax.cond(
        verify,
        lambda s: _round(plan, drafter, params, None, traced, s, drafts, has, None),
        lambda s: _round(plan, drafter, params, None, traced, s, drafts[:, :0], has * 0, None),
        s,
    )
    rows = jnp.arange(drafts.shape[0])
    # Unverified: was the draft's first token the one emitted? Verified: the
    # accepted drafts are successes, a rejection (if any) one failure.
    first = new.ctx.sequences[rows, s.ctx.write_col]  # the first token emitted this round
    right = (first == drafts[:, 0]).astype(jnp.float32)
    won = (new.accepted - s.accepted).astype(jnp.float32)
    tried = (new.drafted - s.drafted).astype(jnp.float32)
    trials = won + (won < tried).astype(jnp.float32)
    observed = jnp.where(tried > 0, won / jnp.maximum(trials, 1.0), right)
    seen = drafting & (new.lengths > s.lengths)
    rate = jnp.where(seen, (1.0 - RATE_STEP) * s.rate + RATE_STEP * observed, s.rate)
    return new.replace(rate=jnp.clip(rate, 0.0, 0.99))


def _start(
    plan: Plan,
    drafter: Drafter,
    params: Any,
    draft_params: Any,
    ids: Array,
    mask: Array,
    prompt_len: Array,
    traced: TracedConfig,
    key: Array,
) -> tuple[TracedConfig, SpecState, dict[str, Array] | None]:
    """Prefill (as plain decoding, with room for K + 1 more slots) and the draft
    model's prefill, then both caches rewound so that the first round starts at
    the first new token, as transformers' assisted generation: `last` is the
    prompt's last token (out of the target cache again; the round recomputes its
    distribution along with the drafts') and `prev` the one before it (out of
    the draft cache), so round boundaries, each round's K and the drafted /
    accepted counts are transformers'."""
    k = drafter.k
    wide = dataclasses.replace(plan, new_tokens=plan.new_tokens + k + 1)
    traced, state = prefill_program(wide, params, ids, mask, prompt_len, traced, key)
    state = state.replace(ctx=state.ctx.replace(max_length=state.ctx.max_length - k - 1))
    prompt, state = state.prompt, state.replace(prompt=None)
    ids = jnp.asarray(ids, jnp.int32)
    last_prompt = jnp.repeat(ids[:, -1], plan.expand)
    # The token before it: padding (masked where it is fed) for a one-token prompt.
    before_last = ids[:, -2] if ids.shape[1] > 1 else jnp.zeros_like(ids[:, -1])
    rows = plan.rows
    # The outputs' shapes: those of a step's record (only traced for its shapes).
    first = jax.eval_shape(lambda st: decode_step(plan, params, traced, st, False)[1], state)
    width = plan.new_tokens + k + 1
    outs = {}
    for name, value in first.items():
        fill = plan.config.pad_token_id if name in PAD_FIELDS else 0
        outs[name] = jnp.full((rows, width, *value.shape[1:]), fill, value.dtype)
    draft_cache = None
    if isinstance(drafter, DraftModel):
        total = plan.bucket + plan.new_tokens + k + 1
        draft_cache = drafter.prefill(draft_params, ids, mask, plan.expand, total)
    spec = SpecState(
        ctx=state.ctx,
        cache=rewind_rows(state.cache, jnp.ones((rows,), jnp.int32), width=1),
        draft_cache=draft_cache,
        last=last_prompt,
        prev=jnp.repeat(before_last, plan.expand),
        positions=state.positions - 1,  # `last` is not in the cache
        done=state.done,
        lengths=state.lengths,
        row_keys=state.row_keys,
        proc_state=state.proc_state,
        stop_window=state.stop_window,
        drafted=jnp.zeros((rows,), jnp.int32),
        accepted=jnp.zeros((rows,), jnp.int32),
        rate=jnp.full((rows,), RATE_START, jnp.float32),
        outs=outs,
        k_row=jnp.full((rows,), getattr(drafter, "first_k", k), jnp.int32),
    )
    return traced, spec, prompt


@jax.jit(static_argnums=(0, 1))
def speculative_program(
    plan: Plan,
    drafter: Drafter,
    params: Any,
    draft_params: Any,
    ids: Array,
    mask: Array,
    prompt_len: Array,
    traced: TracedConfig,
    key: Array,
) -> GenerateOutput:
    """Prefill and the speculative loop as one jitted function (see `_speculate`).

    Raises:
        ValueError: when differentiated (`jax.grad`, also through a caller's
            `jit`): reverse mode cannot go through its while loop.
    """
    return _speculate_nondiff(
        plan, drafter, params, draft_params, ids, mask, prompt_len, traced, key
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _speculate_nondiff(plan: Plan, drafter: Drafter, *args: Any) -> GenerateOutput:
    return _speculate(plan, drafter, *args)


@_speculate_nondiff.defjvp
def _speculate_jvp(plan: Plan, drafter: Drafter, primals: tuple, tangents: tuple):
    raise ValueError(
        "speculative decoding (prompt_lookup_num_tokens / assistant_model) cannot be "
        "differentiated: its number of rounds depends on the data (a while loop); "
        "differentiate generate without speculation"
    )


def _speculate(
    plan: Plan,
    drafter: Drafter,
    params: Any,
    draft_params: Any,
    ids: Array,
    mask: Array,
    prompt_len: Array,
    traced: TracedConfig,
    key: Array,
) -> GenerateOutput:
    """Prefill and the speculative loop (untransformed).

    Args:
        plan: the static plan (greedy or sampling; `plan.loop` is ignored: the
            number of rounds depends on the data, so this is a while loop).
        drafter: `PromptLookup` or `DraftModel` (static).
        params: the target's parameters.
        draft_params: the draft model's parameters (None for prompt lookup).
        ids, mask, prompt_len, traced, key: as `generate_program`'s.

    Returns:
        A `GenerateOutput` with `drafted` and `accepted` per row.

    A function over ~80 lines: the checks and the custom JVP plumbing around one
    program.
    """
    params = plan.decoder.prepared(params, plan.rows)
    if isinstance(drafter, DraftModel):
        draft_params = drafter.decoder.prepared(draft_params, plan.rows)
    traced, state, prompt = _start(
        plan, drafter, params, draft_params, ids, mask, prompt_len, traced, key
    )
    n = plan.new_tokens
    k = drafter.k
    threshold = traced.assistant_confidence
    if threshold is not None and jnp.ndim(threshold) == 1:
        threshold = jnp.repeat(threshold, plan.expand, axis=0)

    def body(s: SpecState) -> SpecState:
        active = ~s.done & (s.lengths < n)
        if isinstance(drafter, PromptLookup):
            return _lookup_round(plan, drafter, params, traced, s, active)
        keys = s.row_keys if plan.config.do_sample else None
        # The drafts any row can use: its K, at most the tokens left but one.
        want = jnp.minimum(jnp.minimum(s.k_row, k), n - s.lengths - 1)
        steps = jnp.maximum(jnp.max(jnp.where(active, want, 0)), 1).astype(jnp.int32)
        drafts, q, draft_cache = drafter.propose(
            draft_params,
            s.draft_cache,
            s.prev,
            s.last,
            s.positions,
            s.ctx,
            s.proc_state,
            traced.processor,
            keys,
            s.lengths,
            plan.decoder.max_positions,
            steps,
        )
        has = jnp.where(active, jnp.minimum(s.k_row, k), 0).astype(jnp.int32)
        if threshold is not None:
            # transformers' ConfidenceCriteria: the draft stops after a token whose
            # probability under the draft's processed distribution is below it.
            p_d = jnp.take_along_axis(jax.nn.softmax(q, axis=-1), drafts[..., None], axis=-1)
            low = p_d[..., 0] < (threshold[:, None] if threshold.ndim else threshold)
            has = jnp.minimum(has, _first(low, k) + 1)
        s = s.replace(draft_cache=draft_cache)
        new = _round(
            plan,
            drafter,
            params,
            draft_params,
            traced,
            s,
            drafts,
            has,
            q if plan.config.do_sample else None,
            steps + 1,
        )
        # The round's candidates and matches, as transformers counts them.
        won, cand = new.accepted - s.accepted, new.drafted - s.drafted
        k_next = next_assistant_tokens(s.k_row, won, cand, drafter.schedule)
        return new.replace(k_row=jnp.where(active, jnp.minimum(k_next, k), s.k_row))

    state = jax.lax.while_loop(lambda s: jnp.any(~s.done & (s.lengths < n)), body, state)
    pad = plan.config.pad_token_id
    width = plan.bucket + n
    cols = jnp.arange(width)[None, :]
    sequences = jnp.where(cols < state.ctx.write_col[:, None], state.ctx.sequences[:, :width], pad)
    outs = {name: v[:, :n] for name, v in state.outs.items()}
    out = GenerateOutput(
        sequences=sequences,
        lengths=state.lengths,
        **{name: outs.get(name) for name in FIELDS if name != "tokens"},
        drafted=state.drafted,
        accepted=state.accepted,
        num_assistant_tokens=state.k_row if isinstance(drafter, DraftModel) else None,
    )
    return with_prompt_logprobs(out, prompt, plan.config.num_return_sequences)
